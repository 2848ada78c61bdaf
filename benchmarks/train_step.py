#!/usr/bin/env python3
"""Training step (forward + backward + AdamW) of speechformer against Hugging Face
``Speech2TextForConditionalGeneration`` at the same architecture, batch and threads.

Architecture (issue 4): 12 encoder / 6 decoder layers, d_model 256, 4 heads, FFN 2048,
vocab 5000, convolutional subsampling (x4), dropout 0.1 (activation dropout 0, both libraries'
default), plain cross-entropy, fused AdamW on both sides.
Batch: 8 utterances of 10 s (1000 log-mel frames, 80 bins, computed before the step so both
sides get the same features), 40 target tokens. The two stems differ in kind (speechformer:
two 3x3 conv2d with 128 channels; Speech2Text: two conv1d k5 with GLU), so the table also
gives each side's counted FLOPs per step (torch.utils.flop_counter), and the throughput ratio
is reported both in audio-seconds and in FLOP/s.

    python benchmarks/train_step.py [--quick] [--rounds 5] [--threads 2] [--precision fp32 bf16]

Target: speechformer >= 1.5x HF in audio-seconds per second, in fp32 and with bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, markdown_table, median, ratio, record  # noqa: E402


def build(args: argparse.Namespace):
    import torch
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    from speechformer.model import ModelConfig, SpeechTransformer

    ours = SpeechTransformer(ModelConfig(
        vocab_size=5000, d_model=256, n_heads=4, d_ff=2048, n_encoder_layers=12, n_decoder_layers=6,
        dropout=0.1, activation_dropout=0.0, subsampling_channels=128, ctc_head=False, ctc_weight=0.0,
        label_smoothing=0.0, specaug_freq_masks=0, specaug_time_masks=0))
    hf = Speech2TextForConditionalGeneration(Speech2TextConfig(
        vocab_size=5000, d_model=256, encoder_layers=12, decoder_layers=6, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2048, decoder_ffn_dim=2048, dropout=0.1,
        activation_dropout=0.0, attention_dropout=0.0, activation_function="relu", input_feat_per_channel=80,
        max_source_positions=max(6000, args.frames), max_target_positions=1024, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, scale_embedding=True))
    torch.manual_seed(0)
    feats = torch.randn(args.batch, args.frames, 80)
    frames = torch.full((args.batch,), args.frames)
    tokens = torch.randint(4, 5000, (args.batch, args.tokens))
    token_lengths = torch.full((args.batch,), args.tokens)
    labels = torch.cat([tokens, torch.full((args.batch, 1), 2)], 1)  # + eos, as ours predicts
    return ours, hf, feats, frames, tokens, token_lengths, labels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2 x 10 s, 2 rounds (not recorded)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = p.parse_args()
    if args.quick:
        args.batch, args.rounds = 2, 2

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("skipped: transformers is not installed (pip install -e '.[bench]')")
        return 0
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    ours, hf, feats, frames, tokens, token_lengths, labels = build(args)
    ours.train()
    hf.train()
    # the same optimiser on both sides: PyTorch's fused AdamW (speechformer trains with it;
    # transformers' Trainer defaults to it on recent torch)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    audio_seconds = args.batch * args.frames / 100

    def autocast(precision: str):
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step_ours(precision: str):
        def go() -> None:
            with autocast(precision):
                memory, lengths, _ = ours.encode_features(feats, frames)
                loss = ours.losses(memory, lengths, tokens, token_lengths)["loss"]
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
        return go

    def step_hf(precision: str):
        def go() -> None:
            with autocast(precision):
                loss = hf(input_features=feats, labels=labels).loss
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)
        return go

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    rows, ratios = [], []
    flops = {"speechformer": count(step_ours("fp32")), "HF Speech2Text": count(step_hf("fp32"))}
    for precision in args.precision:
        times = interleaved({"speechformer": step_ours(precision), "HF Speech2Text": step_hf(precision)},
                            rounds=args.rounds)
        for name in times:
            t = median(times[name])
            rows.append([f"{name} {precision}", t, audio_seconds / t, flops[name] / 1e9, flops[name] / t / 1e9])
        r = ratio(times, "HF Speech2Text", "speechformer")
        r_flops = r * flops["speechformer"] / flops["HF Speech2Text"]
        ratios.append([f"{precision}: speechformer / HF", r, r_flops, ">= 1.5 (audio-s/s)"])
    params = (sum(x.numel() for x in ours.parameters()) / 1e6, sum(x.numel() for x in hf.parameters()) / 1e6)
    body = (f"Batch {args.batch} x {args.frames / 100:.0f} s ({args.frames} frames), {args.tokens} tokens, "
            f"{args.threads} threads, {args.rounds} interleaved rounds; parameters: speechformer "
            f"{params[0]:.1f}M, HF {params[1]:.1f}M.\n\n"
            + markdown_table(["model, precision", "median s/step", "audio-s/s", "GFLOP/step", "GFLOP/s"], rows)
            + "\n\n" + markdown_table(["ratio (median of per-round ratios)", "audio-s/s x", "FLOP/s x", "target"],
                                      ratios))
    record("train_step", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
