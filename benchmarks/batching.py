#!/usr/bin/env python3
"""Batching on real lengths: the duration-bucketing sampler against random batches.

Durations come from the synthetic corpus (generated here with the recipe's generator, or read
from ``--manifest``). Both samplers make the same number of batches over the same utterances;
"random" is a shuffled order cut into equal-count batches, what a plain DataLoader does. For
each: the padded fraction of frames (padding / all frames computed), and the time of one
training epoch of the synthetic recipe's model on those batch shapes (random features of the
right lengths, forward + backward + AdamW, bf16 autocast as the recipe trains).

    python benchmarks/batching.py [--quick] [--utterances 1500] [--manifest M.jsonl] [--threads 2]

Target: padded fraction under 10% with the bucketing sampler.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, markdown_table, record  # noqa: E402


def padded_fraction(batches: list[list[int]], durations: list[float]) -> float:
    real = sum(durations[i] for b in batches for i in b)
    computed = sum(max(durations[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / computed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300 utterances (not recorded)")
    p.add_argument("--utterances", type=int, default=1500)
    p.add_argument("--manifest", default=None, help="take the durations from this manifest instead")
    p.add_argument("--max-batch-seconds", type=float, default=80.0, help="the synthetic recipe's batch")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.utterances = 300

    import torch

    from speechformer.data import DurationBatchSampler, read_manifest
    from speechformer.fastpath import flush_denormals, tune_for_training
    from speechformer.model import ModelConfig, SpeechTransformer

    torch.set_num_threads(args.threads)
    flush_denormals()  # as fit and transcribe do (speechformer/fastpath.py)
    if args.manifest:
        durations = [u.duration for u in read_manifest(args.manifest)]
        source = args.manifest
    else:
        sys.path.insert(0, str(ROOT / "data_prep"))
        import synthetic

        out = Path(tempfile.mkdtemp(prefix="sf_batching_"))
        synthetic.generate_corpus(out, num_train=args.utterances, num_valid=2, num_test=2, seed=11, jobs=2)
        durations = [u.duration for u in read_manifest(out / "train.jsonl")]
        source = f"synthetic corpus, {len(durations)} utterances"
    bucketed = list(DurationBatchSampler(durations, args.max_batch_seconds, seed=0))
    order = list(range(len(durations)))
    random.Random(0).shuffle(order)
    size = -(-len(order) // len(bucketed))
    shuffled = [order[i:i + size] for i in range(0, len(order), size)]

    # the synthetic recipe's model (recipes/synthetic/conf/train.yaml)
    model = SpeechTransformer(ModelConfig(
        vocab_size=256, d_model=192, n_heads=4, d_ff=768, n_encoder_layers=6, n_decoder_layers=3,
        subsampling_channels=64, dropout=0.0, ctc_weight=0.5, specaug_freq_masks=0, specaug_time_masks=0)).train()
    tune_for_training(model)  # as fit does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def epoch(batches: list[list[int]]) -> float:
        start = time.perf_counter()
        for b in batches:
            frames = int(max(durations[i] for i in b) * 100)
            lengths = torch.tensor([int(durations[i] * 100) for i in b])
            tokens = torch.randint(4, 256, (len(b), max(2, frames // 25)))
            token_lengths = (lengths // 25).clamp(min=1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                memory, mem_lengths = model.encode_features(torch.randn(len(b), frames, 80), lengths)
                loss = model.losses(memory, mem_lengths, tokens, token_lengths)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    epoch(bucketed[:3])  # warm-up
    t_random, t_bucketed = epoch(shuffled), epoch(bucketed)
    rows = [["random batches", len(shuffled), padded_fraction(shuffled, durations) * 100, t_random],
            ["DurationBatchSampler", len(bucketed), padded_fraction(bucketed, durations) * 100, t_bucketed]]
    body = (f"{source} ({sum(durations) / 3600:.2f} h, {min(durations):.1f}-{max(durations):.1f} s), batches of "
            f"{args.max_batch_seconds:g} padded seconds, {args.threads} threads.\n\n"
            + markdown_table(["sampler", "batches", "padded %", "epoch s"], rows)
            + "\n\n" + markdown_table(["ratio", "x", "target"], [
                ["epoch time, random / bucketing", t_random / t_bucketed, "> 1"],
                ["padded % with bucketing", rows[1][2], "< 10"]]))
    record("batching", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
