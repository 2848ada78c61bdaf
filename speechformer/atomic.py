"""Files that are either the old version or the new one, never half of one.

Every file speechformer writes for later use (checkpoints, exported models, feature
statistics, WER reports, transcripts) goes through :func:`atomic_write`: the content is
written to a temporary file *in the target's folder* (a rename across filesystems would be
a copy, and a kill during the copy leaves a torn file), flushed to disk (``fsync``), given
the usual permissions, renamed over the target, and the folder is synced so the rename
itself survives a power cut. If anything fails the temporary file is removed and the
previous file is left as it was; an ``OSError`` (a full disk above all) is raised again
with a message that names the target and says whether the previous file is intact.

Standard library only: the light modules (``metrics``) use it without importing torch.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # read once at import: flipping it later would race with other threads


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *,
                 rerun: str = "re-run", error: type[OSError] = OSError) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then put it in place.

    ``write`` gets the temporary file's path (the file exists and is empty), so any writer
    works: ``Path.write_text``, ``torch.save``, ``safetensors.torch.save_file``. ``rerun``
    ends the full-disk message ("free some space and {rerun}"), ``error`` is the class
    raised (an ``OSError`` subclass taking ``(errno, message)``). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp)
        _publish(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        if err.errno in _DISK_FULL:
            raise error(err.errno, f"{path}: no space left on the device ({kept}); free some space and {rerun}") from err
        message = f"{path}: cannot be written: {err.strerror or err} ({kept})"
        raise (error(err.errno, message) if err.errno is not None else error(message)) from err
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, rerun: str = "re-run") -> Path:
    """:func:`atomic_write` of UTF-8 text, with ``\\n`` line ends on every platform."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"), rerun=rerun)


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    """Give the finished temporary file the usual permissions (mkstemp makes it 0600), rename it."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
