"""The multipart form of ``POST /v1/audio/transcriptions``, read as it streams in.

Starlette's own form parser spools a file part over 1 MB to a temporary file on disk; a server
that promises not to write its callers' audio anywhere cannot use it. This reader keeps the
parts in memory and counts the body while it arrives: past the limit it stops keeping bytes
(nothing beyond the limit is ever held), reads the rest away so the client gets its answer
instead of a reset connection, and refuses with 413. A ``Content-Length`` over the limit is
refused the same way before any byte is kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import APIError

#: Beyond the limit, at most this much more is read away before the connection is dropped.
DRAIN_BYTES = 64 * 1024 * 1024


@dataclass
class Form:
    """The fields of the form (each name with all its values, in order) and its one file."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    file: bytes | None = None
    filename: str = "file"

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default


class _Parts:
    """python-multipart's callbacks, gathering each part's headers and bytes."""

    def __init__(self) -> None:
        self.form = Form()
        self.headers: dict[bytes, bytes] = {}
        self.name = self.value = b""
        self.data = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_part_data": self.part_data, "on_part_end": self.part_end}

    def begin(self) -> None:
        self.headers, self.data = {}, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.name.lower()] = self.value
        self.name = self.value = b""

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.data += data[start:end]

    def part_end(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in params and name == "file":
            self.form.file = bytes(self.data)
            self.form.filename = params[b"filename"].decode("utf-8", "replace") or "file"
        else:
            self.form.fields.setdefault(name, []).append(self.data.decode("utf-8", "replace"))


def too_large(limit: int) -> APIError:
    return APIError(413, f"file: the upload is over the server's limit of {limit / 2**20:g} MB "
                    "(--max-upload-mb); send a shorter or compressed file (flac, ogg, mp3)",
                    param="file", code="file_too_large")


async def read_form(request: Request, limit: int) -> Form:
    """The request's multipart form, at most ``limit`` bytes of body, in memory."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise APIError(400, "request: the body must be multipart/form-data with a file field; send the audio as "
                       "a form upload (curl -F file=@a.wav)", param="file")
    body = request.stream()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        await _drain(body, limit)
        raise too_large(limit)
    parts = _Parts()
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    received = 0
    async for chunk in body:
        received += len(chunk)
        if received > limit:
            await _drain(body, limit)
            raise too_large(limit)
        parser.write(chunk)
    parser.finalize()
    return parts.form


async def _drain(body: AsyncIterator[bytes], limit: int) -> None:
    """Read the rest of the body away without keeping it, up to :data:`DRAIN_BYTES`."""
    seen = 0
    try:
        async for chunk in body:
            seen += len(chunk)
            if seen > DRAIN_BYTES + limit:
                return
    except Exception:  # noqa: BLE001 - the client went away: nothing left to read
        return
