#!/usr/bin/env python3
"""Training-step time of this checkout's model against a git revision's, side by side.

The revision's ``speechformer`` package is exported (``git archive``) into a temporary folder
under another name, so both models live in one process and are timed interleaved (the machines
are shared and noisy: a slow moment hits both sides of a round). The step is the one
``profile_step.py`` profiles (forward + backward + fused AdamW, precomputed features), at its
shapes; the ratio is the median of the per-round ratios base / this checkout (> 1: faster now).

    python benchmarks/step_ab.py --base main [--shape recipe s2t-small] [--precision bf16 fp32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, interleaved, markdown_table, median, ratio  # noqa: E402
from profile_step import SHAPES, build, make_step  # noqa: E402


def import_revision(rev: str, into: Path):
    """``speechformer`` at ``rev`` importable as the package ``sf_base`` (relative imports keep working)."""
    blob = subprocess.run(["git", "archive", rev, "speechformer"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    (into / "speechformer").rename(into / "sf_base")
    for path in (into / "sf_base").rglob("*.py"):  # absolute self-imports -> the copy
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("from speechformer", "from sf_base").replace("import speechformer",
                                                                                  "import sf_base"))
    sys.path.insert(0, str(into))
    return importlib.import_module("sf_base.model")


def base_tuned(model):
    """The base revision's model with its training tuning switched on, as its ``fit`` does: a
    revision with ``fastpath.tune_for_training`` needs the call, an older one tuned itself."""
    tune = getattr(importlib.import_module("sf_base.fastpath"), "tune_for_training", None)
    return tune(model) if tune is not None else model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="main", help="git revision to compare against")
    p.add_argument("--shape", nargs="+", default=["recipe", "s2t-small"], choices=list(SHAPES))
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: freed memory stays in the process (fastpath.keep_freed_memory, as fit does); "
                        "default: glibc's own behaviour")
    args = p.parse_args()

    import torch

    from speechformer.fastpath import flush_denormals, keep_freed_memory

    torch.set_num_threads(args.threads)
    flush_denormals()  # as fit and transcribe do (speechformer/fastpath.py)
    if args.malloc == "keep":
        keep_freed_memory()  # as fit does: process-wide, so for both sides of a comparison
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = import_revision(args.base, Path(tmp))
        for shape in args.shape:
            for precision in args.precision:
                model, data = build(shape)
                torch.manual_seed(0)
                old = base_tuned(base.SpeechTransformer(base.ModelConfig(**SHAPES[shape]["model"])).train())
                times = interleaved({"base": make_step(old, data, precision), "new": make_step(model, data, precision)},
                                    rounds=args.rounds)
                rows.append([f"{shape} {precision}", median(times["base"]) * 1e3, median(times["new"]) * 1e3,
                             ratio(times, "base", "new")])
                print(*rows[-1], sep="\t", flush=True)
    print(f"{args.threads} threads, {args.rounds} interleaved rounds, base = {args.base}\n")
    print(markdown_table(["shape, precision", f"{args.base} ms/step", "this checkout ms/step", "base / new x"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
