"""``speechformer serve``: an OpenAI-compatible transcription server that batches across requests.

The layout, one job per module (docs/architecture.md, "Serve"):

* :mod:`.app`: ``create_app`` (the FastAPI application: the API routes, the key check, the
  request counter) and ``run_server`` (uvicorn; SIGTERM drains the queue, then exits);
* :mod:`.worker`: the one thread that owns the model, its bounded queue, and the batching
  across requests;
* :mod:`.upload`: the multipart form, read as it streams in, in memory, within the size limit;
* :mod:`.formats`: the response formats (json, text, srt, vtt, verbose_json) and the
  server-sent events of ``stream=true``;
* :mod:`.errors`: OpenAI's error envelope;
* :mod:`.metrics`: the Prometheus text of ``GET /metrics``.

FastAPI, uvicorn and python-multipart come with the ``serve`` extra; the rest of the toolkit
never imports this package, so it needs none of them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from ..errors import UserError

if TYPE_CHECKING:
    from ..transcribe import Transcriber

REQUIRED = ("fastapi", "uvicorn", "python_multipart")


def require_server_packages() -> None:
    """One line naming the extra when a package of the server is missing."""
    import importlib.util

    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError("serve", f"needs {', '.join(missing)}, which is not installed",
                        "pip install 'speechformer[serve]'")


def serve_command(args: argparse.Namespace, load: "Callable[[], Transcriber]") -> int:
    """``speechformer serve``: check the flags, ``load()`` the transcriber (the model and the
    flags' options, built by the command line as ``transcribe`` builds its own), serve it until SIGTERM."""
    require_server_packages()
    from .app import run_server

    return run_server(args, load)
