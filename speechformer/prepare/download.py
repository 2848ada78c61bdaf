"""Fetch a corpus archive over HTTP(S): resumable, size- and checksum-verified, then extracted.

Only ever called when the user asks (``--download``); nothing in the toolkit downloads on
its own. The steps, each safe to interrupt and re-run:

1. ``NAME.tar.gz.part`` grows until it has the server's ``Content-Length``; a re-run
   continues it with an HTTP ``Range`` request (a server that ignores ``Range`` and sends
   the whole file again makes us start over, never append a second copy);
2. the complete file's size is checked against the server's and its SHA-256 against the
   published one (when known), and only then renamed to ``NAME.tar.gz``;
3. it is extracted into the destination with tarfile's ``data`` filter (no absolute paths,
   no ``..``, no device files), and a ``NAME.done`` marker makes the next run skip it all.
"""

from __future__ import annotations

import hashlib
import http.client
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import PrepareError

CHUNK = 1 << 20


def _content_range_total(value: str | None) -> int | None:
    """``bytes 100-199/1000`` -> 1000."""
    if value and "/" in value:
        total = value.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return None


def _progress(name: str, done: int, total: int | None, start: float, resumed: int) -> None:
    if not sys.stderr.isatty():
        return
    rate = (done - resumed) / max(time.perf_counter() - start, 1e-6) / 1e6
    of = f" of {total / 1e6:.0f} MB ({100 * done / total:.1f}%)" if total else ""
    print(f"\r{name}: {done / 1e6:.0f} MB{of}, {rate:.1f} MB/s   ", end="", file=sys.stderr, flush=True)


def fetch(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to the file ``dest`` (resuming ``dest.part``); verify; return ``dest``."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part file may already be complete
            total = _content_range_total(err.headers.get("Content-Range"))
            if total == have:
                return _finish(part, dest, total, sha256, url)
            part.unlink()
            raise PrepareError(f"{url}: the server refused to resume at byte {have}; the partial file was "
                               "removed, run again to start over") from err
        raise PrepareError(f"{url}: HTTP {err.code} {err.reason}; check the URL and your connection") from err
    except (urllib.error.URLError, OSError) as err:
        raise PrepareError(f"{url}: cannot connect ({getattr(err, 'reason', err)}); check your internet "
                           "connection, or download the archive yourself and pass its folder") from err
    with response:
        if have and response.status == 206:
            total = _content_range_total(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the whole file (fresh start, or a server that ignores Range)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            have, mode = 0, "wb"
        start = time.perf_counter()
        done = have
        with part.open(mode) as f:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    _progress(dest.name, done, total, start, have)
            except (http.client.HTTPException, OSError) as err:
                raise PrepareError(f"{url}: the download broke off after {done} bytes ({type(err).__name__}); "
                                   f"{part} is kept: run again to resume") from err
        if sys.stderr.isatty():
            print(file=sys.stderr)
    return _finish(part, dest, total, sha256, url)


def _finish(part: Path, dest: Path, total: int | None, sha256: str | None, url: str) -> Path:
    size = part.stat().st_size
    if total is not None and size != total:
        raise PrepareError(f"{part}: {size} of {total} bytes arrived (connection dropped?); run again to resume")
    if sha256:
        digest = hashlib.sha256()
        with part.open("rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
        if digest.hexdigest() != sha256:
            part.unlink()
            raise PrepareError(f"{url}: SHA-256 {digest.hexdigest()} differs from the published {sha256}; "
                               "the download was removed, run again")
    part.replace(dest)
    return dest


def extract(archive: Path, dest: Path) -> None:
    """Unpack a .tar.gz into ``dest`` (safe members only), marking completion with ``NAME.done``."""
    marker = dest / (archive.name.split(".")[0] + ".done")
    if marker.exists():
        return
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python < 3.10.12: refuse what the data filter would refuse
                for m in tar.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                        raise PrepareError(f"{archive}: unsafe member {m.name!r}; not extracting")
                tar.extractall(dest)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise PrepareError(f"{archive}: cannot extract ({err}); delete it and download again") from err
    marker.write_text("extracted\n")


def download_and_extract(url: str, dest: Path, sha256: str | None = None, keep_archive: bool = True) -> None:
    """:func:`fetch` ``url`` into ``dest`` and :func:`extract` it there (both skipped when done)."""
    dest = Path(dest)
    name = url.rsplit("/", 1)[1]
    if (dest / (name.split(".")[0] + ".done")).exists():
        return
    archive = fetch(url, dest / name, sha256)
    extract(archive, dest)
    if not keep_archive:
        archive.unlink()
