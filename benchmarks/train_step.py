#!/usr/bin/env python3
"""Training step (forward + backward + AdamW) of speechformer against Hugging Face
``Speech2TextForConditionalGeneration`` at the same architecture, batch and threads.

Architecture (issue 4): 12 encoder / 6 decoder layers, d_model 256, 4 heads, FFN 2048,
vocab 5000, convolutional subsampling (x4), dropout 0.1 (activation dropout 0, both libraries'
default), plain cross-entropy, fused AdamW on both sides.
Batch: 8 utterances of 10 s (1000 log-mel frames, 80 bins, computed before the step so both
sides get the same features), 40 target tokens; a second s2t-small row gives speechformer the stem
of HF's kind (`subsampling: conv1d_glu`). Then (issue 14): the synthetic recipe's
model (d 192, 6 / 3 layers, FFN 768, CTC weight 0.5, vocab 256) on 30 x 2.7 s, 16 tokens; HF at
the same sizes. In the other rows the two stems differ in kind (speechformer:
3x3 conv2d; Speech2Text: two conv1d k5 with GLU), so the table also
gives each side's counted FLOPs per step (torch.utils.flop_counter), and the throughput ratio
is reported both in audio-seconds and in FLOP/s.

    python benchmarks/train_step.py [--quick] [--rounds 5] [--threads 2] [--shape s2t-small recipe]
                                    [--precision fp32 bf16]

Targets (issue 14): speechformer >= 1.5x HF in audio-seconds per second with bf16 autocast and
>= 1.0x in fp32, at both shapes; MFU of the recipe shape in bf16 >= 25% of the measured bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, markdown_table, median, ratio, record  # noqa: E402


# The rows: issue 4's s2t-small comparison; the synthetic recipe's model (recipes/synthetic/conf/
# train.yaml: a Conformer at 80 ms frames, CTC weight 0.5, label smoothing 0.1, 256 pieces) on a batch
# like its 80-second batches, against HF's transformer at the same width, depth and feed-forward size
# (HF has no Conformer: this row is the work per audio-second each toolkit's recipe model asks);
# and the recipe's transformer (conf/transformer.yaml), HF's architecture at the same sizes. HF gets
# its own conv1d stem (x4) and no CTC head.
SHAPES = {
    "s2t-small": dict(ours=dict(vocab_size=5000, d_model=256, n_heads=4, d_ff=2048, n_encoder_layers=12,
                                n_decoder_layers=6, dropout=0.1, activation_dropout=0.0, subsampling_channels=128,
                                ctc_head=False, ctc_weight=0.0, label_smoothing=0.0),
                      dropout=0.1, batch=8, frames=1000, tokens=40),
    # issue 4's shape with the stem of HF's kind: Speech2Text's conv1d + GLU (k5, stride 2, 1024 channels
    # before the GLU, 512 after), unpadded (`subsampling: conv1d_glu`): the same architecture, stem included
    "s2t-small-conv1d": dict(ours=dict(vocab_size=5000, d_model=256, n_heads=4, d_ff=2048, n_encoder_layers=12,
                                       n_decoder_layers=6, dropout=0.1, activation_dropout=0.0,
                                       subsampling="conv1d_glu", subsampling_channels=512,
                                       ctc_head=False, ctc_weight=0.0, label_smoothing=0.0),
                             dropout=0.1, batch=8, frames=1000, tokens=40),
    "recipe": dict(ours=dict(vocab_size=256, d_model=192, n_heads=4, d_ff=384, n_encoder_layers=6,
                             n_decoder_layers=3, dropout=0.0, subsampling_channels=32, subsampling_layers=3,
                             encoder="conformer", encoder_positions="sinusoidal+rotary", encoder_input_scale=True,
                             conformer_final_norm=False, conv_kernel_size=15, conv_norm="layer",
                             ctc_weight=0.5, label_smoothing=0.1),
                   hf_ffn=768, dropout=0.0, batch=30, frames=270, tokens=16),
    "recipe-transformer": dict(ours=dict(vocab_size=256, d_model=192, n_heads=4, d_ff=768, n_encoder_layers=6,
                                         n_decoder_layers=3, dropout=0.0, subsampling_channels=64, ctc_weight=0.5,
                                         label_smoothing=0.1),
                               dropout=0.0, batch=30, frames=270, tokens=16),
}


def build(shape: str, quick: bool):
    import torch
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    from speechformer.fastpath import tune_for_training
    from speechformer.model import ModelConfig, SpeechTransformer

    spec = SHAPES[shape]
    c = ModelConfig(**spec["ours"], specaug_freq_masks=0, specaug_time_masks=0)
    batch, frames, n_tokens = (2 if quick else spec["batch"]), spec["frames"], spec["tokens"]
    torch.manual_seed(0)
    ours = tune_for_training(SpeechTransformer(c))  # as fit does
    hf = Speech2TextForConditionalGeneration(Speech2TextConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.n_encoder_layers,
        decoder_layers=c.n_decoder_layers, encoder_attention_heads=c.n_heads, decoder_attention_heads=c.n_heads,
        encoder_ffn_dim=spec.get("hf_ffn", c.d_ff), decoder_ffn_dim=spec.get("hf_ffn", c.d_ff), dropout=spec["dropout"], activation_dropout=0.0,
        attention_dropout=0.0, activation_function="relu", input_feat_per_channel=80,
        max_source_positions=max(6000, frames), max_target_positions=1024, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, scale_embedding=True))
    feats = torch.randn(batch, frames, 80)
    lengths = torch.full((batch,), frames)
    tokens = torch.randint(4, c.vocab_size, (batch, n_tokens))
    token_lengths = torch.full((batch,), n_tokens)
    labels = torch.cat([tokens, torch.full((batch, 1), 2)], 1)  # + eos, as ours predicts
    return ours, hf, feats, lengths, tokens, token_lengths, labels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2, 2 rounds (not recorded)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: freed memory stays in the process (fastpath.keep_freed_memory, as fit does); "
                        "default: glibc's own behaviour")
    args = p.parse_args()
    if args.quick:
        args.rounds = 2

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from speechformer.fastpath import flush_denormals, keep_freed_memory
    from speechformer.flops import measure_peak_tflops

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("skipped: transformers is not installed (pip install -e '.[bench]')")
        return 0
    torch.set_num_threads(args.threads)
    flush_denormals()  # as fit and transcribe do (speechformer/fastpath.py)
    if args.malloc == "keep":
        keep_freed_memory()  # as fit does: process-wide, so for both sides of a comparison
    peaks = {"bf16": measure_peak_tflops(dtype="bfloat16"), "fp32": measure_peak_tflops(dtype="float32")}

    def autocast(precision: str):
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    rows, ratios, texts = [], [], []
    for shape in args.shape:
        ours, hf, feats, frames, tokens, token_lengths, labels = build(shape, args.quick)
        ours.train()
        hf.train()
        # the same optimiser on both sides: PyTorch's fused AdamW (transformers' Trainer defaults to it)
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
        audio_seconds = feats.shape[0] * feats.shape[1] / 100

        def step_ours(precision: str):
            def go() -> None:
                with autocast(precision):
                    memory, lengths = ours.encode_features(feats, frames)
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

        flops = {"speechformer": count(step_ours("fp32")), "HF Speech2Text": count(step_hf("fp32"))}
        for precision in args.precision:
            times = interleaved({"speechformer": step_ours(precision), "HF Speech2Text": step_hf(precision)},
                                rounds=args.rounds)
            for name in times:
                t = median(times[name])
                rows.append([f"{shape}: {name} {precision}", t, audio_seconds / t, flops[name] / 1e9,
                             flops[name] / t / 1e9, f"{100 * flops[name] / t / 1e12 / peaks[precision]:.1f}%"])
            r = ratio(times, "HF Speech2Text", "speechformer")
            r_flops = r * flops["speechformer"] / flops["HF Speech2Text"]
            target = ">= 1.5" if precision == "bf16" else ">= 1.0"
            ratios.append([f"{shape} {precision}: speechformer / HF", r, r_flops, target])
            print(*rows[-2], sep="\t", flush=True)
            print(*rows[-1], sep="\t", flush=True)
        params = (sum(x.numel() for x in ours.parameters()) / 1e6, sum(x.numel() for x in hf.parameters()) / 1e6)
        texts.append(f"{shape}: batch {feats.shape[0]} x {feats.shape[1] / 100:.1f} s ({feats.shape[1]} frames), "
                     f"{tokens.shape[1]} tokens; parameters: speechformer {params[0]:.1f}M, HF {params[1]:.1f}M.")
    body = (f"{args.threads} threads, {args.rounds} interleaved rounds; measured matmul peak (2048^3): bf16 "
            f"{peaks['bf16']:.3f}, fp32 {peaks['fp32']:.3f} TFLOP/s; MFU = counted FLOP/s over the peak of the "
            "row's precision.\n" + "\n".join(f"- {t}" for t in texts) + "\n\n"
            + markdown_table(["shape: model, precision", "median s/step", "audio-s/s", "GFLOP/step", "GFLOP/s",
                              "MFU"], rows)
            + "\n\n" + markdown_table(["ratio (median of per-round ratios)", "audio-s/s x", "FLOP/s x",
                                        "target (audio-s/s)"], ratios))
    record("train_step", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
