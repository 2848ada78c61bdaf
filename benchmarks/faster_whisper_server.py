#!/usr/bin/env python
"""The peer row of benchmarks/serve.py: faster-whisper int8 behind FastAPI, one request at a time.

Each upload is transcribed alone, under a lock around the one model (what a thread-pool server
around one model amounts to: speaches runs each request on its own, whisper.cpp's server holds a
global mutex), greedy, no timestamps, no VAD, no previous-text prompt: as speechformer is timed.
Answers ``GET /health`` and ``POST /v1/audio/transcriptions`` (``file``; other fields ignored)
with ``{"text"}``. Started by serve.py; by hand:

    python benchmarks/faster_whisper_server.py MODEL_DIR --port 8001 [--threads 2]
"""

import argparse
import threading

import faster_whisper
import uvicorn
from fastapi import FastAPI, UploadFile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a CTranslate2 Whisper folder (faster-whisper's format)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = faster_whisper.WhisperModel(args.model, device="cpu", compute_type="int8", cpu_threads=args.threads)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/audio/transcriptions")
    def transcribe(file: UploadFile) -> dict:  # a plain def: FastAPI runs it in its thread pool
        with lock:
            segments, _ = model.transcribe(file.file, beam_size=1, temperature=0.0, without_timestamps=True,
                                           condition_on_previous_text=False, vad_filter=False)
            return {"text": " ".join(s.text.strip() for s in segments)}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
