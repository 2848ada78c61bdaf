#!/usr/bin/env python3
"""LJSpeech-1.1 -> train/valid/test manifests (fixed split).

The same as `speechformer prepare ljspeech`; the code and its documentation (layout read,
manifest fields, split rule) are in `speechformer/prepare/ljspeech.py`. This script only lets a
checkout run it without installing the package.

Usage::

    python data_prep/ljspeech.py LJSPEECH_DIR --out DIR [--valid 250 --test 250]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechformer.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ljspeech", *sys.argv[1:]]))
