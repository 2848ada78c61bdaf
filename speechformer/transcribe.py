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
compresses too well (a repetition loop) is cut back to where the loop began. The work around
the model (reading, cutting long audio, batching, the guards) is :class:`~speechformer.windows.
WindowedTranscriber`'s, shared with the onnxruntime transcriber; its result classes are
re-exported here.

Timestamps come from one of two places (:func:`~speechformer.options.timing_source`): a CTC head gives word times
by forced alignment; Whisper (no CTC head) writes segment times itself as time tokens, decoded
under its timestamp rules, and its word times come from the cross-attention of its alignment
heads (:mod:`speechformer.alignment`). A long file's windows are each decoded once and their
times shifted by the window's start.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_write, atomic_write_text
from .audio import load_audio
from .decoding import LengthBonus, LMScorer, Scorer, decode
from .errors import UserError
from .fastpath import tune_for_inference
from .alignment import whisper_word_times
from .model import ModelConfig, SpeechTransformer
from .stored import (CONFIG_FILE, RECOPY, REEXPORT, WEIGHTS_FILE, load_weights,  # noqa: F401
                     read_config_json as _read_config_json, read_safetensors as _read_safetensors,
                     read_tokenizer as _tokenizer)
from .options import (Timing, TranscribeOptions, decode_rules, family_options, timing_source, tokenizer_for,
                      window_seconds)
from .timestamps import FrameClock, word_timestamps
from .tokenizer import MODEL_FILE, WHISPER_FILE, AnyTokenizer, load_tokenizer, tokenizer_from_payload
from .windows import (SILENCE_PEAK, AudioItem, Hypothesis, TranscriptResult, WindowedTranscriber,  # noqa: F401
                      WindowResult, compression_ratio, trim_repetition)

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
        """The longest audio decoded as one window (:func:`~speechformer.options.window_seconds`)."""
        return window_seconds(self.model.config.is_whisper, self.max_input_seconds)

    def default_options(self, **overrides: Any) -> TranscribeOptions:
        """The options this model family needs, then ``overrides`` (any option by name:
        ``beam_size=4``, ``timestamps=True``): :func:`~speechformer.options.family_options`."""
        return family_options(self.model.config.is_whisper, self.model.config.max_target_positions, **overrides)


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


class Transcriber(WindowedTranscriber):
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
        # Whisper: timestamps drop <|notimestamps|> and turn the timestamp rules on; --prompt goes first
        self.rules = decode_rules(options, self.tokenizer, self.timing, self.model.config.max_target_positions)
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

    def _read(self, path: Path, offset: float, duration: float | None) -> Tensor:
        return load_audio(path, self.sample_rate, offset=offset, duration=duration)

    def _window_cost(self, samples: int) -> int:
        # a Whisper window always costs 30 s of encoder, however short its audio
        return self.model.frontend.chunk_samples if self.model.config.is_whisper else samples

    @torch.inference_mode()
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
            kept = [self._kept(hyp) for hyp in hyps]
            # Whisper: word times from its alignment heads, one teacher-forced pass per window
            aligned = whisper_word_times(self.model, memory, kept, [len(wavs[i]) for i in live], self.tokenizer) \
                if self.timing == "whisper" else None
        for row, (i, tokens) in enumerate(zip(live, kept)):
            words = aligned[row] if aligned is not None else None
            if log_probs is not None:
                words = word_timestamps(log_probs[row, :int(mem_lengths[row])], tokens, self.tokenizer.pieces(tokens),
                                        self.model.config.blank_id, self.clock, len(wavs[i]) / self.sample_rate)
            out[i] = self._window(tokens, len(wavs[i]), words, hyps[row])
        return out
