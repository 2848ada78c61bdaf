"""Checkpoint files that survive kills, full disks and strangers.

Lightning's own writer stages a checkpoint in the system temp folder and moves it into
place; when that folder is on another filesystem (``/tmp`` on tmpfs, checkpoints on a
network disk) the move is a copy, and a job killed during the copy leaves a truncated
``last.ckpt``. :class:`AtomicCheckpointIO` writes the temporary file *next to* the target,
flushes it to disk (``fsync``), then renames it over the old file: a reader sees the old
checkpoint or the new one, never half of one, whatever moment the process dies
(:func:`speechformer.atomic.atomic_write`). A full disk raises :class:`CheckpointWriteError`
naming the file, and the previous checkpoint is left as it was.

Reading uses :func:`speechformer.transcribe.load_checkpoint` (``torch.load(...,
weights_only=True)``), as inference does: a checkpoint is data, and a file that would need to
run code to load (a pickle with a payload) is refused with a message naming it.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from . import transcribe
from .atomic import atomic_write


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names it and says what was kept."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`~speechformer.atomic.atomic_write`; failures raise
    :class:`CheckpointWriteError`."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write, error=CheckpointWriteError,
                 rerun="re-run with --ckpt_path last (or point the checkpoint dirpath elsewhere)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic, durable writes and ``weights_only`` reads.

    ``speechformer fit`` uses it by default (``trainer.plugins``); with the Python API pass
    ``L.Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return transcribe.load_checkpoint(path, map_location=map_location or "cpu")  # always weights_only


def random_state(device: torch.device) -> dict[str, Any]:
    """This process's global random generators as plain data (it loads with ``weights_only=True``).

    Torch's CPU generator (dropout on CPU), the CUDA generator of ``device`` when it is a GPU
    (dropout there), and Python's and numpy's (nothing of ours draws from them; a user's
    callback may). Lightning does not save these: a resumed run would draw other dropout masks.
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`random_state` saved (the CUDA part only onto a GPU: a checkpoint from
    a CPU run resumed on a GPU draws fresh CUDA numbers, see docs/reliability.md)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


#: What :func:`speechformer.atomic.atomic_write` names the temporary file of a checkpoint
#: (``tempfile.mkstemp(prefix=".last.ckpt.", suffix=".tmp")``: 8 random characters between).
_CHECKPOINT_TEMP = re.compile(r"^\.(?P<target>.+\.ckpt)\.[a-z0-9_]{8}\.tmp$")


def remove_orphan_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted, in ``folder`` only.

    Only names of :data:`_CHECKPOINT_TEMP`'s pattern (``.last.ckpt.k3j9x0_a.tmp``): no other file
    of the folder is touched, and nothing in its subfolders. Call it before training writes
    anything (no write of this run can be under way). Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if _CHECKPOINT_TEMP.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class ResumeCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` fresh: every ``every_n_train_steps`` steps and at each epoch's end.

    A killed run then loses at most that many steps, and ``--ckpt_path last`` picks it up
    (with the data loader's place in the epoch: see :class:`speechformer.data.ResumableLoader`).
    The step checkpoint is not written on an epoch's last batch: Lightning 2.x resumes such a
    checkpoint one epoch too far (it counts the finished epoch twice; measured in
    tests/test_reliability.py), so that state is saved once the epoch has ended instead.
    Use it beside a ``ModelCheckpoint`` that keeps the best models by validation WER.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 200, filename: str = "last") -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=True)
        self.CHECKPOINT_NAME_LAST = filename

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        return  # the epoch-end save above holds the validation scores too
