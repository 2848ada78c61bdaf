#!/usr/bin/env python3
"""LibriSpeech root -> one manifest per subset.

The same as `speechformer prepare librispeech`; the code and its documentation (layout read,
manifest fields, split rule) are in `speechformer/prepare/librispeech.py`. This script only lets a
checkout run it without installing the package.

Usage::

    python data_prep/librispeech.py ROOT --out DIR [--subsets train-clean-100,dev-clean,test-clean] [--download]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechformer.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["librispeech", *sys.argv[1:]]))
