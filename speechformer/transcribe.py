"""From audio files to text with a trained model: loading, batching, long audio, export.

A *model* is either a Lightning checkpoint (``.ckpt``) written by ``speechformer fit`` or
a model directory written by ``speechformer export`` or ``speechformer import-whisper``
(``config.json``, ``model.safetensors``, and ``tokenizer.model`` or Whisper's
``tokenizer.json``). Both load without unpickling anything: checkpoints with
``torch.load(..., weights_only=True)``, weights with safetensors.

What to do is one frozen :class:`~speechformer.options.TranscribeOptions`:
``Transcriber(bundle, options, device)``, with ``bundle.default_options(...)`` the model
family's defaults. Whisper models get Whisper's guards: a window whose no-speech probability
is high and whose transcript is unsure is dropped (no text on silence), and a transcript that
compresses too well (a repetition loop) is cut back to where the loop began.

Timestamps come from one of two places (:func:`~speechformer.options.timing_source`): a CTC head gives word times
by forced alignment; Whisper (no CTC head) writes segment times itself as time tokens, decoded
under its timestamp rules. A long file's windows are each decoded once and their times shifted
by the window's start.
"""

from __future__ import annotations

import gzip
import json
import sys
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_write, atomic_write_text
from .audio import AudioError, SilentAudio, audio_info, load_audio, split_long_audio
from .decoding import DecodeOptions, Hypothesis, LengthBonus, LMScorer, Scorer, decode
from .errors import UserError
from .fastpath import tune_for_inference
from .frontend import WHISPER_WINDOW_SECONDS
from .model import ModelConfig, SpeechTransformer
from .options import CHUNK_HEADROOM, WHISPER_GUARDS, Timing, TranscribeOptions, timing_source, tokenizer_for
from .timestamps import FrameClock, Segment, Word, whisper_segments, word_timestamps
from .tokenizer import (MODEL_FILE, WHISPER_FILE, WHISPER_TIME_PRECISION, AnyTokenizer,
                        load_tokenizer, tokenizer_from_payload)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_MAX_SECONDS = 20.0


@dataclass
class ModelBundle:
    """A model with everything needed to use it."""

    model: SpeechTransformer
    tokenizer: AnyTokenizer | None
    max_input_seconds: float = DEFAULT_MAX_SECONDS
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def window_seconds(self) -> float:
        """The longest audio decoded as one window: Whisper's 30 s, or a little more than the
        longest training utterance (:data:`~speechformer.options.CHUNK_HEADROOM`); longer audio is cut."""
        if self.model.config.is_whisper:
            return WHISPER_WINDOW_SECONDS
        return CHUNK_HEADROOM * self.max_input_seconds

    def default_options(self, **overrides: Any) -> TranscribeOptions:
        """The options this model family needs, then ``overrides`` (any option by name:
        ``beam_size=4``, ``timestamps=True``): the one place that knows the families apart.

        Whisper: windows of 30 s (:attr:`window_seconds`), at most half the decoder's positions
        per window (openai-whisper's ``sample_len``, so a repetition loop cannot run to 446
        tokens), and the guards against text on silence and repetition loops
        (:data:`~speechformer.options.WHISPER_GUARDS`). Other models: chunks from the longest
        training utterance, no guards."""
        if self.model.config.is_whisper:
            base = TranscribeOptions(DecodeOptions(max_len=self.model.config.max_target_positions // 2),
                                     **WHISPER_GUARDS)
        else:
            base = TranscribeOptions()
        return base.replace(**overrides)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` restricted to tensors and plain types: a checkpoint cannot run code.

    The one checkpoint reader: ``speechformer average``/``export``/``transcribe`` and
    Lightning's resume (:class:`speechformer.checkpoint.AtomicCheckpointIO`) all use it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corruption
        raise ValueError(f"{path}: not a loadable speechformer checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); only tensors and plain types "
                         "are accepted") from err


# what to do about a damaged model, a folder's and a checkpoint's
REEXPORT = "export the model again with `speechformer export` (or copy the folder again)"
RECOPY = "copy the checkpoint again, or give one written by `speechformer fit`"


def bundle_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> ModelBundle:
    meta = ckpt.get("speechformer") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "config" not in meta or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(source, "no speechformer metadata", "give a checkpoint written by `speechformer fit`")
    model = SpeechTransformer(_model_config(meta["config"], source, RECOPY))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    load_weights(model, state, source, RECOPY)
    tokenizer = _tokenizer(source, RECOPY, lambda: tokenizer_from_payload(
        meta["tokenizer"] if meta.get("tokenizer") else meta["tokenizer_model"]))
    return ModelBundle(model.eval(), tokenizer, _max_input_seconds(meta, source, RECOPY), meta)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Load a ``.ckpt`` file or an exported model directory.

    Whatever is wrong with the files (not JSON, a setting of the wrong type, weights of other
    shapes than the config gives, a truncated or damaged file) is a :class:`UserError` naming
    the file, so the command that loads it ends in one line.
    """
    path = Path(path)
    if path.is_dir():
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file():
            raise UserError(path, f"no {CONFIG_FILE}", "give a folder written by `speechformer export` or "
                            "`speechformer import-whisper`, or a .ckpt file")
        meta = _read_config_json(cfg_path)
        model = SpeechTransformer(_model_config(meta["model"], cfg_path, REEXPORT))
        load_weights(model, _read_safetensors(path / WEIGHTS_FILE), path, REEXPORT, assign=True)
        tok_file = next((path / f for f in (MODEL_FILE, WHISPER_FILE) if (path / f).is_file()), None)
        tokenizer = _tokenizer(tok_file, REEXPORT, lambda: load_tokenizer(path)) if tok_file else None
        bundle = ModelBundle(model.eval(), tokenizer, _max_input_seconds(meta, cfg_path, REEXPORT), meta)
    elif path.is_file():
        bundle = bundle_from_checkpoint(load_checkpoint(path), str(path))
    else:
        raise FileNotFoundError(f"{path}: no such model file or folder; give a folder written by `speechformer "
                                "export` or `speechformer import-whisper`, or a .ckpt file")
    bundle.model.to(device)
    return bundle


