"""The answers of ``POST /v1/audio/transcriptions``: one transcript in each ``response_format``
(OpenAI's shapes), and the server-sent events of ``stream=true``.

A request's chunk results are put together exactly as ``speechformer transcribe`` puts a file's
together (texts joined by a space, times shifted by each chunk's start), so the server's
transcript is the command's; srt and vtt are the command's ``--format srt|vtt`` text.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..outputs import subtitle_text
from ..timestamps import Segment, words_to_cues
from ..transcribe import TranscriptResult, WindowResult

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
SUBTITLES = ("srt", "vtt")
MEDIA = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


def assemble(name: str, duration: float, starts: Sequence[float], windows: Sequence[WindowResult]
             ) -> TranscriptResult:
    """One request's transcript from its chunks' results (``starts``: each chunk's first second)."""
    timed_words = any(w.words is not None for w in windows)
    timed_segments = any(w.segments is not None for w in windows)
    result = TranscriptResult(name, Path(name), duration=duration, words=[] if timed_words else None,
                              segments=[] if timed_segments else None)
    for start, window in zip(starts, windows):
        result.add_times(window, start)
    result.text = " ".join(w.text for w in windows if w.text)
    return result


def chunk_segments(starts: Sequence[float], ends: Sequence[float], windows: Sequence[WindowResult]
                   ) -> list[Segment]:
    """One segment per chunk with text: the times a model without a timing source still knows."""
    return [Segment(s, e, w.text) for s, e, w in zip(starts, ends, windows) if w.text]


def verbose_segments(result: TranscriptResult, chunks: list[Segment]) -> list[Segment]:
    """Whisper's own segments; else cues grouped from word times (as the subtitles); else the chunks."""
    if result.segments is not None:
        return result.segments
    if result.words is not None:
        return words_to_cues(result.words, duration=result.duration)
    return chunks


def compression_ratio(text: str) -> float:
    """openai-whisper's ``compression_ratio``: bytes of text over bytes zlib-compressed."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw))


#: openai-whisper's ``seek`` counts log-mel frames: 100 a second.
SEEK_FRAMES_PER_SECOND = 100


def window_of(segment: Segment, starts: Sequence[float]) -> int:
    """The window a segment was decoded in: the last one to start at or before it."""
    return max((i for i, start in enumerate(starts) if start <= segment.start + 1e-6), default=0)


def segment_body(i: int, segment: Segment, window: WindowResult, window_start: float) -> dict[str, Any]:
    """One ``verbose_json`` segment in OpenAI's shape; ``seek``: where its window starts, in
    openai-whisper's frames (:data:`SEEK_FRAMES_PER_SECOND`). ``tokens``, ``avg_logprob``,
    ``compression_ratio`` and ``no_speech_prob`` are its decoding window's, as openai-whisper
    reports them (one segment per window unless Whisper's time tokens split it); ``avg_logprob``
    and ``no_speech_prob`` are ``null`` for a model other than Whisper (it has no no-speech token,
    and a joint or CTC score is not the text's log-probability); ``temperature`` is 0.0 (decoding
    is deterministic)."""
    return {"id": i, "seek": round(window_start * SEEK_FRAMES_PER_SECOND), "start": round(segment.start, 3),
            "end": round(segment.end, 3), "text": segment.text, "tokens": window.tokens or [], "temperature": 0.0,
            "avg_logprob": window.avg_logprob,
            "compression_ratio": compression_ratio(window.text), "no_speech_prob": window.no_speech_prob}


def segment_bodies(segments: Sequence[Segment], starts: Sequence[float], windows: Sequence[WindowResult]
                   ) -> list[dict[str, Any]]:
    """``verbose_json``'s segments, each with its window's numbers."""
    bodies = []
    for i, segment in enumerate(segments):
        w = window_of(segment, starts)
        bodies.append(segment_body(i, segment, windows[w], starts[w]))
    return bodies


def render(result: TranscriptResult, fmt: str, *, words: bool, language: str, chunks: list[Segment],
           starts: Sequence[float], windows: Sequence[WindowResult]) -> Response:
    """``result`` as ``fmt`` (one of :data:`FORMATS`); ``words``: ``timestamp_granularities[]=word``;
    ``starts`` and ``windows``: the chunks' first seconds and results (``verbose_json``'s scores)."""
    if fmt == "json":
        return JSONResponse({"text": result.text})
    if fmt == "text":
        return PlainTextResponse(result.text + "\n", media_type=MEDIA[fmt])
    if fmt in SUBTITLES:
        return PlainTextResponse(subtitle_text(result, fmt), media_type=MEDIA[fmt])
    body: dict[str, Any] = {"task": "transcribe", "language": language, "duration": round(result.duration, 3),
                            "text": result.text,
                            "segments": segment_bodies(verbose_segments(result, chunks), starts, windows)}
    if words:
        body["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)}
                         for w in result.words or []]
    body["usage"] = {"type": "duration", "seconds": round(result.duration, 3)}
    return JSONResponse(body)


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode("utf-8")


async def stream_events(windows: AsyncIterator[WindowResult | dict[str, Any]]) -> AsyncIterator[bytes]:
    """OpenAI's transcription stream: a ``transcript.text.delta`` as each chunk's text is decoded,
    then ``transcript.text.done`` with the whole text (the deltas joined: the json transcript).
    An error dict from ``windows`` (a timeout, a failed chunk) ends the stream as an error event,
    which the ``openai`` client raises as ``APIError``."""
    texts: list[str] = []
    async for window in windows:
        if isinstance(window, dict):
            yield sse(window)
            return
        if window.text:
            yield sse({"type": "transcript.text.delta", "delta": (" " if texts else "") + window.text})
            texts.append(window.text)
    yield sse({"type": "transcript.text.done", "text": " ".join(texts)})
