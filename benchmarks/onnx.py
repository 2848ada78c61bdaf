#!/usr/bin/env python3
"""Whisper tiny.en through onnxruntime (float32 and int8) against speechformer's PyTorch path
and faster-whisper int8, same weights, same files, same threads.

All engines transcribe the same files (the first N of ../shared/data/kathleen_arctic_a),
greedy, no timestamps, alternating within each round. speechformer (PyTorch) and the onnxruntime
transcriber run one file at a time (batch 1) and batched across files; faster-whisper one file at
a time, as its API does. The ONNX folders are exported here (``export_onnx``; int8: onnxruntime's
dynamic quantisation of the matmuls, ``--quantize int8``).

Target (issue 17): onnxruntime int8 at batch 1 at least as fast as faster-whisper int8. The
transcripts differing from speechformer's PyTorch batch-1 ones are counted (float32: 0 expected).

    python benchmarks/onnx.py [--quick] [--files 32] [--rounds 3] [--threads 2] [--batch 16]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# This file is onnx.py: with its folder first on sys.path (where Python puts a script's folder),
# `import onnx` (torch's exporter does it) would find this script instead of the onnx package.
# The folder goes to the end of the path instead, so `common` is still found.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from common import (differing, faster_whisper_run, interleaved, markdown_table, median, ratio,  # noqa: E402
                    record, transcriber_run, whisper_args, whisper_bench, whisper_parser)


def main() -> int:
    p = whisper_parser(__doc__)
    p.add_argument("--batch", type=int, default=16, help="files per batch on the batched paths")
    args = whisper_args(p)
    bench = whisper_bench(args, needs=("onnxruntime", "onnx", "onnxscript"), extras="bench,onnx",
                          prefix="sf_bench_onnx_")
    if bench is None:
        return 0

    import faster_whisper

    from speechformer.onnx_export import DECODER_FILE, ENCODER_FILE, export_onnx, quantize_int8
    from speechformer.onnx_runtime import OnnxTranscriber
    from speechformer.transcribe import Transcriber, load_model

    tmp, model_dir, paths = bench.tmp, bench.model_dir, bench.paths
    export_onnx(load_model(model_dir), tmp / "fp32")
    shutil.copytree(tmp / "fp32", tmp / "int8")
    for name in (ENCODER_FILE, DECODER_FILE):
        quantize_int8(tmp / "int8" / name)

    engines = {
        "speechformer PyTorch fp32, batch 1": Transcriber.from_pretrained(model_dir, "cpu", max_batch_size=1,
                                                                          num_threads=args.threads),
        "speechformer PyTorch fp32, batched": Transcriber.from_pretrained(model_dir, "cpu", max_batch_size=args.batch,
                                                                          num_threads=args.threads),
    }
    for kind in ("fp32", "int8"):
        for label, size in (("batch 1", 1), ("batched", args.batch)):
            engines[f"onnxruntime {kind}, {label}"] = OnnxTranscriber(tmp / kind, threads=args.threads,
                                                                      max_batch_size=size)
    fw8 = faster_whisper.WhisperModel(str(bench.src), device="cpu", compute_type="int8", cpu_threads=args.threads)
    outputs: dict[str, list[str]] = {}

    def contenders(files: list[Path]) -> dict:
        runs = {name: transcriber_run(t, files, outputs, name) for name, t in engines.items()}
        runs["faster-whisper int8, batch 1"] = faster_whisper_run(fw8, files, outputs, "faster-whisper int8, batch 1")
        return runs

    # warm-up on the first 2 files only (sessions, arenas, first-call costs), to keep the run bounded
    interleaved(contenders(paths[:2]), rounds=1, warmup=0)
    load_before = os.getloadavg()[0]
    times = interleaved(contenders(paths), rounds=args.rounds, warmup=0)
    load_after = os.getloadavg()[0]

    rows = [[name, median(ts), bench.audio_seconds / median(ts),
             differing(outputs, name, "speechformer PyTorch fp32, batch 1")] for name, ts in times.items()]
    fw, pt1, ptb = "faster-whisper int8, batch 1", "speechformer PyTorch fp32, batch 1", \
        "speechformer PyTorch fp32, batched"
    ratios = [
        ["onnxruntime int8 batch 1 vs faster-whisper int8", ratio(times, fw, "onnxruntime int8, batch 1"), ">= 1.0"],
        ["onnxruntime fp32 batch 1 vs faster-whisper int8", ratio(times, fw, "onnxruntime fp32, batch 1"), ""],
        ["onnxruntime fp32 batch 1 vs PyTorch fp32 batch 1", ratio(times, pt1, "onnxruntime fp32, batch 1"), ""],
        ["onnxruntime int8 batch 1 vs PyTorch fp32 batch 1", ratio(times, pt1, "onnxruntime int8, batch 1"), ""],
        ["onnxruntime fp32 batched vs PyTorch fp32 batched", ratio(times, ptb, "onnxruntime fp32, batched"), ""],
        ["onnxruntime int8 batched vs PyTorch fp32 batched", ratio(times, ptb, "onnxruntime int8, batched"), ""],
        ["onnxruntime int8 batched vs faster-whisper int8", ratio(times, fw, "onnxruntime int8, batched"), ""],
    ]
    body = (f"{args.files} files ({bench.audio_seconds:.0f} s of audio), {args.rounds} interleaved round(s) after a warm-up on 2 files, "
            f"{args.threads} threads everywhere, greedy, no timestamps, batched = {args.batch} files; "
            f"load average (1 min) {load_before:.2f} before the timed rounds, {load_after:.2f} after.\n\n"
            + markdown_table(["engine", "median s", "audio-s/s", "transcripts differing from PyTorch fp32 b1"],
                             rows)
            + "\n\n" + markdown_table(["ratio (median of per-round ratios; > 1: the first is faster)", "x",
                                       "target"], ratios))
    record("onnx", body, args.quick)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
