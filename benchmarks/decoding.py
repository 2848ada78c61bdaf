#!/usr/bin/env python3
"""Batched decoding: speechformer's greedy and beam search against Hugging Face ``generate``
with the same decoder and the same weights.

The decoder is Speech2Text's (12/6 layers, d_model 256, 4 heads, FFN 2048, vocab 5000,
pre-LayerNorm, ReLU, scaled embeddings, tied output): speechformer builds the same layers,
loads HF's decoder weights, and takes HF's fixed sinusoidal position rows as its position
table (Speech2Text starts positions at 2). Both decode from the same encoder memory (10 s of
audio: 250 vectors), so what is timed is the decoding itself; greedy outputs are compared
token for token. Both sides produce exactly ``--tokens`` tokens per utterance (the end token
is suppressed until then: ``min_new_tokens`` in HF).

    python benchmarks/decoding.py [--quick] [--rounds 3] [--threads 2] [--tokens 32]

Targets: greedy >= 2x HF (tokens/s at batch 1 and 16); beam 5 costs < 1.5x greedy at batch 16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import decoding_args, decoding_parser, interleaved, markdown_table, median, ratio, record  # noqa: E402


def build(args: argparse.Namespace):
    import torch
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    from speechformer.model import ModelConfig, SpeechTransformer

    hf_cfg = Speech2TextConfig(
        vocab_size=5000, d_model=256, encoder_layers=1, decoder_layers=6, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2048, decoder_ffn_dim=2048, dropout=0.0,
        activation_function="relu", max_target_positions=1024, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, scale_embedding=True)
    torch.manual_seed(0)
    hf = Speech2TextForConditionalGeneration(hf_cfg).eval()
    ours = SpeechTransformer(ModelConfig(
        vocab_size=5000, d_model=256, n_heads=4, d_ff=2048, n_encoder_layers=0, n_decoder_layers=6, dropout=0.0,
        decoder_positions="learned", max_target_positions=1000, ctc_head=False, ctc_weight=0.0,
        bos_id=2, eos_id=2)).eval()
    d = hf.model.decoder
    state = {"embedding.weight": d.embed_tokens.weight,
             "decoder_positions.table": d.embed_positions.weights[2:2 + 1000],
             "decoder_norm.weight": d.layer_norm.weight, "decoder_norm.bias": d.layer_norm.bias}
    for i, layer in enumerate(d.layers):
        for ours_name, hf_attn in (("self_attn", layer.self_attn), ("cross_attn", layer.encoder_attn)):
            for ours_proj, hf_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                                       ("out", "out_proj")):
                proj = getattr(hf_attn, hf_proj)
                state[f"decoder_layers.{i}.{ours_name}.{ours_proj}.weight"] = proj.weight
                state[f"decoder_layers.{i}.{ours_name}.{ours_proj}.bias"] = proj.bias
        for ours_norm, hf_norm in (("self_norm", layer.self_attn_layer_norm),
                                   ("cross_norm", layer.encoder_attn_layer_norm),
                                   ("ff_norm", layer.final_layer_norm)):
            state[f"decoder_layers.{i}.{ours_norm}.weight"] = hf_norm.weight
            state[f"decoder_layers.{i}.{ours_norm}.bias"] = hf_norm.bias
        for fc in ("fc1", "fc2"):
            state[f"decoder_layers.{i}.ff.{fc}.weight"] = getattr(layer, fc).weight
            state[f"decoder_layers.{i}.ff.{fc}.bias"] = getattr(layer, fc).bias
    missing, _ = ours.load_state_dict(state, strict=False)
    assert not [k for k in missing if k.startswith(("decoder", "embedding"))], missing
    return ours, hf


def main() -> int:
    p = decoding_parser(__doc__)
    args = decoding_args(p)

    import torch
    try:
        from transformers.modeling_outputs import BaseModelOutput
    except ImportError:
        print("skipped: transformers is not installed (pip install -e '.[bench]')")
        return 0

    from speechformer.decoding import DecodeOptions, beam_search, greedy_decode
    from speechformer.fastpath import flush_denormals
    from speechformer.tokenizer import DecodeRules

    torch.set_num_threads(args.threads)
    flush_denormals()  # as fit and transcribe do (speechformer/fastpath.py)
    ours, hf = build(args)
    # exactly --tokens tokens on both sides: the end token is suppressed (HF: min_new_tokens)
    rules = DecodeRules(prompt=[2], eos_id=2, suppress=[2])
    rows, ratios = [], []
    for batch in args.batches:
        memory = torch.randn(batch, 250, 256)
        lengths = torch.full((batch,), 250)
        out: dict[str, list] = {}

        def ours_greedy() -> None:
            out["ours"] = [h.tokens for h in greedy_decode(ours, memory, lengths, DecodeOptions(max_len=args.tokens),
                                                            rules)]

        def ours_beam() -> None:
            beam_search(ours, memory, lengths, DecodeOptions(beam_size=5, max_len=args.tokens), rules)

        def hf_greedy() -> None:
            with torch.inference_mode():  # a fresh wrapper each call: generate expands it in place for beams
                seq = hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                                  max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_beams=1, do_sample=False)
            out["hf"] = [row[1:].tolist() for row in seq]

        def hf_beam() -> None:
            with torch.inference_mode():
                hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                            max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_beams=5, do_sample=False)

        times = interleaved({"speechformer greedy": ours_greedy, "HF greedy": hf_greedy,
                             "speechformer beam 5": ours_beam, "HF beam 5": hf_beam}, rounds=args.rounds)
        same = sum(a == b[:len(a)] for a, b in zip(out["ours"], out["hf"]))
        for name, ts in times.items():
            rows.append([f"{name}, batch {batch}", median(ts), batch * args.tokens / median(ts)])
        ratios.append([f"batch {batch}: greedy, speechformer vs HF", ratio(times, "HF greedy", "speechformer greedy"),
                       ">= 2"])
        ratios.append([f"batch {batch}: beam 5, speechformer vs HF", ratio(times, "HF beam 5", "speechformer beam 5"),
                       "-"])
        ratios.append([f"batch {batch}: speechformer beam 5 / greedy cost",
                       ratio(times, "speechformer beam 5", "speechformer greedy"), "< 1.5 at batch 16"])
        rows.append([f"greedy outputs identical, batch {batch}", f"{same}/{batch}", "-"])
    body = (f"{args.tokens} tokens per utterance from a 250-vector memory, {args.threads} threads, "
            f"{args.rounds} interleaved rounds.\n\n"
            + markdown_table(["decoder", "median s", "tokens/s"], rows)
            + "\n\n" + markdown_table(["ratio (median of per-round ratios)", "x", "target"], ratios))
    record("decoding", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
