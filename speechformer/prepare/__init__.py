"""Corpora on disk -> manifests: one module per corpus, one command per module.

``speechformer prepare librispeech|commonvoice|ljspeech|kaldi|to-kaldi`` and
``speechformer compute-stats`` (see :mod:`speechformer.prepare.cli`); the scripts in
``data_prep/`` call the same functions, so a checkout and an installed package behave alike.

Every preparer does the same three things and nothing else:

1. read the corpus's own index (``*.trans.txt``, ``*.tsv``, ``metadata.csv``, Kaldi files),
2. read each audio file's *header* for its duration (no decoding: a 960-hour corpus is
   listed in minutes, and a file libsndfile cannot open is found here, not mid-training),
3. write manifests with :func:`speechformer.data.write_manifest` (audio paths relative to
   the manifest, so corpus and manifests move together).

Text is kept as the corpus gives it (LibriSpeech's upper case is lowered); the toolkit
normalises text in one place (:mod:`speechformer.text`) for tokenizer, targets and scoring.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["PrepareError", "durations", "default_jobs", "report_skipped"]


class PrepareError(ValueError):
    """A corpus that cannot be prepared; the message names the file (and line) and what to do."""


def default_jobs() -> int:
    """Header reads are I/O bound: a few threads per core, at most 16."""
    return min(16, 4 * (os.cpu_count() or 1))


def durations(paths: Sequence[Path], jobs: int = 0, where: Callable[[int], str] | None = None) -> list[float]:
    """Durations (seconds) of ``paths`` from their headers, read by ``jobs`` threads.

    A missing or unreadable file raises :class:`PrepareError` naming it and, when
    ``where(i)`` is given, the index line that listed it.
    """
    from ..audio import AudioError, audio_info  # here, so `speechformer --help` does not import torch

    def one(i: int) -> float:
        try:
            return audio_info(paths[i])[3]
        except AudioError as err:
            prefix = f"{where(i)}: " if where is not None else ""
            raise PrepareError(f"{prefix}{err}") from err

    with ThreadPoolExecutor(max_workers=max(1, jobs or default_jobs())) as pool:
        return list(pool.map(one, range(len(paths))))


def report_skipped(reason: str, names: Iterable[str], shown: int = 5) -> None:
    """One stderr line per reason: how many rows were skipped and the first few names."""
    names = list(names)
    if names:
        head = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
        print(f"skipped {len(names)} row(s) {reason}: {head}", file=sys.stderr)