def _read_config_json(cfg_path: Path, section: str = "model", redo: str = REEXPORT) -> dict[str, Any]:
    """A model folder's config.json, which must hold a ``section`` object ("lm" for a language model)."""
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(cfg_path, f"not UTF-8 text ({err.reason} at byte {err.start})", redo) from err
    except json.JSONDecodeError as err:
        raise UserError(cfg_path, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})",
                        f"fix the file or {redo}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get(section), dict):
        raise UserError(cfg_path, f'no "{section}" settings (a JSON object)', redo)
    return meta


def _model_config(data: Any, source: object, redo: str) -> ModelConfig:
    """The config from a file's dict; a wrong key, type or value names the file."""
    try:
        return ModelConfig.from_dict(data)
    except ValueError as err:
        raise UserError(source, str(err), f"fix the setting or {redo}") from err


def _max_input_seconds(meta: dict[str, Any], source: object, redo: str) -> float:
    value = meta.get("max_input_seconds") or DEFAULT_MAX_SECONDS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(source, f"max_input_seconds must be a positive number of seconds, got {value!r}",
                        f"fix the setting or {redo}")
    return float(value)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(path, "not found", REEXPORT)
    try:
        return load_file(str(path))
    except SafetensorError as err:  # truncated, empty or not safetensors at all
        raise UserError(path, f"not a readable safetensors file ({err}); it is damaged or incomplete",
                        REEXPORT) from err


def _tokenizer(source: object, redo: str, load: Callable[[], AnyTokenizer]) -> AnyTokenizer:
    """``load()``, with a damaged tokenizer (sentencepiece raises RuntimeError) named."""
    try:
        return load()
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise UserError(source, f"not a readable tokenizer ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})", redo) from err


