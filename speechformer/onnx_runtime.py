"""Transcribe with the graphs of ``speechformer export --format onnx``, without PyTorch.

Everything on this path is onnxruntime, numpy, soundfile and the tokenizer libraries
(sentencepiece, Hugging Face ``tokenizers``): no module here imports torch, directly or through
another speechformer module (``tests/test_onnx.py`` runs it in a process where ``import torch``
fails). The encoder graph holds the log-mel frontend, so a deployment carries no feature code.

Decoding is :func:`speechformer.decoding.greedy_decode`'s, step for step: the tokenizer's prompt,
its suppressed tokens (and those suppressed at the first step), the per-utterance token limit
tied to the encoder length and capped by the position table (Whisper: half of it, as
``DecodeOptions.for_model``), Whisper's no-speech probability and its rule (no text where
``P(no speech) > 0.6`` and the average log-probability is under -1), digital silence skipped.
Rows that finish leave the batch (their caches are dropped), as in PyTorch.

Not here yet (issue 17, item 2): beam search and joint CTC/attention decoding, Whisper's
timestamp rules and repetition trimming, long audio in chunks, resampling (the audio must be
at the model's sample rate), and ``speechformer transcribe --model DIR`` choosing this path.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import soundfile as sf

from .errors import UserError
from .tokenizer import MODEL_FILE, WHISPER_FILE, DecodeRules, load_tokenizer

ONNX_FORMAT = "speechformer-onnx"  # speechformer.onnx_export writes it (that module needs torch)
SILENCE_PEAK = 1e-4  # as speechformer.transcribe: a window quieter than -80 dBFS is not decoded
NO_SPEECH_THRESHOLD, LOGPROB_THRESHOLD = 0.6, -1.0  # Whisper's rule, as Transcriber's defaults


@dataclass
class OnnxHypothesis:
    """One decoded window: tokens (no prompt, no end token), their log-probability, P(no speech)."""

    tokens: list[int]
    logprob: float
    no_speech_prob: float | None = None

    @property
    def avg_logprob(self) -> float:
        return self.logprob / (len(self.tokens) + 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class OnnxTranscriber:
    """Greedy transcription of waveforms or files with an exported ONNX folder."""

    def __init__(self, folder: str | Path, num_threads: int = 0, max_batch_size: int = 32) -> None:
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(cfg_path, f"not readable ({err})", "export the model again with `speechformer export "
                            "--format onnx`") from err
        if not isinstance(self.config, dict) or self.config.get("format") != ONNX_FORMAT:
            raise UserError(cfg_path, f"not a {ONNX_FORMAT} folder", "export the model with `speechformer export "
                            "--format onnx`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        self.encoder = self._session(self.config["encoder"], options)
        self.decoder = self._session(self.config["decoder"], options)
        if not any((self.folder / name).is_file() for name in (MODEL_FILE, WHISPER_FILE)):
            raise UserError(self.folder, f"no tokenizer ({MODEL_FILE} or {WHISPER_FILE})", "export a model that has "
                            "one (a Whisper import: import it again with --tokenizer tokenizer.json)")
        self.tokenizer = load_tokenizer(self.folder)
        self.rules: DecodeRules = self.tokenizer.rules()
        model = self.config["model"]
        self.whisper = self.config["family"] == "whisper"
        self.sample_rate = int(self.config["sample_rate"])
        cap = model["max_target_positions"] - len(self.rules.prompt)
        self.max_tokens = max(1, min(cap, model["max_target_positions"] // 2) if self.whisper else cap)
        window = 1.25 * self.config["max_input_seconds"]  # Transcriber's chunk_seconds
        self.max_samples = int((min(30.0, window) if self.whisper else window) * self.sample_rate)
        self.cache_shape = (model["n_decoder_layers"], model["n_heads"], model["d_model"] // model["n_heads"])
        self.max_batch_size = max_batch_size
        vocab = model["vocab_size"]
        self.suppress = np.zeros(vocab, dtype=bool)
        self.suppress[[i for i in self.rules.suppress if i < vocab]] = True
        self.suppress_first = self.suppress.copy()
        self.suppress_first[[i for i in self.rules.suppress_at_start if i < vocab]] = True

    def _session(self, graph: dict[str, Any], options: ort.SessionOptions) -> ort.InferenceSession:
        path = self.folder / graph["file"]
        if not path.is_file():
            raise UserError(path, "not found", "export the model again with `speechformer export --format onnx`")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    # --------------------------------------------------------------- public API
    def transcribe(self, paths: Sequence[str | Path]) -> list[str]:
        """The text of each file (each within one window: see the module docstring)."""
        return self.transcribe_waveforms([self.load(p) for p in paths])

    def transcribe_waveforms(self, wavs: Sequence[np.ndarray]) -> list[str]:
        """Texts for 1-D float32 waveforms at the model's sample rate, batched by length."""
        for i, wav in enumerate(wavs):
            if len(wav) > self.max_samples:
                raise UserError(f"waveform {i}", f"{len(wav) / self.sample_rate:.1f} s is longer than one window "
                                f"({self.max_samples / self.sample_rate:.1f} s), and the ONNX runtime does not "
                                "cut long audio yet", "cut it, or transcribe it with the PyTorch model")
        texts = [""] * len(wavs)
        live = [i for i, w in enumerate(wavs) if len(w) and float(np.abs(w).max()) > SILENCE_PEAK]
        order = sorted(live, key=lambda i: len(wavs[i]))
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start:start + self.max_batch_size]
            for i, hyp in zip(rows, self.greedy(self.encode([wavs[i] for i in rows]))):
                texts[i] = self.tokenizer.decode(self._kept(hyp))
        return texts

    def load(self, path: str | Path) -> np.ndarray:
        """A mono float32 waveform at the model's sample rate (channels averaged)."""
        try:
            wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (OSError, RuntimeError, sf.LibsndfileError) as err:
            raise UserError(path, f"cannot read audio ({err})", "check the file") from err
        if rate != self.sample_rate:
            raise UserError(path, f"sampled at {rate} Hz, the model takes {self.sample_rate} Hz, and the ONNX "
                            "runtime does not resample", f"resample it to {self.sample_rate} Hz first")
        return np.clip(wav.mean(axis=1), -1.0, 1.0)

    # --------------------------------------------------------------- the graphs
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

    def greedy(self, enc: dict[str, np.ndarray]) -> list[OnnxHypothesis]:
        """The most likely token at every step, for the whole batch at once."""
        rules = self.rules
        mem_lengths = enc["mem_lengths"]
        b = len(mem_lengths)
        limits = np.clip(mem_lengths.astype(np.int64) + 2, 1, self.max_tokens)
        max_len = int(limits.max())
        layers, heads, head_dim = self.cache_shape
        cache = [np.zeros((layers, b, heads, 0, head_dim), np.float32) for _ in range(2)]
        cross_k, cross_v = enc["cross_k"], enc["cross_v"]
        tokens = np.tile(np.array(rules.prompt, dtype=np.int64), (b, 1))
        out = np.full((b, max_len), rules.eos_id, dtype=np.int64)
        logprob = np.zeros(b, dtype=np.float64)
        rows = np.arange(b)
        finished = np.zeros(b, dtype=bool)
        no_speech = None
        for step in range(max_len):
            log_probs, *cache = self.decoder.run(None, {"tokens": tokens, "self_k": cache[0], "self_v": cache[1],
                                                        "cross_k": cross_k, "cross_v": cross_v,
                                                        "mem_lengths": mem_lengths})
            if step == 0 and rules.no_speech_id is not None:
                no_speech = np.exp(log_probs[:, rules.sot_index, rules.no_speech_id])
            logp = _log_softmax(np.where(self.suppress_first if step == 0 else self.suppress, -np.inf,
                                         log_probs[:, -1]))
            nxt = logp.argmax(-1)
            logprob[rows] += np.where(finished, 0.0, logp[np.arange(len(rows)), nxt])
            nxt = np.where(finished, rules.eos_id, nxt)
            out[rows, step] = nxt
            finished |= (nxt == rules.eos_id) | (step + 1 >= limits[rows])
            if finished.all():
                break
            if finished.any():  # finished rows leave the batch with their caches
                keep = ~finished
                cache = [c[:, keep] for c in cache]
                cross_k, cross_v, mem_lengths = cross_k[:, keep], cross_v[:, keep], mem_lengths[keep]
                rows, nxt, finished = rows[keep], nxt[keep], finished[keep]
            tokens = nxt[:, None]
        hyps = []
        for i, row in enumerate(out.tolist()):
            ids = row[:row.index(rules.eos_id)] if rules.eos_id in row else row
            hyps.append(OnnxHypothesis(ids, float(logprob[i]), None if no_speech is None else float(no_speech[i])))
        return hyps

    def _kept(self, hyp: OnnxHypothesis) -> list[int]:
        """Whisper's rule: probably no speech and an unsure transcript -> no text."""
        if (hyp.no_speech_prob is not None and hyp.no_speech_prob > NO_SPEECH_THRESHOLD
                and hyp.avg_logprob < LOGPROB_THRESHOLD):
            return []
        return hyp.tokens


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m speechformer.onnx_runtime --model DIR FILE...``: one line of text per file."""
    parser = argparse.ArgumentParser(prog="python -m speechformer.onnx_runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by `speechformer export --format onnx`")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    parser.add_argument("files", nargs="+", help="audio files at the model's sample rate")
    args = parser.parse_args(argv)
    try:
        texts = OnnxTranscriber(args.model, num_threads=args.threads).transcribe(args.files)
    except (OSError, ValueError) as err:  # UserError is a ValueError: its message is the whole line
        print(f"error: {err}", file=sys.stderr)
        return 1
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
