"""The server's web page and its "look inside" view: an ``APIRouter`` that ``run_server``
passes to :func:`~.app.create_app`.

* ``GET /``: one static HTML file (``static/index.html``, package data) with a little plain
  JavaScript and nothing fetched from anywhere else. It calls the same
  ``POST /v1/audio/transcriptions`` as every client, so what the page shows is the API's answer.
* ``POST /v1/speechformer/explain`` (multipart ``file``, one window of audio at most): the
  log-mel spectrogram with the best-aligned cross-attention head over it, word by word, as
  PNG, drawn by ``speechformer explain``'s code (:func:`~speechformer.explain.best_head_word_png`).
  It needs matplotlib (the ``plot`` extra); without it the route answers 501 naming the extra.

Explaining captures attention weights by swapping how the attention modules compute
(:func:`~speechformer.model.capture_attention`), which must not touch the worker's batches
running at the same time: it runs on its own copy of the model's modules (sharing the
worker's weight tensors, so it costs no memory to speak of), made on first use, one request at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from importlib import resources

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import plot
from ..explain import best_head_word_png, explain_waveform
from ..transcribe import ModelBundle
from .app import Server, _decode, require_key, server_of
from .errors import APIError
from .upload import read_form

router = APIRouter()
_explain_lock = threading.Lock()  # one explanation at a time, on the copy below


@router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    """The page (open without a key: it holds nothing; the API calls it makes send the key)."""
    return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))


@router.post("/v1/speechformer/explain", dependencies=[Depends(require_key)])
async def explain(request: Request) -> Response:
    server = server_of(request)
    try:
        plot.pyplot()
    except ImportError:
        raise APIError(501, f"look inside: {plot.PLOT_EXTRA_HINT} on the server", code="plot_extra_missing") from None
    form = await read_form(request, server.config.max_upload_bytes)
    if form.file is None:
        raise APIError(400, "file: missing; send the audio as the form's file field", param="file")
    wav = await run_in_threadpool(_decode, form, server)
    seconds = len(wav) / server.worker.sample_rate
    limit = server.worker.bundle.window_seconds
    if seconds > limit:
        raise APIError(400, f"file {form.filename}: {seconds:.1f} s is longer than one window of this model "
                       f"({limit:.1f} s); look inside shows one utterance: send a shorter clip", param="file",
                       code="too_long")
    png = await run_in_threadpool(_explain_png, server, wav)
    return Response(png, media_type="image/png")


def _explain_png(server: Server, wav) -> bytes:  # type: ignore[no-untyped-def]
    with _explain_lock:
        own: ModelBundle | None = getattr(server, "explain_bundle", None)
        if own is None:
            own = server.explain_bundle = modules_copy(server.worker.bundle)  # type: ignore[attr-defined]
        exp = explain_waveform(own, wav, options=server.transcriber.options.replace(timestamps=False))
        return best_head_word_png(exp)


def modules_copy(bundle: ModelBundle) -> ModelBundle:
    """``bundle`` with a copy of its model's modules that shares every tensor: attention
    capture sets a module's ``recorder``, which then touches the copy only. (A full deep copy
    would double the memory, and cannot copy oneDNN-prepacked weights at all.)"""
    shared: dict[int, object] = {}
    for module in bundle.model.modules():
        for value in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()):
            if isinstance(value, torch.Tensor):
                shared[id(value)] = value
    return dataclasses.replace(bundle, model=copy.deepcopy(bundle.model, shared))
