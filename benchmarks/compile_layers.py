#!/usr/bin/env python3
"""Does ``torch.compile`` per layer (``model.compile: true``, ``SpeechTransformer.compile_layers``) pay
for itself in training, with its compile time counted?

For each shape (``profile_step.py``'s: the synthetic recipe's Conformer on 30 x 2.7 s, s2t-small on
8 x 10 s) and precision: the first compiled step (the compile), one step at a second input length
(``dynamic=True`` recompiles once there, then holds for all lengths; static compiles would repeat
it for every batch shape), then eager and compiled steps interleaved, and the number of steps
the compiled step must run to win back its compile time ("never" where it is not faster).
A recipe run is ~2,000 steps (8 epochs of 243 on the synthetic corpus).

    python benchmarks/compile_layers.py [--quick] [--rounds 5] [--shape recipe s2t-small] [--precision bf16 fp32]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import _parser, interleaved, markdown_table, median, ratio, record  # noqa: E402
from profile_step import SHAPES, build, make_step  # noqa: E402


def main() -> int:
    p = _parser(__doc__, "the recipe shape in bf16 only")
    p.add_argument("--shape", nargs="+", default=["recipe", "s2t-small"], choices=list(SHAPES))
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--static", action="store_true", help="compile_layers(dynamic=False): a graph per shape")
    args = p.parse_args()
    if args.quick:
        args.shape, args.precision, args.rounds = ["recipe"], ["bf16"], 1
    args.rounds = max(args.rounds, 1)

    import torch

    from speechformer.fastpath import flush_denormals, keep_freed_memory

    torch.set_num_threads(args.threads)
    flush_denormals()
    keep_freed_memory()  # as fit does
    rows = []
    for shape in args.shape:
        for precision in args.precision:
            torch._dynamo.reset()  # each column compiles from nothing, as a new training run does
            eager, data = build(shape)
            compiled = copy.deepcopy(eager).compile_layers(dynamic=not args.static)
            eager_step, compiled_step = make_step(eager, data, precision), make_step(compiled, data, precision)
            start = time.perf_counter()
            compiled_step()
            first = time.perf_counter() - start
            # another length: the shorter input a real batch has (dynamic shapes compile once more here)
            frames = data["feats"].shape[1] * 9 // 10
            other = dict(data, feats=data["feats"][:, :frames], frames=torch.full_like(data["frames"], frames))
            start = time.perf_counter()
            make_step(compiled, other, precision)()
            second = time.perf_counter() - start
            times = interleaved({"eager": eager_step, "compiled": compiled_step}, args.rounds)
            e, c = median(times["eager"]), median(times["compiled"])
            speedup = ratio(times, "eager", "compiled")
            pays = f"{(first + second) / (e - c):,.0f}" if c < e else "never"
            rows.append([f"{shape} {precision}", f"{first:.1f}", f"{second:.1f}", f"{e * 1e3:.0f}",
                         f"{c * 1e3:.0f}", f"{speedup:.2f}x", pays])
            print(rows[-1], flush=True)
    body = (f"{args.threads} threads, {args.rounds} interleaved rounds, "
            f"{'static' if args.static else 'dynamic'} shapes\n\n"
            + markdown_table(["step", "compile, s", "2nd length, s", "eager, ms", "compiled, ms",
                              "compiled speed-up", "steps to pay back"], rows))
    record("compile_layers", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
