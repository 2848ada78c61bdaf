"""What one transcription run reads: audio files, folders and globs, or a manifest's utterances.

Collected before any model is loaded, so that a run over thousands of files knows them all at
once: their order (the output's), which of them are already known to fail (a missing path, a
link loop, a pattern that matches nothing: each reported by name like an unreadable file,
while the rest are transcribed), and every file an output must never replace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .audio import find_audio_paths
from .transcribe import AudioItem, TranscriptResult


@dataclass
class Inputs:
    """The items of one run in order; ``failed``, by key, the results of those known to fail
    from the start; ``from_files``: the keys are file paths (an output file is named after its
    stem), not a manifest's ids; ``manifest``: the manifest they came from, if any."""

    items: list[AudioItem]
    failed: dict[str, TranscriptResult]
    from_files: bool
    manifest: str | None = None

    @property
    def sources(self) -> list[str | Path]:
        """Every file the run reads (the audio and the manifest): no output may replace one."""
        return [it.path for it in self.items] + ([self.manifest] if self.manifest else [])


def utterance_items(utterances: Iterable[Any]) -> list[AudioItem]:
    """A manifest's utterances as items, keyed by id (a segment, one with an offset, reads only its duration)."""
    return [AudioItem(u.id, u.audio, u.offset, u.duration if u.offset else None) for u in utterances]


def collect_inputs(paths: Sequence[str | Path] = (), manifest: str | None = None) -> Inputs:
    """The audio files, folders and globs of ``paths`` (:func:`~speechformer.audio.find_audio_paths`),
    or the utterances (segments) of a JSONL ``manifest``; one or the other."""
    if manifest:
        if paths:
            raise ValueError("give audio inputs or --manifest, not both")
        from .data import read_manifest

        return Inputs(utterance_items(read_manifest(manifest, require_text=False)), {}, False, manifest)
    if not paths:
        raise ValueError("nothing to transcribe: give audio files, folders or globs (or --manifest)")
    items, failed = [], {}
    for p in find_audio_paths(paths):
        if isinstance(p, Path):
            items.append(AudioItem(str(p), p))
        elif p.path not in failed:  # the same bad path twice is one failure
            failed[p.path] = TranscriptResult(p.path, Path(p.path), error=str(p))
            items.append(AudioItem(p.path, Path(p.path)))
    return Inputs(items, failed, True)
