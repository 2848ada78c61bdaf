#!/usr/bin/env python3
"""Whisper tiny.en in speechformer against openai-whisper and faster-whisper, same weights.

All engines transcribe the same files (the first N of ../shared/data/kathleen_arctic_a),
greedy (beam 1), no timestamps, same number of threads, alternating within each round.
speechformer runs its float32 path one file at a time (batch 1) and batched across files, and
its bf16 path batched; faster-whisper runs float32 and int8, one file at a time as its API does.

Targets (issue 4): >= 1.5x openai-whisper and >= 1.0x faster-whisper float32 at batch 1;
batched, >= 1.2x faster-whisper int8. Transcripts of the batched path must equal those of
speechformer's own float32 batch-1 path (the differences are counted).

    python benchmarks/whisper_engines.py [--quick] [--files 32] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (differing, faster_whisper_run, interleaved, markdown_table, median, ratio,  # noqa: E402
                    record, transcriber_run, whisper_args, whisper_bench, whisper_parser)


def separate_layout(state: dict) -> dict:
    """``state`` with each fused ``qkv`` / ``kv`` projection also under its separate ``query`` /
    ``key`` / ``value`` names (row blocks of the fused one), as openai-whisper's names map to them
    (``speechformer.model.attention.fused_layout`` is the other direction)."""
    out = dict(state)
    for name, tensor in state.items():
        for fused, parts in ((".qkv.", ("query", "key", "value")), (".kv.", ("key", "value"))):
            if fused in name:
                for part, block in zip(parts, tensor.chunk(len(parts))):
                    out[name.replace(fused, f".{part}.")] = block
    return out


def main() -> int:
    args = whisper_args(whisper_parser(__doc__))
    bench = whisper_bench(args, needs=("whisper",), extras="bench", prefix="sf_bench_")
    if bench is None:
        return 0

    import faster_whisper
    import soundfile as sf
    import torch
    import whisper

    from speechformer.transcribe import Transcriber, load_model
    from speechformer.whisper import openai_names

    paths, model_dir, src = bench.paths, bench.model_dir, bench.src
    sf_single = Transcriber.from_pretrained(model_dir, "cpu", max_batch_size=1, num_threads=args.threads)
    sf_batched = Transcriber.from_pretrained(model_dir, "cpu", max_batch_size=16, num_threads=args.threads)
    sf_bf16 = Transcriber.from_pretrained(model_dir, "cpu", max_batch_size=16, num_threads=args.threads,
                                          precision="bf16")

    # openai-whisper with the same weights (its own classes, loaded from our state dict)
    bundle = load_model(model_dir)
    c = bundle.model.config
    dims = whisper.model.ModelDimensions(
        n_mels=c.n_mels, n_audio_ctx=c.max_source_positions, n_audio_state=c.d_model, n_audio_head=c.n_heads,
        n_audio_layer=c.n_encoder_layers, n_vocab=c.vocab_size, n_text_ctx=c.max_target_positions,
        n_text_state=c.d_model, n_text_head=c.n_heads, n_text_layer=c.n_decoder_layers)
    ow = whisper.model.Whisper(dims)
    ours = separate_layout(bundle.model.state_dict())
    ow.load_state_dict({src_name: ours[dst] for src_name, dst in openai_names(c.n_encoder_layers,
                                                                              c.n_decoder_layers).items()})
    ow.eval()
    arrays = [sf.read(p, dtype="float32")[0] for p in paths]

    fw32 = faster_whisper.WhisperModel(str(src), device="cpu", compute_type="float32", cpu_threads=args.threads)
    fw8 = faster_whisper.WhisperModel(str(src), device="cpu", compute_type="int8", cpu_threads=args.threads)
    outputs: dict[str, list[str]] = {}

    def run_ow() -> None:
        with torch.inference_mode():
            outputs["openai-whisper fp32"] = [
                whisper.transcribe(ow, torch.from_numpy(a), temperature=0.0, without_timestamps=True,
                                   condition_on_previous_text=False, fp16=False, language="en")["text"].strip()
                for a in arrays]

    contenders = {
        "speechformer fp32, batch 1": transcriber_run(sf_single, paths, outputs, "speechformer fp32, batch 1"),
        "speechformer fp32, batched": transcriber_run(sf_batched, paths, outputs, "speechformer fp32, batched"),
        "speechformer bf16, batched": transcriber_run(sf_bf16, paths, outputs, "speechformer bf16, batched"),
        "openai-whisper fp32": run_ow,
        "faster-whisper fp32": faster_whisper_run(fw32, paths, outputs, "faster-whisper fp32"),
        "faster-whisper int8": faster_whisper_run(fw8, paths, outputs, "faster-whisper int8"),
    }
    times = interleaved(contenders, rounds=args.rounds, warmup=0 if args.quick else 1)

    rows = [[name, median(ts), bench.audio_seconds / median(ts), differing(outputs, name, "speechformer fp32, batch 1")]
            for name, ts in times.items()]
    sf1, sfb, fw8n = "speechformer fp32, batch 1", "speechformer fp32, batched", "faster-whisper int8"
    ratios = [
        ["speechformer batch 1 vs openai-whisper fp32", ratio(times, "openai-whisper fp32", sf1), ">= 1.5"],
        ["speechformer batch 1 vs faster-whisper fp32", ratio(times, "faster-whisper fp32", sf1), ">= 1.0"],
        ["speechformer batched vs faster-whisper int8", ratio(times, fw8n, sfb), ">= 1.2"],
        ["speechformer bf16 batched vs faster-whisper int8",
         ratio(times, fw8n, "speechformer bf16, batched"), ">= 1.2"],
    ]
    body = (f"{args.files} files ({bench.audio_seconds:.0f} s of audio), {args.rounds} interleaved rounds, "
            f"{args.threads} threads, greedy, no timestamps.\n\n"
            + markdown_table(["engine", "median s", "audio-s/s", "transcripts differing from speechformer fp32 b1"],
                             rows)
            + "\n\n" + markdown_table(["ratio (median of per-round ratios)", "x", "target"], ratios))
    record("whisper_engines", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
