"""LJSpeech 1.1 (one speaker reading 7 non-fiction books, 13,100 clips, ~24 h) -> manifests.

The corpus folder (``LJSpeech-1.1/``)::

    metadata.csv     LJ001-0001|raw text|normalized text     (``|``-separated, no quoting)
    wavs/LJ001-0001.wav ...

Manifest fields: ``id`` the clip id, ``audio`` ``wavs/ID.wav``, ``duration`` from the wav
header, ``text`` the *normalized* column (numbers, abbreviations and units written out as
spoken: "1869" -> "eighteen sixty-nine"; the raw column when the normalized one is empty),
``speaker`` ``LJ``.

The corpus has no official split, so this one is fixed and documented (``--valid``/``--test``
change the sizes): the clips are sorted by id; the **last 250 go to test**, the **250 before
them to valid**, and the other 12,600 to train. Ids run book by book (``LJ001`` ... ``LJ050``),
so valid and test come from the last book(s) (``LJ049``/``LJ050``: text the model never reads
in training, the same voice), and the split never changes between runs or machines.
"""

from __future__ import annotations

from pathlib import Path

from ..data import Utterance, write_manifest
from . import PrepareError, durations

SPEAKER = "LJ"


def read_metadata(root: Path, jobs: int = 0) -> list[Utterance]:
    """All clips of ``root/metadata.csv``, sorted by id."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise PrepareError(f"{meta} not found; pass the LJSpeech-1.1 folder (metadata.csv and wavs/)")
    rows: list[tuple[str, Path, str, str]] = []
    seen: set[str] = set()
    with meta.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            where = f"{meta}:{lineno}"
            fields = line.split("|")
            if len(fields) < 2:
                raise PrepareError(f"{where}: expected ID|text|normalized text")
            uid = fields[0].strip()
            text = " ".join((fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]).split())
            if not text:
                raise PrepareError(f"{where}: empty transcript for {uid}")
            if uid in seen:
                raise PrepareError(f"{where}: id {uid} listed twice")
            seen.add(uid)
            wav = root / "wavs" / f"{uid}.wav"
            if not wav.is_file():
                raise PrepareError(f"{where}: {wav} not found; is the corpus fully extracted?")
            rows.append((uid, wav, text, where))
    rows.sort(key=lambda r: r[0])
    secs = durations([r[1] for r in rows], jobs, where=lambda i: rows[i][3])
    return [Utterance(uid, wav, d, text, SPEAKER) for (uid, wav, text, _), d in zip(rows, secs)]


def split(utts: list[Utterance], valid: int = 250, test: int = 250) -> dict[str, list[Utterance]]:
    """The documented split (see the module docstring) of id-sorted ``utts``."""
    if valid < 0 or test < 0 or valid + test >= len(utts):
        raise PrepareError(f"cannot hold out {valid} valid + {test} test clips of {len(utts)}")
    utts = sorted(utts, key=lambda u: u.id)
    n_train = len(utts) - valid - test
    return {"train": utts[:n_train], "valid": utts[n_train:n_train + valid], "test": utts[n_train + valid:]}


def prepare_ljspeech(root: str | Path, out: str | Path, valid: int = 250, test: int = 250,
                     jobs: int = 0) -> dict[str, Path]:
    """Write ``OUT/{train,valid,test}.jsonl``; return the paths."""
    parts = split(read_metadata(Path(root), jobs), valid, test)
    written: dict[str, Path] = {}
    for name, utts in parts.items():
        if not utts:  # --valid 0 / --test 0
            continue
        path = Path(out) / f"{name}.jsonl"
        write_manifest(path, utts)
        span = f"{utts[0].id} .. {utts[-1].id}"
        print(f"ljspeech: {name}: {len(utts)} clips ({span}), {sum(u.duration for u in utts) / 3600:.2f} h -> {path}")
        written[name] = path
    return written
