"""Mozilla Common Voice (one language of one release) -> manifests.

A release folder, as the archive unpacks (``cv-corpus-17.0-2024-03-15/en/``)::

    train.tsv  dev.tsv  test.tsv  [validated.tsv other.tsv ...]  clips/common_voice_en_123.mp3 ...

Each requested split ``NAME.tsv`` becomes ``OUT/NAME.jsonl``:

* ``id``: the clip's file name without ``.mp3`` (``common_voice_en_123``), in the TSV's order;
* ``audio``: ``clips/PATH`` (relative to the manifest);
* ``duration``: from the MP3 header via libsndfile (>= 1.1 reads MP3), seconds to 3 decimals;
* ``text``: the ``sentence`` column with runs of whitespace collapsed (case and punctuation
  are left to :mod:`speechformer.text`, as for every corpus);
* ``speaker``: the ``client_id`` column (an anonymous hash per contributor).

The TSVs are read with quoting off (sentences contain bare ``"``), by column name, so
releases that add columns still work. Rows with an empty sentence are skipped and counted.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Sequence

from ..data import Utterance, write_manifest
from . import PrepareError, durations, report_skipped

SPLITS = ("train", "dev", "test")


def read_split(tsv: Path, clips: Path, jobs: int = 0) -> list[Utterance]:
    """Utterances of one Common Voice TSV."""
    csv.field_size_limit(sys.maxsize)
    rows: list[tuple[str, Path, str, str, str]] = []
    empty: list[str] = []
    with tsv.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise PrepareError(f"{tsv}: empty file")
        missing = [c for c in ("client_id", "path", "sentence") if c not in header]
        if missing:
            raise PrepareError(f"{tsv}:1: missing column(s) {', '.join(missing)}; is this a Common Voice TSV?")
        col = {name: header.index(name) for name in ("client_id", "path", "sentence")}
        seen: set[str] = set()
        for lineno, fields in enumerate(reader, 2):
            if not fields or not any(fields):
                continue
            where = f"{tsv}:{lineno}"
            if len(fields) < len(header):
                raise PrepareError(f"{where}: {len(fields)} columns, the header has {len(header)}")
            name = fields[col["path"]]
            uid = name[:-4] if name.endswith(".mp3") else Path(name).stem
            text = " ".join(fields[col["sentence"]].split())
            if not text:
                empty.append(uid)
                continue
            if uid in seen:
                raise PrepareError(f"{where}: clip {name} listed twice")
            seen.add(uid)
            audio = clips / name
            if not audio.is_file():
                raise PrepareError(f"{where}: {audio} not found; is the release fully extracted?")
            rows.append((uid, audio, text, fields[col["client_id"]], where))
    report_skipped(f"of {tsv.name} with an empty sentence", empty)
    secs = durations([r[1] for r in rows], jobs, where=lambda i: rows[i][4])
    return [Utterance(uid, audio, d, text, spk) for (uid, audio, text, spk, _), d in zip(rows, secs)]


def prepare_commonvoice(release: str | Path, out: str | Path, splits: Sequence[str] = SPLITS,
                        jobs: int = 0) -> dict[str, Path]:
    """Write ``OUT/SPLIT.jsonl`` for each ``SPLIT.tsv`` of the release folder; return the paths."""
    base = Path(release)
    clips = base / "clips"
    if not clips.is_dir():
        raise PrepareError(f"{base}: no clips/ folder; pass the language folder of a Common Voice release "
                           "(the one holding train.tsv and clips/)")
    written: dict[str, Path] = {}
    for split in splits:
        tsv = base / f"{split}.tsv"
        if not tsv.is_file():
            raise PrepareError(f"{tsv} not found; choose --splits among the .tsv files in {base}")
        utts = read_split(tsv, clips, jobs)
        if not utts:
            raise PrepareError(f"{tsv}: no row with a sentence")
        path = Path(out) / f"{split}.jsonl"
        write_manifest(path, utts)
        print(f"commonvoice: {split}: {len(utts)} utterances, {sum(u.duration for u in utts) / 3600:.2f} h, "
              f"{len({u.speaker for u in utts})} speakers -> {path}")
        written[split] = path
    return written
