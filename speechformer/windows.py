"""From audio files to windows and back, without torch: what a transcriber returns, and the
work every transcriber does around its model.

A file is read, cut into windows at quiet points when it is longer than one window (read block
by block when it is very long, so memory does not grow with its length), its windows batched by
length across files, decoded, and their texts and times put back together per file. That is
:class:`WindowedTranscriber`: the PyTorch :class:`~speechformer.transcribe.Transcriber` and the
onnxruntime :class:`~speechformer.onnx_runtime.OnnxTranscriber` differ only in how they read
audio (``_read``: a tensor or a numpy array) and how they decode a batch of windows (``_run``).
This module imports no torch (the onnxruntime path must do without it): its waveforms are
whatever the subclass reads, sliced and measured with ``len``.

Whisper's guards live here too (:meth:`WindowedTranscriber._kept`): a window whose no-speech
probability is high and whose transcript is unsure is dropped (no text on silence), and a
transcript that compresses too well (a repetition loop) is cut back to where the loop began.
"""

from __future__ import annotations

import gzip
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from .audio import AudioError, SilentAudio, audio_info, split_long_audio
from .timestamps import whisper_segments
from .tokenizer import WHISPER_TIME_PRECISION

if TYPE_CHECKING:
    from .options import Timing, TranscribeOptions
    from .timestamps import Segment, Word
    from .tokenizer import DecodeRules

SILENCE_PEAK = 1e-4  # -80 dBFS: a window this quiet is not decoded (the model may hallucinate)


@dataclass
class Hypothesis:
    """One decoded transcript: token ids (no prompt, no end token) and how sure the model was."""

    tokens: list[int]
    logprob: float = 0.0  # its score: the weighted sum of its scorers' log-probabilities, the end token included
    no_speech_prob: float | None = None  # Whisper: P(<|nospeech|>) at the start-of-transcript position

    @property
    def avg_logprob(self) -> float:
        return self.logprob / (len(self.tokens) + 1)


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
    words: list[Word] | None = None  # with timestamps: each word's start/end (seconds from the file's start)
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
    """One decoded window: its text and, with timestamps, its words (and, Whisper, its segments),
    in seconds from the window's start; and how it was decoded, as openai-whisper reports a window
    (the server's ``verbose_json``): the token ids kept (time tokens included; None: not decoded
    through ``_window``), and, Whisper only (None otherwise), the decoding's average
    log-probability (:attr:`Hypothesis.avg_logprob`) and its no-speech probability."""

    text: str
    words: list[Word] | None = None
    segments: list[Segment] | None = None
    tokens: list[int] | None = None
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - lightning depends on tqdm
        return None
    return tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)


class WindowedTranscriber:
    """Files -> windows -> batches -> results (see the module docstring). A subclass sets
    ``options``, ``tokenizer``, ``rules``, ``timing``, ``sample_rate``, ``chunk_seconds``, ``stream_seconds``
    and implements :meth:`_read`, :meth:`_run` and :meth:`_window_cost`."""

    options: "TranscribeOptions"
    tokenizer: Any
    rules: "DecodeRules"
    timing: "Timing | None"
    #: Whisper word times come from an alignment pass over the cross-attention (PyTorch only: the
    #: ONNX graphs do not output attention weights, so there Whisper has segment times alone)
    whisper_words = True
    sample_rate: int
    chunk_seconds: float
    stream_seconds: float

    def _read(self, path: Path, offset: float, duration: float | None) -> Any:
        """A mono waveform of ``path`` at :attr:`sample_rate` (an :class:`AudioError` if not)."""
        raise NotImplementedError

    def _run(self, wavs: Sequence[Any]) -> list[WindowResult]:
        """One batch of windows, decoded."""
        raise NotImplementedError

    def _window_cost(self, samples: int) -> int:
        """What a window of ``samples`` costs in a batch (Whisper: always 30 s of encoder)."""
        return samples

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

    def transcribe_waveforms(self, wavs: Sequence[Any]) -> list[str]:
        """Texts for 1-D float waveforms at the model's sample rate (each within one chunk)."""
        return [w.text for w in self.transcribe_segments(wavs)]

    def transcribe_segments(self, wavs: Sequence[Any]) -> list[WindowResult]:
        """Text and, with ``timestamps``, words (and, Whisper, segments) for 1-D waveforms
        (each within one chunk), in seconds from each waveform's start."""
        order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
        out = [self._nothing()] * len(wavs)
        costs = [self._window_cost(len(wavs[i])) for i in order]
        for batch in self._batches(costs):
            idx = [order[i] for i in batch]
            for i, seg in zip(idx, self._run([wavs[i] for i in idx])):
                out[i] = seg
        return out

    # --------------------------------------------------------------- internals
    def _decode_chunks(self, wavs: Sequence[Any]) -> list[WindowResult]:
        if self.options.timestamps:
            return self.transcribe_segments(wavs)
        return [WindowResult(text) for text in self.transcribe_waveforms(wavs)]

    def _nothing(self) -> WindowResult:
        """An empty window (silence): no text, and no words or segments."""
        return WindowResult("", [] if self._words() else None, [] if self.timing == "whisper" else None)

    def _words(self) -> bool:
        """Whether results carry word times (CTC alignment, or Whisper's alignment heads)."""
        return self.timing == "ctc" or (self.timing == "whisper" and self.whisper_words)

    def _result(self, item: AudioItem, duration: float) -> TranscriptResult:
        return TranscriptResult(item.key, item.path, duration=duration, words=[] if self._words() else None,
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
                wav = self._read(item.path, pos, block)
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

    def _load(self, item: AudioItem) -> Any | AudioError:
        try:
            return self._read(item.path, item.offset, item.duration)
        except AudioError as err:
            return err
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the batch
            return AudioError(item.path, f"could not be read ({type(err).__name__}: {err})",
                              "check that it is an audio file")

    def _transcribe_loaded(self, items: Sequence[AudioItem], loaded: Sequence[Any | AudioError]
                           ) -> list[TranscriptResult]:
        segments: list[tuple[int, int, Any]] = []  # (item index, first sample, waveform piece)
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

    def chunks(self, wav: Any) -> list[tuple[int, Any]]:
        """A whole file's waveform as the windows it is decoded in: ``(first sample, piece)``, the
        file itself when it fits in one chunk, else pieces cut at quiet points. What
        :meth:`transcribe_items` does to a file, for callers holding the waveform (the server)."""
        if len(wav) <= int(self.chunk_seconds * self.sample_rate):
            return [(0, wav)]
        return [(s, wav[s:e]) for s, e in self._spans(wav)]

    def _spans(self, wav: Any) -> list[tuple[int, int]]:
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

    def _window(self, tokens: list[int], samples: int, words: "list[Word] | None" = None,
                hyp: Hypothesis | None = None) -> WindowResult:
        """A decoded window of ``samples``: its text, and Whisper's segments when timing from time
        tokens; ``hyp``, the decoding it kept ``tokens`` of, gives Whisper's scores."""
        segments = None
        if self.timing == "whisper":
            assert self.rules.timestamp_begin is not None
            segments = whisper_segments(tokens, self.rules.timestamp_begin, self.tokenizer.decode,
                                        samples / self.sample_rate, WHISPER_TIME_PRECISION)
        whisper = hyp is not None and hyp.no_speech_prob is not None  # only Whisper has a no-speech token
        return WindowResult(self.tokenizer.decode(tokens), words, segments, list(tokens),
                            hyp.avg_logprob if whisper else None, hyp.no_speech_prob if whisper else None)

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
