#!/usr/bin/env python3
"""fp32 inference matmuls on CPU: PyTorch's default path (MKL sgemm behind ``addmm``) against
the oneDNN paths PyTorch offers, on the shapes speechformer runs, checked for equal results.

Paths: ``F.linear`` (default); ``torch.utils.mkldnn.to_mkldnn`` (``MkldnnLinear``: oneDNN
weight, dense input converted per call); ``torch.ops.mkldnn._linear_pointwise`` with a weight
prepacked by ``_reorder_linear_weight`` (what inductor's CPU freezing uses). The toolkit uses
oneDNN for inference only where it is faster than the default on these shapes.

    python benchmarks/cpu_matmul.py [--quick] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, markdown_table, median, ratio, record  # noqa: E402

SHAPES = [  # (rows, in, out, where)
    (4 * 1500, 384, 1536, "Whisper tiny encoder FFN, 4 windows"),
    (4 * 1500, 384, 384, "Whisper tiny encoder attention projection, 4 windows"),
    (16, 384, 51864, "Whisper tiny de-embedding, 16 rows"),
    (16, 384, 1536, "decoder step FFN, 16 rows"),
    (40 * 70, 192, 768, "synthetic recipe encoder FFN, batch 40 x 2.8 s"),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds (not recorded)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.rounds = 2

    import torch
    import torch.nn.functional as F
    from torch.utils.mkldnn import MkldnnLinear

    torch.set_num_threads(args.threads)
    rows, ratios = [], []
    with torch.inference_mode():
        for n, k, m, where in SHAPES:
            x = torch.randn(n, k)
            lin = torch.nn.Linear(k, m).eval()
            mk = MkldnnLinear(lin, torch.float32)
            packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight, n)
            paths = {
                "default (MKL)": lambda: F.linear(x, lin.weight, lin.bias),
                "oneDNN MkldnnLinear": lambda: mk(x),
                "oneDNN prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, lin.bias, "none", [], ""),
            }
            ref = paths["default (MKL)"]()
            err = max(float((f() - ref).abs().max()) for f in paths.values())
            reps = max(1, int(2e9 / (2 * n * k * m)))

            def repeat(f):
                return lambda: [f() for _ in range(reps)]

            times = interleaved({name: repeat(f) for name, f in paths.items()}, rounds=args.rounds)
            flops = 2 * n * k * m * reps
            for name, ts in times.items():
                rows.append([where, name, flops / median(ts) / 1e9])
            best = max(("oneDNN MkldnnLinear", "oneDNN prepacked"), key=lambda q: ratio(times, "default (MKL)", q))
            ratios.append([where, best, ratio(times, "default (MKL)", best), f"{err:.1e}"])
    body = (f"fp32, {args.threads} threads, {args.rounds} interleaved rounds.\n\n"
            + markdown_table(["shape", "path", "GFLOP/s"], rows)
            + "\n\n" + markdown_table(["shape", "best oneDNN path", "speed vs default (x)", "max |diff|"], ratios))
    record("cpu_matmul", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
