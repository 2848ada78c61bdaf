"""Writing transcripts without losing any: their formats (text, tsv, json, srt, vtt), safe file
names, atomic files, a resume journal.

A transcription run over 10,000 files that is killed at file 9,000 should cost one file,
not 9,000. Every finished transcript is appended to a journal (one JSON line, flushed and
fsynced) next to the outputs; ``speechformer transcribe --resume`` reads it back and only
decodes what is missing. Output files are written to a temporary name and renamed, so a
kill leaves either the old file or the new one. Names built from utterance ids (which come
from manifests, i.e. from anyone) are sanitised: an id cannot climb out of the output folder.
Before anything is written (and before a model is loaded), :func:`check_output_files` and
:func:`prepare_output_dir` refuse an output path that is one of the inputs or an existing
audio file: ``--output in/*.flac``, expanded by the shell, must not replace a recording.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import soundfile as sf

from .atomic import atomic_write_text
from .audio import AUDIO_EXTENSIONS
from .timestamps import Segment, Word, format_srt, format_vtt, segment_cues, words_to_cues
from .inputs import Inputs
from .transcribe import AudioItem, TranscriptResult

SUBTITLE_FORMATS = ("srt", "vtt")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')


#: Audio a user may keep beside their data; an output never replaces one (with those soundfile reads).
_AUDIO_SUFFIXES = frozenset(AUDIO_EXTENSIONS) | {".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".aif",
                                                 ".aiff", ".wma", ".webm", ".au", ".caf", ".w64", ".sph"}


class OutputPathError(ValueError):
    """An output path that must not be written; the message is one line naming the flag and the path."""


def is_audio_file(path: str | os.PathLike[str]) -> bool:
    """An existing file that is audio: by its extension, or because soundfile reads its header
    (a recording saved without an extension, or under a text name)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() in _AUDIO_SUFFIXES:
        return True
    try:
        sf.info(str(p))
    except Exception:  # noqa: BLE001 - anything soundfile cannot open is not audio to it
        return False
    return True


def _file_id(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Device and inode: the same file under any spelling (``./x.wav``, a symlink, a hard link)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output_files(paths: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str]] = (), *,
                       flag: str, give: str) -> None:
    """Refuse, before any work, to write a file over one of ``inputs`` or over an existing audio file.

    ``flag`` names the option the path came from, ``give`` what to pass instead ("a .txt or
    .json path"). Raises :class:`OutputPathError` for the first such path. Existing other files
    (an earlier transcript) may be replaced: that is what an output is for.
    """
    taken = {i for i in map(_file_id, inputs) if i is not None}
    for path in paths:
        what = f"{flag} {path}"
        if Path(path).is_dir():
            raise OutputPathError(f"{what}: is a folder; give {give}")
        if _file_id(path) in taken:
            raise OutputPathError(f"{what}: is also an input (it would be overwritten); give {give}")
        if is_audio_file(path):
            raise OutputPathError(f"{what}: is an existing audio file (it would be overwritten); did a shell glob "
                                  f"expand into {flag}? give {give}")