def load_weights(model: torch.nn.Module, state: dict[str, Tensor], source: object, redo: str = REEXPORT,
                 assign: bool = False) -> None:
    """``model.load_state_dict(state)``, after checking the names and shapes: weights made for
    another config are one line naming the first difference and the count (not the ~180 lines of
    ``size mismatch`` torch prints). Weights saved before the attention projections were fused
    are converted first."""
    from .model.attention import fused_layout

    state = fused_layout(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if wrong:
        first = wrong[0]
        problems.append(f"{len(wrong)} of {len(expected)} tensors have other shapes than the config gives (the "
                        f"first, {first}: {list(state[first].shape)} in the weights, {list(expected[first].shape)} "
                        "from the config)")
    if missing:
        problems.append(f"{len(missing)} tensors missing (the first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config has no place for (the first: {unexpected[0]})")
    if problems:
        raise UserError(source, "weights and config do not match: " + ", ".join(problems),
                        "the config and the weights come from different models; " + redo)
    model.load_state_dict(state, assign=assign)


def check_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """The device ``flag`` names, refused up front when this machine has no such device
    (otherwise torch fails at the first tensor moved there, deep inside loading)."""
    what = f"{flag} {device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(what, "not a device name", "use cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(what, "no CUDA GPU is usable on this machine (torch.cuda.is_available() is False)",
                            f"use {flag} cpu, or leave {flag} out to use a GPU only when there is one")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(what, f"this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0",
                            f"use {flag} cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(what, "no Apple GPU (MPS) is usable on this machine", f"use {flag} cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(what, f"{dev.type} devices are not supported", "use cpu or cuda")
    return dev


def export_model(bundle: ModelBundle, out_dir: str | Path) -> Path:
    """Write a model directory: config.json, model.safetensors and the tokenizer's files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    if bundle.tokenizer is not None:
        bundle.tokenizer.save(out)
    meta = {"format": "speechformer", "model": bundle.model.config.to_dict(),
            "max_input_seconds": bundle.max_input_seconds,
            "val_wer": bundle.meta.get("val_wer"), "source": bundle.meta.get("source")}
    atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return out


@dataclass
class AudioItem:
    """One thing to transcribe: a file, or a segment of one."""

    key: str
    path: Path
    offset: float = 0.0
    duration: float | None = None


@dataclass
class TranscriptResult:
    key: str
    path: Path
    text: str = ""
    error: str | None = None
    duration: float = 0.0
    words: list[Word] | None = None  # with timestamps (CTC): each word's start/end (seconds from the file's start)
    segments: list[Segment] | None = None  # with timestamps (Whisper): each segment's start/end and text

    @property
    def ok(self) -> bool:
        return self.error is None

    def add_times(self, window: "WindowResult", offset: float) -> None:
        """A window's words or segments, in seconds from the file's start (the window begins at ``offset``)."""
        if window.words and self.words is not None:
            self.words += [w.shifted(offset) for w in window.words]
        if window.segments and self.segments is not None:
            self.segments += [s.shifted(offset) for s in window.segments]


class WindowResult(NamedTuple):
    """One decoded window: its text and, with timestamps, its words (CTC) or segments (Whisper),
    in seconds from the window's start."""

    text: str
    words: list[Word] | None = None
    segments: list[Segment] | None = None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - lightning depends on tqdm
        return None
    return tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)


class Transcriber:
    """Transcribes audio files in batches; long files are cut at quiet points.

    >>> t = Transcriber.from_pretrained("exp/model")          # doctest: +SKIP
    >>> [r.text for r in t.transcribe(["a.wav", "b.flac"])]    # doctest: +SKIP
    """

    def __init__(self, bundle: ModelBundle, options: TranscribeOptions | None = None,
                 device: str | torch.device = "cpu") -> None:
        """``options`` (default: ``bundle.default_options()``) are checked against the model
        here, before any work: a refusal is one :class:`UserError` naming the option."""
        options = bundle.default_options() if options is None else options
        options.check(bundle)
        self.options = options
        self.bundle = bundle
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device).eval()
        if options.cpu_fast_path:  # CPU float32: the decoder's linears prepacked (speechformer/fastpath.py)
            tune_for_inference(self.model, self.device, options.precision)
        self.tokenizer = tokenizer_for(options, bundle.tokenizer)
        self.timing: Timing | None = timing_source(bundle) if options.timestamps else None
        # Whisper with timestamps: no <|notimestamps|> in the prompt, the timestamp rules on
        self.rules = self.tokenizer.rules(timestamps=True) if self.timing == "whisper" else self.tokenizer.rules()
        self.clock = FrameClock.for_model(self.model)
        self.sample_rate = self.model.config.sample_rate
        self.chunk_seconds = options.chunk_length(bundle)
        # files longer than this are read block by block, so memory does not grow with length
        self.stream_seconds = max(options.stream_seconds, 4 * self.chunk_seconds)
        self.decode_options = options.decode
        self.lm = self._load_lm(options.lm) if options.lm is not None else None

    def _load_lm(self, lm_path: str) -> Any:
        """The ``--lm`` folder, on this device, once: refused in one line if its pieces are not the
        model's. The LM reads one position per token, so a window decodes at most its positions
        (``max_len`` 0, the model's table, becomes that; a larger ``--max-len`` is refused)."""
        from .lm import load_lm_for_model

        lm = load_lm_for_model(lm_path, self.bundle.tokenizer, "the model", self.device).model
        positions, d = lm.config.max_positions, self.options.decode
        if d.max_len > positions:
            raise UserError(f"--max-len {d.max_len}", f"more tokens than the LM {lm_path} has positions ({positions})",
                            f"give --max-len {positions} or less")
        self.decode_options = dataclasses.replace(d, max_len=d.max_len or positions)
        return lm

    def _scorers(self, utterances: int) -> list[Scorer]:
        """The scorers a batch of ``utterances`` adds to the decoder's: the LM (``--lm``) and its length bonus."""
        if self.lm is None:
            return []
        rows, c = utterances * self.options.decode.beam_size, self.lm.config
        scorers: list[Scorer] = [LMScorer(self.lm, rows, [c.bos_id], self.options.lm_weight, self.device)]
        if self.options.lm_bonus:
            scorers.append(LengthBonus(self.model.config.vocab_size, self.rules.eos_id, self.options.lm_bonus,
                                       self.device))
        return scorers

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, **overrides: Any
                        ) -> "Transcriber":
        """Load a model and transcribe with its default options and ``overrides`` (any option by
        name: ``beam_size=4``, ``decoder="joint"``, ``chunk_seconds=10``)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        bundle = load_model(path, "cpu")
        return cls(bundle, bundle.default_options(**overrides), device)

    # --------------------------------------------------------------- public API
    def transcribe(self, paths: Iterable[str | Path], progress: bool = False,
                   on_result: Callable[[TranscriptResult], None] | None = None) -> list[TranscriptResult]:
        """Transcribe files; a file that cannot be read gets ``error`` set, the rest go on."""
        items = [AudioItem(str(p), Path(p)) for p in paths]
        return list(self.transcribe_items(items, progress=progress, on_result=on_result))

    def transcribe_items(self, items: Sequence[AudioItem], progress: bool = False,
                         on_result: Callable[[TranscriptResult], None] | None = None,
                         window: int = 256) -> Iterator[TranscriptResult]:
        """Yield results in input order; files are read ``window`` at a time in threads."""
        bar = _progress(len(items), progress)
        with ThreadPoolExecutor(max_workers=self.options.num_threads) as pool:
            for start in range(0, len(items), window):
                group = items[start:start + window]
                long = set(pool.map(self._is_long, group))
                short = [item for item in group if id(item) not in long]
                done = dict(zip(map(id, short), self._transcribe_loaded(short, list(pool.map(self._load, short)))))
                for item in group:
                    result = done[id(item)] if id(item) in done else self._transcribe_long(item)
                    if on_result is not None:
                        on_result(result)
                    if bar is not None:
                        bar.update(1)
                    yield result
        if bar is not None:
            bar.close()

    def transcribe_waveforms(self, wavs: Sequence[Tensor]) -> list[str]:
        """Texts for 1-D float waveforms at the model's sample rate (each within one chunk)."""
        return [w.text for w in self.transcribe_segments(wavs)]

    @torch.inference_mode()
    def transcribe_segments(self, wavs: Sequence[Tensor]) -> list[WindowResult]:
        """Text and, with ``timestamps``, words (CTC) or segments (Whisper) for 1-D waveforms
        (each within one chunk), in seconds from each waveform's start."""
        order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
        out = [self._nothing()] * len(wavs)
        # a Whisper window always costs 30 s of encoder, however short its audio
        costs = [self.model.frontend.chunk_samples if self.model.config.is_whisper else len(wavs[i]) for i in order]
        for batch in self._batches(costs):
            idx = [order[i] for i in batch]
            for i, seg in zip(idx, self._run([wavs[i] for i in idx])):
                out[i] = seg
        return out

    # --------------------------------------------------------------- internals
    def _decode_chunks(self, wavs: Sequence[Tensor]) -> list[WindowResult]:
        if self.options.timestamps:
            return self.transcribe_segments(wavs)
        return [WindowResult(text) for text in self.transcribe_waveforms(wavs)]

    def _nothing(self) -> WindowResult:
        """An empty window (silence): no text, and no words or segments."""
        return WindowResult("", [] if self.timing == "ctc" else None, [] if self.timing == "whisper" else None)

    def _result(self, item: AudioItem, duration: float) -> TranscriptResult:
        return TranscriptResult(item.key, item.path, duration=duration, words=[] if self.timing == "ctc" else None,
                                segments=[] if self.timing == "whisper" else None)

    def _is_long(self, item: AudioItem) -> int | None:
        """``id(item)`` when the whole file is to be read block by block, else None."""
        if item.offset or item.duration is not None:
            return None
        try:
            seconds = audio_info(item.path)[3]
        except Exception:  # noqa: BLE001 - _load reports unreadable files
            return None
        return id(item) if seconds > self.stream_seconds else None

    def _transcribe_long(self, item: AudioItem) -> TranscriptResult:
        """A long file in blocks of ``stream_seconds``: each block is cut at quiet points and its
        chunks transcribed, except the last chunk (it may run past the block), which starts the
        next block. Memory stays that of one block, whatever the file's length."""
        total = audio_info(item.path)[3]
        result = self._result(item, total)
        texts: list[str] = []
        pos = 0.0
        while pos < total - 0.01:
            block = min(self.stream_seconds, total - pos)
            last = pos + block >= total - 0.01
            try:
                wav = load_audio(item.path, self.sample_rate, offset=pos, duration=block)
            except SilentAudio:  # a silent stretch: nothing to say there
                if last:
                    break
                pos += block
                continue
            except AudioError as err:
                result.error = str(err)
                return result
            spans = self._spans(wav)
            if not last and len(spans) > 1:
                carry = spans[-1][0]  # the last chunk may be cut by the block's end: it starts the next block
                spans = spans[:-1]
            else:
                carry = len(wav)
            for (s, _), window in zip(spans, self._decode_chunks([wav[s:e] for s, e in spans])):
                if window.text:
                    texts.append(window.text)
                result.add_times(window, pos + s / self.sample_rate)
            pos += max(carry, 1) / self.sample_rate
        result.text = " ".join(texts)
        return result

    def _load(self, item: AudioItem) -> Tensor | AudioError:
        try:
            return load_audio(item.path, self.sample_rate, offset=item.offset, duration=item.duration)
        except AudioError as err:
            return err
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the batch
            return AudioError(item.path, f"could not be read ({type(err).__name__}: {err})",
                              "check that it is an audio file")

    def _transcribe_loaded(self, items: Sequence[AudioItem], loaded: Sequence[Tensor | AudioError]
                           ) -> list[TranscriptResult]:
        segments: list[tuple[int, int, Tensor]] = []  # (item index, first sample, waveform piece)
        results = []
        for n, (item, wav) in enumerate(zip(items, loaded)):
            if isinstance(wav, Exception):
                results.append(TranscriptResult(item.key, item.path, error=str(wav)))
                continue
            results.append(self._result(item, len(wav) / self.sample_rate))
            segments += [(n, start, piece) for start, piece in self.chunks(wav)]
        decoded = self._decode_chunks([w for _, _, w in segments])
        pieces: dict[int, list[str]] = {}
        for (n, start, _), window in zip(segments, decoded):
            if window.text:
                pieces.setdefault(n, []).append(window.text)
            # times from the file's start (chunks after the first begin later)
            results[n].add_times(window, items[n].offset + start / self.sample_rate)
        for n, result in enumerate(results):
            if result.ok:
                result.text = " ".join(pieces.get(n, []))
        return results

    def chunks(self, wav: Tensor) -> list[tuple[int, Tensor]]:
        """A whole file's waveform as the windows it is decoded in: ``(first sample, piece)``, the
        file itself when it fits in one chunk, else pieces cut at quiet points. What
        :meth:`transcribe_items` does to a file, for callers holding the waveform (the server)."""
        if len(wav) <= int(self.chunk_seconds * self.sample_rate):
            return [(0, wav)]
        return [(s, wav[s:e]) for s, e in self._spans(wav)]

    def _spans(self, wav: Tensor) -> list[tuple[int, int]]:
        """(start, end) samples of the chunks ``wav`` is cut into, at quiet points."""
        return split_long_audio(wav, self.sample_rate, self.chunk_seconds, min_seconds=min(1.0, self.chunk_seconds / 4),
                                pause_seconds=self.options.pause_seconds)

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Consecutive index groups of sorted lengths, capped by padded seconds and count."""
        batch: list[int] = []
        for i, n in enumerate(lengths):
            longest = max([n] + [lengths[j] for j in batch[-1:]])
            if batch and (longest * (len(batch) + 1) > self.options.batch_seconds * self.sample_rate
                          or len(batch) >= self.options.max_batch_size):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _run(self, wavs: Sequence[Tensor]) -> list[WindowResult]:
        out = [self._nothing()] * len(wavs)
        # digital silence has nothing to say: do not ask the model (it may hallucinate)
        live = [i for i, w in enumerate(wavs) if len(w) and float(w.abs().max()) > SILENCE_PEAK]
        if not live:
            return out
        lengths = torch.tensor([len(wavs[i]) for i in live])
        batch = torch.zeros(len(live), int(lengths.max()))
        for row, i in enumerate(live):
            batch[row, :len(wavs[i])] = wavs[i]
        # bf16: matmuls in bfloat16 (AMX/AVX512-BF16 CPUs, GPUs), features and softmax in float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.precision == "bf16"):
            memory, mem_lengths = self.model.encode(batch.to(self.device), lengths.to(self.device))
            hyps = decode(self.model, memory, mem_lengths, self.decode_options, self.rules, self._scorers(len(live)))
            log_probs = self.model.ctc_log_probs(memory).cpu() if self.timing == "ctc" else None
        for row, (i, hyp) in enumerate(zip(live, hyps)):
            tokens = self._kept(hyp)
            duration = len(wavs[i]) / self.sample_rate
            words = segments = None
            if log_probs is not None:
                n = int(mem_lengths[row])
                words = word_timestamps(log_probs[row, :n], tokens, self.tokenizer.pieces(tokens),
                                        self.model.config.blank_id, self.clock, duration)
            elif self.timing == "whisper":
                assert self.rules.timestamp_begin is not None
                segments = whisper_segments(tokens, self.rules.timestamp_begin, self.tokenizer.decode, duration,
                                            WHISPER_TIME_PRECISION)
            out[i] = WindowResult(self.tokenizer.decode(tokens), words, segments)
        return out

    def _kept(self, hyp: Hypothesis) -> list[int]:
        """The tokens of one window kept after Whisper's guards against silence and loops."""
        o = self.options
        if (hyp.no_speech_prob is not None and o.no_speech_threshold is not None
                and hyp.no_speech_prob > o.no_speech_threshold and hyp.avg_logprob < o.logprob_threshold):
            return []  # Whisper's rule: probably no speech, and an unsure transcript
        tokens = hyp.tokens
        ratio = o.compression_ratio_threshold
        if ratio is not None and compression_ratio(self.tokenizer.decode(tokens)) > ratio:
            tokens = trim_repetition(tokens)
        return tokens

    def _text(self, hyp: Hypothesis) -> str:
        """The transcript of one window, after Whisper's guards."""
        return self.tokenizer.decode(self._kept(hyp))


SILENCE_PEAK = 1e-4  # -80 dBFS


def compression_ratio(text: str) -> float:
    """Bytes of text over bytes gzipped: a repetition loop compresses far better than speech."""
    raw = text.encode("utf-8")
    return len(raw) / len(gzip.compress(raw)) if raw else 0.0


def trim_repetition(tokens: list[int], min_repeats: int = 3, max_period: int = 64) -> list[int]:
    """Cut a decoding loop: if the sequence ends in ``min_repeats`` or more back-to-back
    copies of one n-gram, keep the text before the loop plus one copy."""
    n = len(tokens)
    best: tuple[int, int] | None = None  # (start of loop, period) covering the most tokens
    for period in range(1, min(max_period, n // min_repeats) + 1):
        start = n - period
        while start - period >= 0 and tokens[start - period:start] == tokens[start:start + period]:
            start -= period
        if (n - start) // period >= min_repeats and (best is None or start < best[0]):
            best = (start, period)
    if best is None:
        return tokens
    start, period = best
    return tokens[:start + period]
