"""Callbacks for the kill/resume tests, loaded by `speechformer fit` in a subprocess.

``BatchLog`` appends ``global_step <tab> epoch <tab> lr <tab> ids`` for every trained batch to
``$SPEECHFORMER_BATCH_LOG`` (flushed and fsynced, so the lines survive a SIGKILL). With
``$SPEECHFORMER_KILL_AT_STEP`` it kills its own process with SIGKILL after that global step;
with ``$SPEECHFORMER_KILL_IN_SAVE=N`` the N-th checkpoint write is killed half-way through
the file (a real kill while writing, not a simulated exception).
"""

from __future__ import annotations

import os
import signal

import lightning as L


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class BatchLog(L.Callback):
    def __init__(self) -> None:
        self.path = os.environ["SPEECHFORMER_BATCH_LOG"]
        self.kill_at = int(os.environ.get("SPEECHFORMER_KILL_AT_STEP", "0"))
        kill_in_save = int(os.environ.get("SPEECHFORMER_KILL_IN_SAVE", "0"))
        if kill_in_save:
            _kill_during_checkpoint_write(kill_in_save)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.global_step}\t{trainer.current_epoch}\t{self._lr:.10g}\t{','.join(batch['ids'])}\n")
            f.flush()
            os.fsync(f.fileno())
        if self.kill_at and trainer.global_step >= self.kill_at:
            _kill()


def _kill_during_checkpoint_write(n: int) -> None:
    """Make the n-th torch.save into a checkpoint write half its bytes, then SIGKILL the process."""
    import torch

    from speechformer import checkpoint

    real_save = torch.save
    count = {"saves": 0}

    def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        count["saves"] += 1
        if count["saves"] < n or not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _kill()

    checkpoint.torch.save = save  # type: ignore[attr-defined]
