"""Writing transcripts without losing any: safe file names, atomic files, a resume journal.

A transcription run over 10,000 files that is killed at file 9,000 should cost one file,
not 9,000. Every finished transcript is appended to a journal (one JSON line, flushed and
fsynced) next to the outputs; ``speechformer transcribe --resume`` reads it back and only
decodes what is missing. Output files are written to a temporary name and renamed, so a
kill leaves either the old file or the new one. Names built from utterance ids (which come
from manifests, i.e. from anyone) are sanitised: an id cannot climb out of the output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from .timestamps import Segment, Word
from .transcribe import TranscriptResult

_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')


def safe_name(name: str, max_len: int = 120) -> str:
    """A single file-name component made from an id or a file stem.

    Folder separators, control characters and characters Windows forbids become ``_``;
    leading dots and spaces go (no hidden files, no ``..``). When anything had to change,
    or the name is too long, a short hash of the original is appended, so two different ids
    never map to the same file.
    """
    cleaned = _UNSAFE.sub("_", name).strip(" .")
    if cleaned == name and 0 < len(cleaned) <= max_len:
        return cleaned
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned[:max_len] or 'utt'}-{digest}"


def output_names(keys: Iterable[str], stems: bool) -> dict[str, str]:
    """File names (without extension) for results, unique within one folder.

    ``stems``: keys are file paths and the name is the file's stem (``a/b/x.wav`` -> ``x``);
    stems that occur twice get the hash suffix. Otherwise keys are ids, used as they are.
    """
    keys = list(keys)
    base = {k: (Path(k).stem if stems else k) for k in keys}
    counts: dict[str, int] = {}
    for name in base.values():
        counts[name] = counts.get(name, 0) + 1
    names = {}
    for k in keys:
        name = base[k]
        names[k] = safe_name(name if counts[name] == 1 else f"{name}/{k}")
    return names


class TranscriptJournal:
    """Finished transcripts of a run, one JSON line each, durable as soon as they are written.

    ``resume=False`` starts a new journal (an old one is discarded); ``resume=True`` keeps the
    transcripts already in it. Files that failed are not recorded: a resumed run tries them
    again. A torn last line (the process died while writing it) is ignored.
    """

    def __init__(self, path: str | Path, resume: bool) -> None:
        self.path = Path(path)
        self.done: dict[str, TranscriptResult] = {}
        if resume and self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    words = [Word(**w) for w in row["words"]] if row.get("words") is not None else None
                    segments = [Segment(**s) for s in row["segments"]] if row.get("segments") is not None else None
                    self.done[row["key"]] = TranscriptResult(row["key"], Path(row["path"]), row["text"],
                                                             duration=float(row.get("duration", 0.0)), words=words,
                                                             segments=segments)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self._file = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 - closed in close()
        if resume and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # end a torn line so the next record starts cleanly

    def record(self, result: TranscriptResult) -> None:
        if not result.ok:
            return
        row = {"key": result.key, "path": str(result.path), "text": result.text, "duration": round(result.duration, 3)}
        if result.words is not None:
            row["words"] = [w.to_dict() for w in result.words]
        if result.segments is not None:
            row["segments"] = [s.to_dict() for s in result.segments]
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[result.key] = result

    def close(self, finished: bool) -> None:
        """Close; a finished run's journal is removed (its outputs are complete)."""
        self._file.close()
        if finished:
            self.path.unlink(missing_ok=True)