def prepare_output_dir(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (), *,
                       flag: str) -> Path:
    """Create the output folder ``path`` and make sure files can be written in it, before any work.

    One line naming the folder instead of raw errno text after hours of transcribing: a path
    that is a file (an input, a recording), a folder that cannot be created or written to.
    """
    folder = Path(path)
    what = f"{flag} {path}"
    if _file_id(folder) in {i for i in map(_file_id, inputs) if i is not None}:
        raise OutputPathError(f"{what}: is also an input; give a new folder")
    if folder.exists() and not folder.is_dir():
        kind = "an existing audio file" if is_audio_file(folder) else "a file"
        raise OutputPathError(f"{what}: is {kind}, not a folder; give a folder path (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".speechformer-write-test-"):
            pass
    except OSError as err:
        raise OutputPathError(f"{what}: cannot write there ({err.strerror or err}); give a folder you can write to, "
                              "or fix its permissions") from err
    return folder


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


def subtitle_text(result: TranscriptResult, fmt: str) -> str:
    """Cues from Whisper's segments (one per segment), or from CTC word times."""
    cues = segment_cues(result.segments, result.duration) if result.segments is not None else \
        words_to_cues(result.words or [], duration=result.duration)
    return format_srt(cues) if fmt == "srt" else format_vtt(cues)


def format_results(results: list[TranscriptResult], fmt: str) -> str:
    """All results in one ``--format``: text lines, tsv, json, or one file's subtitles."""
    if fmt in SUBTITLE_FORMATS:  # one file (several need --output-dir: checked before transcribing)
        return "".join(subtitle_text(r, fmt) for r in results if r.ok)
    if fmt == "json":
        rows = []
        for r in results:
            row = {"id": r.key} if r.key != str(r.path) else {}  # a manifest's utterances keep their ids
            if not r.ok:
                rows.append(row | {"path": str(r.path), "error": r.error})
                continue
            row |= {"path": str(r.path), "text": r.text, "duration": round(r.duration, 3)}
            if r.words is not None:
                row["words"] = [w.to_dict() for w in r.words]
            if r.segments is not None:
                row["segments"] = [s.to_dict() for s in r.segments]
            rows.append(row)
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt == "tsv":
        lines = ["path\ttext"] + [f"{r.key}\t{r.text}" for r in results if r.ok]
        return "\n".join(lines) + "\n"
    return "".join(f"{r.text}\n" for r in results if r.ok)


RERUN_RESUME = "re-run with --resume"  # a full disk mid-run: the finished files are kept
#: Files decoded together when no journal keeps them (nothing is lost by a larger window).
UNJOURNALLED_WINDOW = 256


class TranscriptWriter:
    """Where the results of one ``speechformer transcribe`` run go, as the Transcriber yields them.

    Built before the model loads, it refuses at once what would fail or destroy later: several
    files' subtitles without ``output_dir``, ``resume`` with nowhere to keep the finished work,
    an output that is an input or a recording. With a file output (``output`` or ``output_dir``)
    every finished transcript is journalled as soon as it is added, so a killed run re-run with
    ``resume`` only decodes :attr:`todo`; ``output_dir`` also gets one file per input at once.
    :meth:`finish` writes the whole output in the inputs' order and says how many failed.
    """

    def __init__(self, inputs: Inputs, fmt: str = "text", output: str | None = "-", output_dir: str | None = None,
                 resume: bool = False, flush_every: int = 64) -> None:
        items = inputs.items
        self.inputs, self.fmt, self.output_dir = inputs, fmt, output_dir
        self.output = output if output and output != "-" else None  # None: standard output
        self.subtitles = fmt in SUBTITLE_FORMATS
        if self.subtitles and len(items) > 1 and not output_dir:
            raise ValueError(f"--format {fmt} writes one subtitle file per audio file: give --output-dir for "
                             f"{len(items)} files (or transcribe one file)")
        if resume and not (self.output or output_dir):
            raise ValueError("--resume needs --output FILE or --output-dir DIR (where the finished work is kept)")
        self.names = output_names([it.key for it in items], stems=inputs.from_files) if output_dir else {}
        self._check_paths()
        self.journal = self._open_journal(resume)
        self.results: dict[str, TranscriptResult] = dict(self.journal.done) if self.journal is not None else {}
        #: What is left to transcribe: neither finished by an earlier run nor already known to fail.
        self.todo: list[AudioItem] = [it for it in items if it.key not in self.results and it.key not in inputs.failed]
        #: Files decoded together before their transcripts are added (a kill loses at most these).
        self.window = flush_every if self.journal is not None else UNJOURNALLED_WINDOW
        self.failed = 0
        self._unreported = list(inputs.failed.values())

    def _check_paths(self) -> None:
        """No output replaces an input (or the manifest) or an existing audio file; the folder is writable."""
        sources = self.inputs.sources
        if self.output:
            check_output_files([self.output], sources, flag="--output",
                               give=f"a new .{'txt' if self.fmt == 'text' else self.fmt} path")
        if self.output_dir:
            prepare_output_dir(self.output_dir, sources, flag="--output-dir")
            check_output_files((self._file_of(it.key) for it in self.inputs.items), sources, flag="--output-dir",
                               give="another --output-dir")

    def _file_of(self, key: str) -> Path:
        """``output_dir``'s file for one input: NAME.txt, or NAME.srt / NAME.vtt."""
        ext = self.fmt if self.subtitles else "txt"
        return Path(self.output_dir or ".") / f"{self.names[key]}.{ext}"

    def _open_journal(self, resume: bool) -> TranscriptJournal | None:
        """The journal beside the output (none when the output is standard output)."""
        if self.output_dir:
            where = Path(self.output_dir) / ".speechformer-progress.jsonl"
        elif self.output:
            where = Path(self.output).with_name(Path(self.output).name + ".progress.jsonl")
        else:
            return None
        journal = TranscriptJournal(where, resume=resume)
        if resume:
            items = self.inputs.items
            print(f"transcribe: resuming, {sum(it.key in journal.done for it in items)} of {len(items)} "
                  "already done", file=sys.stderr)
        return journal

    def add(self, result: TranscriptResult) -> None:
        """One finished result: a failure is reported, a transcript written to its file and journalled."""
        self._report_known_failures()
        self._add(result)

    def _report_known_failures(self) -> None:
        """The inputs known to fail from the start, reported once the model has loaded (a model that
        fails to load is then the one line printed)."""
        unreported, self._unreported = self._unreported, []
        for result in unreported:
            self._add(result)

    def _add(self, result: TranscriptResult) -> None:
        # a file finished by an earlier run and gone since is counted as failed, and keeps its transcript
        self.results.setdefault(result.key, result)
        if not result.ok:
            self.failed += 1
            print(f"error: {result.error}", file=sys.stderr)
            return
        if self.output_dir:
            text = subtitle_text(result, self.fmt) if self.subtitles else result.text + "\n"
            atomic_write_text(self._file_of(result.key), text, rerun=RERUN_RESUME)
        if self.journal is not None:
            self.journal.record(result)

    def finish(self) -> int:
        """Write the whole output (one file's subtitles, or every result in ``fmt``), close the
        journal (removed when nothing failed) and return the exit status: 1 if any file failed."""
        self._report_known_failures()
        results = [self.results[it.key] for it in self.inputs.items]
        if not (self.subtitles and len(results) > 1):
            text = format_results(results, self.fmt)
            if self.output:
                atomic_write_text(self.output, text, rerun=RERUN_RESUME)
            else:
                sys.stdout.write(text)
        if self.journal is not None:
            self.journal.close(finished=not self.failed)
        if self.failed:
            print(f"transcribe: {len(results) - self.failed} of {len(results)} file(s) transcribed, {self.failed} "
                  "failed" + (" (re-run with --resume to retry only those)" if self.journal is not None else ""),
                  file=sys.stderr)
            return 1
        return 0
