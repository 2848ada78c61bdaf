#!/usr/bin/env python3
"""Split one manifest into train/valid/test manifests by a fixed, documented rule.

Utterances are sorted by id; the i-th (counting from 0) goes to

* ``test``  when ``i % test_every == test_every - 1`` (every ``test_every``-th one),
* ``valid`` when it is not test and ``i % valid_every == 0``,
* ``train`` otherwise.

With the defaults (5 and 10) on ``../shared/data/kathleen_arctic_a`` (arctic_a0001 ...
arctic_a0593) that is: test = a0005, a0010, ..., a0590 (118 sentences), valid = a0001,
a0011, ..., a0591 (60), train = the other 415. Every sentence is in exactly one split, and
the split never changes between runs or machines. Audio paths are rewritten relative to
the output folder, so the manifests point at the original audio without copying it.

Usage::

    python data_prep/split.py --manifest M.jsonl --out DIR [--test-every 5] [--valid-every 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechformer.data import Utterance, read_manifest, write_manifest  # noqa: E402


def split(utts: list[Utterance], test_every: int = 5, valid_every: int = 10) -> dict[str, list[Utterance]]:
    if test_every < 2 or valid_every < 2:
        raise ValueError("--test-every and --valid-every must be at least 2")
    out: dict[str, list[Utterance]] = {"train": [], "valid": [], "test": []}
    for i, u in enumerate(sorted(utts, key=lambda u: u.id)):
        if i % test_every == test_every - 1:
            out["test"].append(u)
        elif i % valid_every == 0:
            out["valid"].append(u)
        else:
            out["train"].append(u)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="folder for train.jsonl, valid.jsonl, test.jsonl")
    p.add_argument("--test-every", type=int, default=5)
    p.add_argument("--valid-every", type=int, default=10)
    args = p.parse_args(argv)
    parts = split(read_manifest(args.manifest), args.test_every, args.valid_every)
    for name, utts in parts.items():
        write_manifest(Path(args.out) / f"{name}.jsonl", utts)
    print("split: " + ", ".join(f"{name} {len(u)} ({sum(x.duration for x in u) / 60:.1f} min)"
                                for name, u in parts.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
