"""LibriSpeech (OpenSLR 12) -> one manifest per subset.

The corpus as its archives unpack::

    ROOT/LibriSpeech/train-clean-100/103/1240/103-1240.trans.txt
    ROOT/LibriSpeech/train-clean-100/103/1240/103-1240-0000.flac ...

``ROOT`` may be the folder holding ``LibriSpeech/`` or ``LibriSpeech/`` itself. Each
subset found (``train-clean-100``, ``train-clean-360``, ``train-other-500``,
``dev-clean``, ``dev-other``, ``test-clean``, ``test-other``) becomes ``OUT/SUBSET.jsonl``:

* ``id``: the utterance id of ``trans.txt`` (``103-1240-0000``), rows sorted by id;
* ``audio``: the ``.flac`` beside the transcript (relative to the manifest);
* ``duration``: from the FLAC header (no decoding), seconds to 3 decimals;
* ``text``: the transcript lower-cased (the corpus is upper case without punctuation
  except apostrophes, so this is already what :func:`speechformer.text.normalize_text` gives);
* ``speaker``: the speaker id (the first field of the utterance id).

``--download`` fetches the subsets first from ``https://www.openslr.org/resources/12/``
(resumable, size- and SHA-256-checked, see :mod:`speechformer.prepare.download`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data import Utterance, write_manifest
from . import PrepareError, durations
from .download import download_and_extract

SUBSETS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean",
           "test-other")
MIRROR = "https://www.openslr.org/resources/12"
#: SHA-256 of the OpenSLR archives, as torchaudio.datasets.librispeech publishes them.
SHA256 = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}


def corpus_dir(root: Path) -> Path:
    """``ROOT/LibriSpeech`` if it exists, else ``ROOT``."""
    inner = Path(root) / "LibriSpeech"
    return inner if inner.is_dir() else Path(root)


def download(root: Path, subsets: Sequence[str], mirror: str = MIRROR, check: bool = True) -> None:
    """Fetch and unpack ``subsets`` into ``root`` (which then holds ``LibriSpeech/``)."""
    for name in subsets:
        if name not in SUBSETS:
            raise PrepareError(f"unknown LibriSpeech subset {name!r}; choose from {', '.join(SUBSETS)}")
        print(f"librispeech: {mirror}/{name}.tar.gz -> {root}")
        download_and_extract(f"{mirror.rstrip('/')}/{name}.tar.gz", Path(root),
                             SHA256.get(name) if check else None)


def read_subset(folder: Path, jobs: int = 0) -> list[Utterance]:
    """The utterances of one subset folder (``.../LibriSpeech/dev-clean``), sorted by id."""
    rows: list[tuple[str, Path, str, str, str]] = []  # id, flac, text, speaker, where
    for trans in sorted(folder.glob("*/*/*.trans.txt")):
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        expected = f"{speaker}-{chapter}-"
        with trans.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                uid, _, text = line.strip().partition(" ")
                where = f"{trans}:{lineno}"
                if not uid.startswith(expected):
                    raise PrepareError(f"{where}: utterance id {uid!r} does not start with {expected!r}; "
                                       "is this a LibriSpeech transcript?")
                if not text.strip():
                    raise PrepareError(f"{where}: empty transcript for {uid}")
                flac = trans.parent / f"{uid}.flac"
                if not flac.is_file():
                    raise PrepareError(f"{where}: {flac} not found; the subset is incomplete, extract it again")
                rows.append((uid, flac, " ".join(text.lower().split()), speaker, where))
    rows.sort(key=lambda r: r[0])
    secs = durations([r[1] for r in rows], jobs, where=lambda i: rows[i][4])
    return [Utterance(uid, flac, d, text, spk) for (uid, flac, text, spk, _), d in zip(rows, secs)]


def prepare_librispeech(root: str | Path, out: str | Path, subsets: Sequence[str] | None = None,
                        jobs: int = 0) -> dict[str, Path]:
    """Write ``OUT/SUBSET.jsonl`` for each subset under ``root`` (or each of ``subsets``).

    Returns {subset: manifest path}. Raises :class:`PrepareError` when a requested subset
    is missing or none is found.
    """
    base = corpus_dir(Path(root))
    if not base.is_dir():
        raise PrepareError(f"{root}: not a folder; pass the folder that holds LibriSpeech/ (or add --download)")
    wanted = list(subsets) if subsets else [s for s in SUBSETS if (base / s).is_dir()]
    if not wanted:
        raise PrepareError(f"{base}: no LibriSpeech subset folder ({', '.join(SUBSETS)}) found; "
                           "pass the folder the archives were extracted into, or add --download")
    written: dict[str, Path] = {}
    for name in wanted:
        folder = base / name
        if not folder.is_dir():
            raise PrepareError(f"{folder}: subset {name} not found; extract {name}.tar.gz there or add --download")
        utts = read_subset(folder, jobs)
        if not utts:
            raise PrepareError(f"{folder}: no SPEAKER/CHAPTER/*.trans.txt transcripts found")
        path = Path(out) / f"{name}.jsonl"
        write_manifest(path, utts)
        hours = sum(u.duration for u in utts) / 3600
        print(f"librispeech: {name}: {len(utts)} utterances, {hours:.2f} h, "
              f"{len({u.speaker for u in utts})} speakers -> {path}")
        written[name] = path
    return written
