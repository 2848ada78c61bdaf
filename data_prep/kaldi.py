#!/usr/bin/env python3
"""Kaldi data dir -> manifest.

The same as `speechformer prepare kaldi`; the code and its documentation (layout read,
manifest fields, split rule) are in `speechformer/prepare/kaldi.py`. This script only lets a
checkout run it without installing the package.

Usage::

    python data_prep/kaldi.py DATA_DIR --out M.jsonl [--audio-root DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechformer.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["kaldi", *sys.argv[1:]]))
