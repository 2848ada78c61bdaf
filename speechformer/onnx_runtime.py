"""Transcribe with the graphs of ``speechformer export --format onnx``, without PyTorch.

Everything on this path is onnxruntime, numpy, soundfile and the tokenizer libraries
(sentencepiece, Hugging Face ``tokenizers``; librosa to find the quiet points of long audio):
no module here imports torch, directly or through another speechformer module
(``tests/test_onnx.py`` runs it in a process where ``import torch`` fails). The encoder graph
holds the log-mel frontend, so a deployment carries no feature code.

:class:`OnnxTranscriber` is the PyTorch :class:`~speechformer.transcribe.Transcriber` with the
graphs in place of the model: the same :class:`~speechformer.options.TranscribeOptions` (and
the same family defaults and checks), the same work around the model
(:class:`~speechformer.windows.WindowedTranscriber`: long audio cut into windows at quiet
points and read block by block, batching by length, Whisper's guards against text on silence
and repetition loops, digital silence skipped), the same search step for step
(:mod:`speechformer.onnx_search`: greedy, beam, joint CTC/attention with CTC prefix scores,
CTC greedy; Whisper's prompt, language and task, suppressed tokens and timestamp rules), and
the same result objects, so ``speechformer transcribe --model DIR`` writes every output format
from either.

What it does not do (one line says so, naming the flag): word times from a CTC head
(``--timestamps`` on a non-Whisper model: the forced alignment is torchaudio's), ``--lm``,
``--precision bf16``, a GPU; and it does not resample (a file at another rate than the model's
is reported as that file's error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .audio import AudioError, read_audio
from .errors import UserError
from .onnx_search import ctc_greedy, search
from .options import (TranscribeOptions, decode_rules, family_options, flag_name, timing_source, tokenizer_for,
                      window_seconds)
from .tokenizer import MODEL_FILE, WHISPER_FILE, load_tokenizer
from .windows import SILENCE_PEAK, Hypothesis, WindowedTranscriber, WindowResult

if TYPE_CHECKING:
    import onnxruntime as ort

ONNX_FORMAT = "speechformer-onnx"  # speechformer.onnx_export writes it (that module needs torch)
ONNX_FILES = ("encoder.onnx", "decoder.onnx", "config.json")
REEXPORT = "export the model again with `speechformer export --format onnx`"


def is_onnx_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder of ``speechformer export --format onnx`` (by its files)."""
    return Path(path).is_dir() and all((Path(path) / name).is_file() for name in ONNX_FILES)


