"""Word timestamps from a CTC forced alignment, Whisper's segments from its time tokens, and
subtitles (SRT, WebVTT) from either.

The decoded tokens are aligned to the CTC head's per-frame log-probabilities
(:func:`torchaudio.functional.forced_align`: the single most likely frame path that spells
exactly those tokens, blanks in between). Each token then owns the frames where the path
emits it; sentencepiece pieces are grouped into words at the ``▁`` word-start marker, and
frame indices become seconds through the frontend hop and the subsampling factor.

CTC is *peaky*: a token often owns one or two frames, at or a little after where it is
heard. Word starts are therefore accurate to a frame or two (40 or 80 ms each for the conv2d
stem); word ends are where the last piece fires, which can be early for long words.
Subtitle cues stay on screen until the next cue (at most ``hold`` seconds longer).

Whisper has no CTC head; it writes its own times instead, as tokens ``<|0.00|>`` ... ``<|30.00|>``
around each segment of text (:func:`whisper_segments`), and each segment becomes one cue.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # torch is imported by the aligner alone: segments and cues are read without it (onnx_runtime)
    from torch import Tensor

WORD_START = "\u2581"  # sentencepiece's word-start marker


@dataclass
class Word:
    """One word with its start and end time in seconds from the start of the file."""

    word: str
    start: float
    end: float
    score: float = 0.0  # mean probability of the frames its pieces own on the path

    def shifted(self, seconds: float) -> "Word":
        return Word(self.word, self.start + seconds, self.end + seconds, self.score)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"], d["end"], d["score"] = round(self.start, 3), round(self.end, 3), round(self.score, 3)
        return d


@dataclass
class FrameClock:
    """Where encoder frame k sits in time: its centre is ``offset + k * stride`` seconds."""

    stride: float
    offset: float

    @classmethod
    def for_model(cls, model: Any) -> "FrameClock":
        c = model.config
        hop = model.frontend.hop_length / c.sample_rate  # 10 ms
        # mel frame i is centred on i hops (the frontend pads half a window); the stem says which mel
        # frame its output frame 0 is centred on (e.g. two unpadded 3-wide convolutions: frame k reads
        # mel frames 4k .. 4k+6, centred on 4k+3)
        return cls(stride=c.subsampling_factor * hop, offset=model.subsampling.centre_offset * hop)

    def start(self, frame: int) -> float:
        return max(0.0, self.offset + (frame - 0.5) * self.stride)

    def end(self, frame: int) -> float:
        """End of the last frame of a span whose exclusive end is ``frame``."""
        return self.offset + (frame - 0.5) * self.stride


def align_tokens(log_probs: Tensor, tokens: Sequence[int], blank: int) -> list[tuple[int, int, float]]:
    """Frames of each token on the best CTC path: ``(start, end, score)`` per token, end exclusive.

    ``log_probs`` [T, V] of one utterance (its real frames only). Raises ``ValueError`` when
    the tokens cannot be aligned (more frames needed than there are).
    """
    import torch
    import torchaudio.functional as AF

    if not tokens:
        return []
    repeats = sum(1 for a, b in zip(tokens, tokens[1:]) if a == b)
    if len(tokens) + repeats > log_probs.shape[0]:
        raise ValueError(f"{len(tokens)} tokens cannot be aligned to {log_probs.shape[0]} frames")
    targets = torch.tensor([list(tokens)], dtype=torch.int32, device=log_probs.device)
    path, scores = AF.forced_align(log_probs[None].float(), targets, blank=blank)
    spans = AF.merge_tokens(path[0], scores[0].exp(), blank=blank)
    if len(spans) != len(tokens):  # pragma: no cover - forced_align spells the targets exactly
        raise ValueError("forced alignment returned a different number of tokens")
    return [(s.start, s.end, float(s.score)) for s in spans]


def group_words(pieces: Sequence[str], spans: Sequence[tuple[int, int, float]], clock: FrameClock,
                duration: float | None = None) -> list[Word]:
    """Sentencepiece pieces with frame spans -> words with times. A piece starting with
    ``▁`` starts a word; the others continue the current one."""
    words: list[Word] = []
    current: list[int] = []

    def flush() -> None:
        if not current:
            return
        text = "".join(pieces[i] for i in current).replace(WORD_START, "").strip()
        if text:
            start = clock.start(spans[current[0]][0])
            end = max(start, clock.end(spans[current[-1]][1]))
            if duration is not None:
                start, end = min(start, duration), min(end, duration)
            score = sum(spans[i][2] for i in current) / len(current)
            words.append(Word(text, start, end, score))
        current.clear()

    for i, piece in enumerate(pieces):
        if piece.startswith(WORD_START) and current:
            flush()
        current.append(i)
    flush()
    return words


def word_timestamps(log_probs: Tensor, tokens: Sequence[int], pieces: Sequence[str], blank: int,
                    clock: FrameClock, duration: float | None = None) -> list[Word]:
    """The words of ``tokens`` with times (seconds from the start of this audio).

    If the tokens cannot be aligned (a hypothesis longer than the frames allow), the words
    share the audio evenly, with score 0, rather than losing the text."""
    try:
        spans = align_tokens(log_probs, tokens, blank)
    except ValueError:
        total = duration if duration is not None else clock.end(log_probs.shape[0])
        step = total / max(1, len(tokens))
        plain = FrameClock(stride=step, offset=step / 2)
        return [Word(w.word, w.start, w.end, 0.0) for w in
                group_words(pieces, [(i, i + 1, 0.0) for i in range(len(tokens))], plain, duration)]
    return group_words(pieces, spans, clock, duration)


# ---------------------------------------------------------------------------- Whisper segments
@dataclass
class Segment:
    """A stretch of text with its start and end in seconds: a Whisper segment, or a subtitle cue."""

    start: float
    end: float
    text: str

    def shifted(self, seconds: float) -> "Segment":
        return Segment(self.start + seconds, self.end + seconds, self.text)

    def to_dict(self) -> dict[str, Any]:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


Cue = Segment  # a subtitle cue is a timed line of text


def whisper_segments(tokens: Sequence[int], timestamp_begin: int, decode: Callable[[list[int]], str],
                     duration: float, precision: float = 0.02) -> list[Segment]:
    """Segments of one Whisper window from its tokens: ``<|t0|> text <|t1|><|t2|> text <|t3|>``
    gives ``(t0, t1, text)`` and ``(t2, t3, text)``; ids from ``timestamp_begin`` up are times
    (``precision`` seconds apart), the others text (``decode`` turns them into a string).

    A time after text ends the open segment; a time after a time (or first) starts one. Text with
    no start time starts where the previous segment ended (0 at first); text with no end time
    (the length cap cut the window, or it was decoded without the timestamp rules) ends at
    ``duration``, the window's audio: each window is decoded once, so its last words are kept
    rather than decoded again from a later start (as openai-whisper's seek does). Times are
    clamped to ``duration``; segments without text are dropped.
    """
    segments: list[Segment] = []
    start: float | None = None
    text: list[int] = []

    def close(end: float) -> None:
        words = decode(text).strip()
        begin = min(start if start is not None else (segments[-1].end if segments else 0.0), duration)
        if words:
            segments.append(Segment(begin, min(max(end, begin), duration), words))
        text.clear()

    for token in tokens:
        if token < timestamp_begin:
            text.append(token)
        elif text:
            close((token - timestamp_begin) * precision)
            start = None
        else:
            start = (token - timestamp_begin) * precision
    if text:
        close(duration)
    return segments


def segment_cues(segments: Sequence[Segment], duration: float | None = None) -> list[Cue]:
    """Subtitle cues from Whisper segments: one cue per segment (as openai-whisper's SRT
    writer), each at least 10 ms long and never past ``duration``."""
    cues = []
    for s in segments:
        end = max(s.end, s.start + 0.01)
        cues.append(Cue(s.start, min(end, duration) if duration is not None else end, s.text))
    return cues


# ---------------------------------------------------------------------------- subtitles
def words_to_cues(words: Sequence[Word], max_chars: int = 42, max_seconds: float = 5.0, max_gap: float = 1.0,
                  hold: float = 1.0, duration: float | None = None) -> list[Cue]:
    """Group words into subtitle cues: a new cue when the line would pass ``max_chars``
    characters or ``max_seconds``, or after a pause longer than ``max_gap``. A cue stays up
    until the next one starts, at most ``hold`` seconds after its last word, and never past
    ``duration`` (the end of the audio)."""
    groups: list[list[Word]] = []
    for w in words:
        if groups:
            line = groups[-1]
            text_len = sum(len(x.word) + 1 for x in line) + len(w.word)
            if text_len <= max_chars and w.end - line[0].start <= max_seconds and w.start - line[-1].end <= max_gap:
                line.append(w)
                continue
        groups.append([w])
    cues = []
    for i, line in enumerate(groups):
        nxt = groups[i + 1][0].start if i + 1 < len(groups) else float("inf")
        if duration is not None:
            nxt = min(nxt, duration)
        end = max(line[-1].end, min(line[-1].end + hold, nxt), line[0].start + 0.01)
        if duration is not None:
            end = min(end, duration)
        cues.append(Cue(line[0].start, end, " ".join(w.word for w in line)))
    return cues


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def format_srt(cues: Sequence[Cue]) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each."""
    return "".join(f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{c.text}\n\n"
                   for i, c in enumerate(cues, 1))


def format_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT: a ``WEBVTT`` header, then cues with ``HH:MM:SS.mmm`` times."""
    return "WEBVTT\n\n" + "".join(f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{c.text}\n\n" for c in cues)
