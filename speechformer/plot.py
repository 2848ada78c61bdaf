"""Training curves from a run's log: ``speechformer plot EXP_DIR``.

The recipes log with Lightning's ``CSVLogger`` into ``EXP_DIR/logs/version_N/metrics.csv``
(``recipes/synthetic/conf/train.yaml``): one row per logging event, with only that event's
columns filled (``train_loss`` and ``lr`` every ``log_every_n_steps`` steps, ``val_loss``,
``val_wer`` and ``val_cer`` once per validation). A resumed run (``fit --ckpt_path last``)
starts a new ``version_N``; the versions are read in order and, where two log the same
metric at the same step, the later one wins, so the curves show the run as it continued.

Writes ``loss.png`` (training and validation loss against steps), ``wer.png`` (validation
WER and CER against epochs) and ``lr.png`` (learning rate against steps), and prints the
best epoch by validation WER.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOT_EXTRA_HINT = "matplotlib is not installed; install the plotting extra: pip install 'speechformer[plot]'"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or a one-line error."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(PLOT_EXTRA_HINT) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def find_logs(exp_dir: str | Path) -> list[Path]:
    """The ``metrics.csv`` files of a run, oldest version first.

    ``exp_dir`` may be the experiment folder (``exp/transformer``: its ``logs/version_*``, or
    any ``version_*`` below it), one version folder, or a ``metrics.csv`` file.
    """
    path = Path(exp_dir)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such experiment folder")
    if (path / "metrics.csv").is_file():
        return [path / "metrics.csv"]
    found = sorted(path.glob("**/version_*/metrics.csv"),
                   key=lambda p: (str(p.parent.parent), _version(p.parent.name)))
    if not found:
        raise FileNotFoundError(f"{path}: no metrics.csv (looked for */version_*/metrics.csv); train with a "
                                "CSVLogger as recipes/synthetic/conf/train.yaml does")
    parents = {p.parent.parent for p in found}
    if len(parents) > 1:
        names = ", ".join(sorted(str(p) for p in parents))
        raise ValueError(f"{path}: logs of several runs ({names}); give one of them")
    return found


def _version(name: str) -> int:
    match = re.fullmatch(r"version_(\d+)", name)
    return int(match.group(1)) if match else -1


@dataclass
class Curves:
    """Each metric as (step, epoch, value) points in step order."""

    series: dict[str, list[tuple[int, int | None, float]]]

    def get(self, name: str) -> list[tuple[int, int | None, float]]:
        return self.series.get(name, [])

    @property
    def lr_name(self) -> str | None:
        """``lr`` (logged by SpeechModule), else the first LearningRateMonitor column."""
        if self.get("lr"):
            return "lr"
        return next((k for k in sorted(self.series) if k.startswith("lr-") and self.series[k]), None)

    def best_epoch(self, metric: str = "val_wer") -> dict[str, Any] | None:
        """The validation with the lowest ``metric`` (the first one on a tie), with its other scores."""
        points = self.get(metric)
        if not points:
            return None
        step, epoch, value = min(points, key=lambda p: p[2])
        best: dict[str, Any] = {"epoch": epoch, "step": step, metric: value}
        for other in ("val_cer", "val_loss", "val_accuracy"):
            match = [v for s, e, v in self.get(other) if s == step and e == epoch]
            if match and other != metric:
                best[other] = match[-1]
        return best


def read_curves(paths: list[Path]) -> Curves:
    """Merge the CSV logs (later versions override earlier ones at the same step)."""
    merged: dict[str, dict[int, tuple[int | None, float]]] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "step" not in reader.fieldnames:
                raise ValueError(f"{path}: not a Lightning CSVLogger metrics.csv (no 'step' column)")
            for line, row in enumerate(reader, start=2):
                try:
                    step = int(float(row["step"]))
                    epoch = int(float(row["epoch"])) if row.get("epoch") else None
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{path}:{line}: unreadable step/epoch ({err})") from err
                for name, text in row.items():
                    if name in ("step", "epoch") or name is None or text in ("", None):
                        continue
                    value = float(text)
                    if math.isfinite(value):
                        merged.setdefault(name, {})[step] = (epoch, value)
    return Curves({name: [(s, e, v) for s, (e, v) in sorted(points.items())] for name, points in merged.items()})


def plot_curves(curves: Curves, out_dir: str | Path) -> dict[str, Path]:
    """Write loss.png, wer.png and lr.png (each only when its metrics were logged)."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    best = curves.best_epoch()

    def save(name: str, fig: Any) -> None:
        files[name] = out / name
        fig.savefig(files[name], dpi=100)
        plt.close(fig)

    if curves.get("train_loss") or curves.get("val_loss"):
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        for name, style in (("train_loss", "-"), ("val_loss", "o-")):
            pts = curves.get(name)
            if pts:
                ax.plot([p[0] for p in pts], [p[2] for p in pts], style, label=name.replace("_", " "),
                        markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training and validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save("loss.png", fig)

    if curves.get("val_wer") or curves.get("val_cer"):
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        for name in ("val_wer", "val_cer"):
            pts = curves.get(name)
            if pts:
                ax.plot([p[1] for p in pts], [100 * p[2] for p in pts], "o-", label=name[4:].upper(), markersize=4)
        if best is not None and best["epoch"] is not None:
            ax.axvline(best["epoch"], color="grey", linestyle=":", label=f"best epoch {best['epoch']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.set_title("validation WER and CER")
        ax.grid(alpha=0.3)
        ax.legend()
        save("wer.png", fig)

    lr_name = curves.lr_name
    if lr_name:
        pts = curves.get(lr_name)
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        ax.plot([p[0] for p in pts], [p[2] for p in pts])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"learning rate ({lr_name})")
        ax.grid(alpha=0.3)
        save("lr.png", fig)
    return files


def format_best(best: dict[str, Any] | None) -> str:
    if best is None:
        return "best epoch: none (no validation WER in the log)"
    parts = [f"val_wer {100 * best['val_wer']:.2f}%"]
    if "val_cer" in best:
        parts.append(f"val_cer {100 * best['val_cer']:.2f}%")
    if "val_loss" in best:
        parts.append(f"val_loss {best['val_loss']:.4f}")
    return f"best epoch: {best['epoch']} (step {best['step']}): " + ", ".join(parts)


def plot_run(exp_dir: str | Path, out_dir: str | Path | None = None) -> tuple[dict[str, Path], str]:
    """The ``speechformer plot`` command: curves into ``out_dir`` (default ``EXP_DIR/plots``)."""
    pyplot()
    logs = find_logs(exp_dir)
    curves = read_curves(logs)
    if not curves.series:
        raise ValueError(f"{', '.join(map(str, logs))}: the log has no metrics yet")
    default = Path(exp_dir).parent if Path(exp_dir).is_file() else Path(exp_dir)
    files = plot_curves(curves, out_dir or default / "plots")
    return files, format_best(curves.best_epoch())
