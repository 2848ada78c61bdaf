#!/usr/bin/env python3
"""Common Voice release folder -> train/dev/test manifests.

The same as `speechformer prepare commonvoice`; the code and its documentation (layout read,
manifest fields, split rule) are in `speechformer/prepare/commonvoice.py`. This script only lets a
checkout run it without installing the package.

Usage::

    python data_prep/commonvoice.py RELEASE_LANG_DIR --out DIR [--splits train,dev,test]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechformer.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["commonvoice", *sys.argv[1:]]))
