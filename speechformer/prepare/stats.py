"""Global feature mean/variance of a manifest, computed once, kept in a JSON file.

Training normalises log-mel frames with a global mean and standard deviation per mel bin,
stored as buffers inside the model (:class:`speechformer.frontend.LogMelFrontend`). By
default ``fit`` computes them at start from ``model.stats_utterances`` (500) training
utterances. For a large corpus, or to share one set of statistics between runs, compute
them here over the whole manifest (or an evenly spaced subset) and point training at the file::

    speechformer compute-stats data/train-960.jsonl --out exp/feature_stats.json --jobs 8
    speechformer fit --config conf/x.yaml --model.feature_stats exp/feature_stats.json

The file holds the sums (float64) as well as mean/std, so the result is exactly what
training would compute from the same utterances, and the frontend settings it was made
with (sample rate, mel bins, hop, FFT size), which are checked when training loads it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..data import SpeechDataset, read_manifest
from ..frontend import LogMelFrontend, feature_sums
from . import PrepareError

FORMAT = "speechformer-feature-stats"


def _settings(frontend: LogMelFrontend) -> dict[str, int]:
    return {"sample_rate": int(frontend.mel.sample_rate), "n_mels": int(frontend.mean.numel()),
            "hop_length": int(frontend.hop_length), "n_fft": int(frontend.n_fft)}


def compute_stats(manifest: str | Path, sample_rate: int = 16000, n_mels: int = 80, max_utterances: int = 0,
                  jobs: int = 0) -> dict[str, Any]:
    """Statistics of the log-mel frames of ``manifest`` (all utterances, or ``max_utterances``
    evenly spaced ones: every ``len // n``-th, as training picks them), as a JSON-able dict.
    ``jobs`` > 0 reads audio in that many worker processes."""
    utts = read_manifest(manifest)
    n = len(utts) if max_utterances <= 0 else min(len(utts), max_utterances)
    step = max(1, len(utts) // n)
    chosen = [utts[i] for i in range(0, step * n, step)]
    frontend = LogMelFrontend(sample_rate, n_mels)
    dataset = SpeechDataset(chosen, tokenizer=None, sample_rate=sample_rate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=jobs)
    start = time.perf_counter()
    total, total_sq, count = feature_sums(frontend, (item["wav"] for item in loader))
    frontend.set_stats(total.float(), total_sq.float(), count)
    return {"format": FORMAT, **_settings(frontend), "manifest": str(manifest), "utterances": len(chosen),
            "seconds_of_audio": round(sum(u.duration for u in chosen), 3), "frames": count,
            "compute_seconds": round(time.perf_counter() - start, 1),
            "sum": total.tolist(), "sum_sq": total_sq.tolist(),
            "mean": frontend.mean.tolist(), "std": frontend.std.tolist()}


def write_stats(stats: dict[str, Any], out: str | Path) -> Path:
    return atomic_write_text(out, json.dumps(stats, indent=1) + "\n")


def load_feature_stats(path: str | Path, frontend: LogMelFrontend) -> None:
    """Set ``frontend``'s mean/std from a :func:`compute_stats` file, checking it fits."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PrepareError(f"{path}: feature statistics not found; make them with `speechformer compute-stats`") from err
    except json.JSONDecodeError as err:
        raise PrepareError(f"{path}: not valid JSON ({err.msg}); make it again with `speechformer compute-stats`") from err
    if not isinstance(frontend, LogMelFrontend):
        raise PrepareError(f"{path}: this model's frontend ({type(frontend).__name__}) takes no feature statistics")
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        raise PrepareError(f"{path}: not a `speechformer compute-stats` file")
    mismatch = {k: (stats.get(k), v) for k, v in _settings(frontend).items() if stats.get(k) != v}
    if mismatch:
        detail = ", ".join(f"{k} {a} in the file but {b} in the model" for k, (a, b) in mismatch.items())
        raise PrepareError(f"{path}: made for another frontend ({detail}); run compute-stats with the model's "
                           "--sample-rate/--n-mels")
    frontend.set_stats(torch.tensor(stats["sum"]).float(), torch.tensor(stats["sum_sq"]).float(),
                       int(stats["frames"]))