class OnnxModel:
    """The exported graphs, their config and tokenizer. Where options are checked it stands in
    for a :class:`~speechformer.transcribe.ModelBundle` (``tokenizer``, ``model.ctc``,
    ``model.config.is_whisper`` / ``vocab_size``, ``window_seconds``)."""

    def __init__(self, folder: str | Path, threads: int = 0) -> None:
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(cfg_path, f"not readable ({err})", REEXPORT) from err
        if not isinstance(self.config, dict) or self.config.get("format") != ONNX_FORMAT:
            raise UserError(cfg_path, f"not a {ONNX_FORMAT} folder", "export the model with `speechformer export "
                            "--format onnx`")
        try:  # here, not at the top: `speechformer transcribe` tells an ONNX folder by its files first
            import onnxruntime as ort
        except ImportError as err:
            raise UserError(self.folder, "an ONNX model, and onnxruntime is not installed",
                            "pip install 'speechformer[onnx]'") from err
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.encoder = self._session(self.config["encoder"], options)
        self.decoder = self._session(self.config["decoder"], options)
        if not any((self.folder / name).is_file() for name in (MODEL_FILE, WHISPER_FILE)):
            raise UserError(self.folder, f"no tokenizer ({MODEL_FILE} or {WHISPER_FILE})", "export a model that has "
                            "one (a Whisper import: import it again with --tokenizer tokenizer.json)")
        self.tokenizer = load_tokenizer(self.folder)
        c = self.config["model"]
        self.whisper = self.config["family"] == "whisper"
        self.sample_rate = int(self.config["sample_rate"])
        self.positions, self.vocab_size, self.blank = c["max_target_positions"], c["vocab_size"], c["blank_id"]
        self.cache_shape = (c["n_decoder_layers"], c["n_heads"], c["d_model"] // c["n_heads"])
        has_ctc = "ctc_log_probs" in self.config["encoder"]["outputs"]
        self.model = SimpleNamespace(ctc=True if has_ctc else None,
                                     config=SimpleNamespace(is_whisper=self.whisper, vocab_size=self.vocab_size))
        self.window_seconds = window_seconds(self.whisper, float(self.config["max_input_seconds"]))

    def _session(self, graph: dict[str, Any], options: "ort.SessionOptions") -> "ort.InferenceSession":
        import onnxruntime as ort

        path = self.folder / graph["file"]
        if not path.is_file():
            raise UserError(path, "not found", REEXPORT)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def default_options(self, **overrides: Any) -> TranscribeOptions:
        """The family's defaults, then ``overrides`` (as ``ModelBundle.default_options``)."""
        return family_options(self.whisper, self.positions, **overrides)

    def encode(self, wavs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Zero-padded batch -> the encoder graph's outputs by name."""
        lengths = np.array([len(w) for w in wavs], dtype=np.int64)
        # at least the subsampler's receptive field: the samples past wav_lengths are masked, so this
        # is what PyTorch's padding of a short clip's features is (speechformer/model/layers.py)
        width = max(int(lengths.max()), int(self.config.get("min_samples", 0)))
        batch = np.zeros((len(wavs), width), dtype=np.float32)
        for row, wav in enumerate(wavs):
            batch[row, :len(wav)] = wav
        outputs = self.encoder.run(None, {"wav": batch, "wav_lengths": lengths})
        return dict(zip(self.config["encoder"]["outputs"], outputs))

    def step(self, tokens: np.ndarray, cache: tuple[np.ndarray, np.ndarray], cross_k: np.ndarray,
             cross_v: np.ndarray, mem_lengths: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """One decoder step: log-probabilities [N, L, V] and the grown caches."""
        log_probs, k, v = self.decoder.run(None, {"tokens": tokens, "self_k": cache[0], "self_v": cache[1],
                                                  "cross_k": cross_k, "cross_v": cross_v,
                                                  "mem_lengths": mem_lengths})
        return log_probs, (k, v)


#: options the PyTorch path has and this one does not: (refused when, why)
UNSUPPORTED = {
    "lm": (lambda o: o.lm is not None, "a language model needs PyTorch"),
    "precision": (lambda o: o.precision != "fp32", "the graphs are float32 (or int8: export with --quantize int8)"),
}


class OnnxTranscriber(WindowedTranscriber):
    """Transcribes audio files with an exported ONNX folder (see the module docstring).

    >>> t = OnnxTranscriber("exp/model_onnx", beam_size=4)   # doctest: +SKIP
    >>> [r.text for r in t.transcribe(["a.wav"])]             # doctest: +SKIP
    """

    whisper_words = False  # no attention weights in the graphs: Whisper gets segment times only

    def __init__(self, folder: str | Path, options: TranscribeOptions | None = None, threads: int = 0,
                 name: Callable[[str], str] = flag_name, **overrides: Any) -> None:
        """``options`` (default: the family's, then ``overrides``), checked against the graphs
        as the PyTorch path checks them against the model (``name``: a field's flag in the
        refusals); ``threads``: onnxruntime's (0: its default)."""
        self.bundle = OnnxModel(folder, threads)
        options = self.bundle.default_options(**overrides) if options is None else options
        options.check(self.bundle, name=name)  # type: ignore[arg-type]  # stands in for a ModelBundle
        _refuse_unsupported(options, self.bundle, name)
        self.options = options
        self.tokenizer = tokenizer_for(options, self.bundle.tokenizer)
        self.timing = timing_source(self.bundle) if options.timestamps else None  # type: ignore[arg-type]
        self.rules = decode_rules(options, self.tokenizer, self.timing, self.bundle.positions)
        self.sample_rate = self.bundle.sample_rate
        self.chunk_seconds = options.chunk_length(self.bundle)  # type: ignore[arg-type]
        self.stream_seconds = max(options.stream_seconds, 4 * self.chunk_seconds)

    def _read(self, path: Path, offset: float, duration: float | None) -> np.ndarray:
        wav, rate = read_audio(path, self.sample_rate, offset, duration)
        if rate != self.sample_rate:
            raise AudioError(path, f"sampled at {rate} Hz, the model takes {self.sample_rate} Hz, and the ONNX "
                             "runtime does not resample", f"resample it to {self.sample_rate} Hz first")
        return wav

    def _window_cost(self, samples: int) -> int:
        # a Whisper window always costs 30 s of encoder, however short its audio
        return int(self.chunk_seconds * self.sample_rate) if self.bundle.whisper else samples

    def _run(self, wavs: Sequence[np.ndarray]) -> list[WindowResult]:
        out = [self._nothing()] * len(wavs)
        live = [i for i, w in enumerate(wavs) if len(w) and float(np.abs(w).max()) > SILENCE_PEAK]
        if live:
            for i, hyp in zip(live, self.decode(self.bundle.encode([wavs[i] for i in live]))):
                out[i] = self._window(self._kept(hyp), len(wavs[i]), hyp=hyp)
        return out

    def decode(self, enc: dict[str, np.ndarray]) -> list[Hypothesis]:
        """The decoder the options ask for, over one batch's encoder outputs."""
        m, d = self.bundle, self.options.decode
        if d.decoder == "ctc":
            return ctc_greedy(enc["ctc_log_probs"], enc["mem_lengths"], m.blank)
        return search(m.step, enc, d, self.rules, m.cache_shape, m.vocab_size, m.positions, m.blank)


def _refuse_unsupported(options: TranscribeOptions, model: OnnxModel, name: Callable[[str], str]) -> None:
    """One line for what the PyTorch path does and this one cannot."""
    for field, (asked, why) in UNSUPPORTED.items():
        if asked(options):
            raise UserError(name(field), f"not available with an ONNX model ({model.folder}): {why}",
                            "drop the flag, or transcribe with the PyTorch model")
    if options.timestamps and not model.whisper:
        raise UserError(name("timestamps"), f"word times from a CTC head need PyTorch's forced alignment, "
                        f"and {model.folder} is an ONNX model", "drop --timestamps, or transcribe with the PyTorch "
                        "model")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m speechformer.onnx_runtime --model DIR FILE...``: one line of text per file
    (an unreadable file: its error on stderr, an empty line, exit status 1)."""
    parser = argparse.ArgumentParser(prog="python -m speechformer.onnx_runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by `speechformer export --format onnx`")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--decoder", choices=["attention", "joint", "ctc"], default="attention")
    parser.add_argument("--ctc-weight", type=float, default=None, help="joint: weight of the CTC prefix scores")
    parser.add_argument("files", nargs="+", help="audio files at the model's sample rate")
    args = parser.parse_args(argv)
    given = {"beam_size": args.beam_size, "decoder": args.decoder}
    if args.ctc_weight is not None:
        given["ctc_weight"] = args.ctc_weight
    try:
        results = OnnxTranscriber(args.model, threads=args.threads, **given).transcribe(args.files)
    except (OSError, ValueError) as err:  # UserError is a ValueError: its message is the whole line
        print(f"error: {err}", file=sys.stderr)
        return 1
    for r in results:
        if not r.ok:
            print(f"error: {r.error}", file=sys.stderr)
        print(r.text)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
