#!/usr/bin/env python3
"""A manifest -> Kaldi data dir.

The same as `speechformer prepare to-kaldi`; the code and its documentation (layout read,
manifest fields, split rule) are in `speechformer/prepare/kaldi.py`. This script only lets a
checkout run it without installing the package.

Usage::

    python data_prep/to_kaldi.py M.jsonl --out DATA_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechformer.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["to-kaldi", *sys.argv[1:]]))
