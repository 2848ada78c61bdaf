#!/usr/bin/env python3
"""Training-step time of the synthetic recipe's model variants, side by side in one process.

Why: choosing the recipe's model is choosing accuracy per CPU-second, and the machines are shared
and noisy, so the variants are timed interleaved (a slow moment hits all of them) and reported as
ratios to the first one. The step is ``profile_step.py``'s (forward + backward + AdamW on
precomputed features, bf16 autocast), here with the recipe's gradient clipping and foreach AdamW.

    python benchmarks/recipe_variants.py                   # encoders and stems, 30 x 2.7 s
    python benchmarks/recipe_variants.py --batches 30 45 60  # the recipe's model at other batch sizes

Variants: ``transformer`` is conf/transformer.yaml's model (40 ms frames, 64-channel stem),
``conformer-80ms`` conf/train.yaml's (the default), and the steps between them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved, markdown_table, median  # noqa: E402
from profile_step import SHAPES  # noqa: E402

TRANSFORMER = SHAPES["recipe-transformer"]["model"]
CONFORMER = dict(encoder="conformer", d_ff=384, encoder_positions="sinusoidal+rotary", encoder_input_scale=True,
                 conformer_final_norm=False, conv_kernel_size=15, conv_norm="layer")
VARIANTS = {
    "transformer": {},
    "transformer-80ms": dict(subsampling_layers=3),
    "transformer-32ch": dict(subsampling_channels=32),
    "conformer-40ms": CONFORMER,
    "conformer-80ms-64ch": dict(CONFORMER, subsampling_layers=3),
    "conformer-80ms": dict(CONFORMER, subsampling_layers=3, subsampling_channels=32),
}


def make_step(overrides: dict, batch: int, frames: int = 270, tokens: int = 20):
    import torch

    from speechformer.model import ModelConfig, SpeechTransformer

    torch.manual_seed(0)
    model = SpeechTransformer(ModelConfig(**(TRANSFORMER | overrides))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    feats, lengths = torch.randn(batch, frames, 80), torch.full((batch,), frames)
    targets, target_lengths = torch.randint(4, 256, (batch, tokens)), torch.full((batch,), tokens)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            memory, mem_lengths = model.encode_features(feats, lengths)[:2]
            loss = model.losses(memory, mem_lengths, targets, target_lengths)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # the recipe clips at 5
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batches", nargs="+", type=int, help="time conformer-80ms at these batch sizes instead")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.batches:
        steps = {f"conformer-80ms, batch {b}": make_step(VARIANTS["conformer-80ms"], b) for b in args.batches}
        per = {name: b for name, b in zip(steps, args.batches)}
    else:
        steps = {name: make_step(VARIANTS[name], 30) for name in args.variants}
        per = {name: 30 for name in steps}
    times = interleaved(steps, args.rounds)
    first = next(iter(steps))
    rows = [[name, f"{median(times[name]) * 1e3:.0f}", f"{median(times[name]) / median(times[first]):.2f}",
             f"{median(times[name]) / per[name] * 1e3:.1f}"] for name in steps]
    print(f"{args.threads} threads, bf16 autocast, {args.rounds} interleaved rounds, utterances of 2.7 s")
    print(markdown_table(["variant", "ms / step", f"x {first}", "ms / utterance"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
