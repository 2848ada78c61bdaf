#!/usr/bin/env python3
"""Make a JSON-lines manifest from a folder of audio files with transcripts beside them.

Why: the simplest way to bring your own data is a folder tree where ``a/b/x.wav`` has
its transcript in ``a/b/x.txt``. This script turns such a tree into the manifest
format the toolkit reads (the same one ``data_prep/synthetic.py`` writes)::

    {"id": "a_b_x", "audio": "audio/a/b/x.wav", "duration": 2.345,
     "text": "the transcript", "speaker": "b"}

* ``id``: the path relative to ``--audio-dir`` without its extension, with path
  separators replaced by ``_``.
* ``audio``: relative to the manifest's folder (so the data and the manifest can
  move together), or absolute where no relative path exists (another drive).
* ``duration``: seconds from ``soundfile.info``, rounded to 3 decimals.
* ``text``: the .txt file's content with surrounding whitespace stripped and runs
  of whitespace (including line breaks) collapsed to one space. No other
  normalisation happens here; the toolkit normalises text in one place.
* ``speaker``: the name of the folder that holds the audio file.

Audio files without a transcript, with an empty transcript or that soundfile cannot
read are skipped and reported on stderr (count and first few names). When two files
share a stem (``x.wav`` and ``x.flac``), the extension listed first wins.

Usage::

    python data_prep/folder.py --audio-dir DIR --out manifest.jsonl [--extensions wav,flac,ogg,mp3]

Exit status: 0 with at least one utterance written, 1 when none was found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import soundfile

DEFAULT_EXTENSIONS: tuple[str, ...] = ("wav", "flac", "ogg", "mp3")
_SHOWN = 5  # how many skipped names to print per reason


def _relative_audio_path(audio: Path, manifest_dir: Path) -> str:
    """Path of ``audio`` relative to ``manifest_dir``, or absolute if impossible."""
    try:
        return Path(os.path.relpath(audio, manifest_dir)).as_posix()
    except ValueError:  # e.g. different drives on Windows
        return audio.as_posix()


def _report(reason: str, names: Sequence[str]) -> None:
    if names:
        shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
        print(f"skipped {len(names)} audio file(s) {reason}: {shown}", file=sys.stderr)


def find_audio(audio_dir: Path, extensions: Sequence[str]) -> list[Path]:
    """Audio files under ``audio_dir``, sorted, one per stem (earlier extension wins)."""
    rank = {ext.lower().lstrip("."): i for i, ext in enumerate(extensions)}
    best: dict[Path, Path] = {}
    for path in audio_dir.rglob("*"):
        ext = path.suffix.lower().lstrip(".")
        if ext not in rank or not path.is_file():
            continue
        stem = path.with_suffix("")
        current = best.get(stem)
        if current is None or rank[ext] < rank[current.suffix.lower().lstrip(".")]:
            best[stem] = path
    return sorted(best.values())


def build_manifest(
    audio_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
) -> int:
    """Write the manifest for ``audio_dir`` to ``out_path``; return the number of lines.

    Nothing is written when no audio file has a usable transcript (returns 0).
    """
    root = Path(audio_dir).resolve()
    out = Path(out_path)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {audio_dir}")
    manifest_dir = out.parent.resolve()
    records: list[dict[str, object]] = []
    no_text: list[str] = []
    empty_text: list[str] = []
    unreadable: list[str] = []
    for audio in find_audio(root, extensions):
        rel = audio.relative_to(root)
        transcript = audio.with_suffix(".txt")
        if not transcript.is_file():
            no_text.append(rel.as_posix())
            continue
        text = " ".join(transcript.read_text(encoding="utf-8").split())
        if not text:
            empty_text.append(rel.as_posix())
            continue
        try:
            duration = soundfile.info(str(audio)).duration
        except RuntimeError:  # soundfile.LibsndfileError and friends
            unreadable.append(rel.as_posix())
            continue
        records.append(
            {
                "id": "_".join(rel.with_suffix("").parts),
                "audio": _relative_audio_path(audio, manifest_dir),
                "duration": round(duration, 3),
                "text": text,
                "speaker": audio.parent.name,
            }
        )
    _report("without a .txt transcript", no_text)
    _report("with an empty transcript", empty_text)
    _report("that soundfile cannot read", unreadable)
    if not records:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description="Build a JSON-lines manifest from audio files with .txt transcripts."
    )
    parser.add_argument("--audio-dir", required=True, help="folder searched recursively")
    parser.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    parser.add_argument(
        "--extensions",
        default=",".join(DEFAULT_EXTENSIONS),
        help="comma-separated audio extensions (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    extensions = [e.strip() for e in args.extensions.split(",") if e.strip()]
    try:
        count = build_manifest(args.audio_dir, args.out, extensions)
    except NotADirectoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if count == 0:
        print(
            f"error: no audio file ({', '.join(extensions)}) with a transcript found "
            f"under {args.audio_dir}",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {count} utterances to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
