"""The FastAPI application of ``speechformer serve``, and the command that runs it under uvicorn.

``create_app(worker, config)`` builds the app: the OpenAI routes (``POST /v1/audio/transcriptions``,
``GET /v1/models``), ``GET /health`` (open without a key), ``GET /metrics`` (Prometheus), the
error envelope for every refusal, and a request counter. More routes (a web page, a "look
inside" view) are added as their own ``APIRouter`` modules, passed in ``routers``; a route finds
the server's parts in :func:`server_of` (``request.app.state.server``) and guards itself with
:func:`require_key`.

A transcription request flows one way: the form is read in memory within the size limit
(:mod:`.upload`); the fields become a :class:`~speechformer.options.TranscribeOptions`, checked
by its ``check`` (a bad value is a 400 naming the field); the audio is decoded and cut into
chunks in a thread of the pool; the :class:`~.worker.Job` waits in the worker's queue (429 when
full, 504 past ``--timeout-s``); the chunk results come back through an asyncio queue and are
rendered (:mod:`.formats`) or streamed as they come.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..atomic import atomic_write
from ..audio import AudioError, decode_audio
from ..errors import UserError
from ..options import TranscribeOptions, timing_source
from ..outputs import prepare_output_dir, safe_name
from ..transcribe import Transcriber, WindowResult
from . import formats
from .errors import APIError, envelope, field_error, install_handlers
from .metrics import Metrics
from .upload import Form, read_form
from .worker import Job, QueueFull, Stopping, Worker

log = logging.getLogger("speechformer.serve")

API_KEY_ENV = "SPEECHFORMER_API_KEY"
#: The non-standard form fields a request may send, and their types (documented in README, "Serve").
EXTRA_FIELDS = {"beam_size": int, "decoder": str, "ctc_weight": float}
GRANULARITIES = "timestamp_granularities[]"


@dataclass
class ServerConfig:
    """What the server is told besides the model and its options (the ``serve`` flags)."""

    model_name: str
    max_upload_mb: float = 25.0
    timeout_s: float = 600.0
    api_key: str | None = None
    save_dir: Path | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass
class Server:
    """The parts every route uses: the worker (and through it the model), the config, the counters."""

    worker: Worker
    config: ServerConfig
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))

    timed: bool = field(init=False)  # the model can time its transcript (srt, vtt)
    word_times: bool = field(init=False)  # ... and its transcriber gives word times

    @property
    def transcriber(self) -> Transcriber:
        return self.worker.base

    def __post_init__(self) -> None:
        """What the model can time, found once. Whether word times come is asked of the timed
        transcriber itself, with digital silence (which it answers without running the model):
        whatever its windows carry as words is what ``timestamp_granularities[]=word`` serves."""
        import torch

        try:
            timing_source(self.worker.bundle)
        except UserError:
            self.timed = self.word_times = False
            return
        timed = self.worker.transcriber(self.transcriber.options.replace(timestamps=True))
        self.timed = True
        self.word_times = timed.transcribe_segments([torch.zeros(160)])[0].words is not None


def server_of(request: Request) -> Server:
    return request.app.state.server


def require_key(request: Request) -> None:
    """``Authorization: Bearer KEY`` when the server has a key (compared in constant time)."""
    key = server_of(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Authorization: missing or wrong API key; send the header `Authorization: Bearer KEY` "
                       f"with the server's key (--api-key or {API_KEY_ENV})", code="invalid_api_key")


# ---------------------------------------------------------------------------- routes
router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    server = server_of(request)
    return {"status": "ok", "model": server.config.model_name, "queue_length": server.worker.queue_length}


@router.get("/metrics", dependencies=[Depends(require_key)])
async def metrics(request: Request) -> Response:
    server = server_of(request)
    return PlainTextResponse(server.metrics.render(server.worker.queue_length),
                             media_type="text/plain; version=0.0.4")


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(server_of(request))]}


@router.get("/v1/models/{model_id}", dependencies=[Depends(require_key)])
async def model(model_id: str, request: Request) -> dict[str, Any]:
    server = server_of(request)
    if model_id != server.config.model_name:
        raise APIError(404, f"model {model_id}: not loaded; this server serves {server.config.model_name}",
                       param="model", code="model_not_found")
    return _model_card(server)


def _model_card(server: Server) -> dict[str, Any]:
    return {"id": server.config.model_name, "object": "model", "created": server.created, "owned_by": "speechformer"}


@router.post("/v1/audio/transcriptions", dependencies=[Depends(require_key)])
async def transcriptions(request: Request) -> Response:
    server = server_of(request)
    with server.worker.arriving():  # a batch about to start waits for this request (max_wait_ms)
        form = await read_form(request, server.config.max_upload_bytes)
        asked = parse_request(form, server)
        wav = await run_in_threadpool(_decode, form, server)
        chunks = await run_in_threadpool(server.transcriber.chunks, wav)
        rate = server.worker.sample_rate
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(chunks, asked.options, rate, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        _submit(server.worker, job)
    windows = _windows(server.worker, job, events, server.config.timeout_s)
    if asked.stream:
        first = await anext(windows)  # a 504 or a failure before the first chunk is still a status
        if isinstance(first, APIError):
            raise first
        return StreamingResponse(formats.stream_events(_prepend(first, windows, server.worker, job)),
                                 media_type="text/event-stream")
    done = [w async for w in _raising(windows)]
    starts = [s / rate for s, _ in chunks]
    ends = [(s + len(w)) / rate for s, w in chunks]
    result = formats.assemble(form.filename, len(wav) / rate, starts, done)
    return formats.render(result, asked.response_format, words=asked.words, language=asked.language,
                          chunks=formats.chunk_segments(starts, ends, done), starts=starts, windows=done)


@dataclass
class Asked:
    """What one request asks for, read from its form."""

    options: TranscribeOptions
    response_format: str
    stream: bool
    words: bool
    language: str


def parse_request(form: Form, server: Server) -> Asked:
    """The form's fields as options and a format, each bad value a 400 naming its field."""
    if form.file is None:
        raise APIError(400, "file: missing; send the audio as the form's file field (curl -F file=@a.wav)",
                       param="file")
    fmt = form.get("response_format") or "json"
    if fmt not in formats.FORMATS:
        raise APIError(400, f"response_format {fmt}: not a format; use one of {', '.join(formats.FORMATS)}",
                       param="response_format", code="invalid_value")
    stream = _boolean(form, "stream")
    if stream and fmt not in ("json", "text"):
        raise APIError(400, f"stream: streams text events, not {fmt}; use response_format json or text, or drop "
                       "stream", param="stream", code="invalid_value")
    grains = form.fields.get(GRANULARITIES, []) + form.fields.get("timestamp_granularities", [])
    for grain in grains:
        if grain not in ("word", "segment"):
            raise APIError(400, f"{GRANULARITIES} {grain}: not a granularity; use word or segment",
                           param=GRANULARITIES, code="invalid_value")
    words = "word" in grains
    if words and fmt != "verbose_json":
        raise APIError(400, f"{GRANULARITIES} word: times come with response_format verbose_json (got {fmt}); send "
                       "response_format=verbose_json", param=GRANULARITIES, code="invalid_value")
    if words and not server.word_times:
        raise APIError(400, f"{GRANULARITIES} word: this model gives no word times (they come from a CTC head's "
                       "alignment, and it has none); drop it, or serve a model with word times",
                       param=GRANULARITIES, code="invalid_value")
    if fmt in formats.SUBTITLES and not server.timed:
        raise APIError(400, f"response_format {fmt}: this model cannot time its transcript (no CTC head, not "
                       "Whisper); use json, text or verbose_json", param="response_format", code="invalid_value")
    _number(form, "temperature", float, lo=0.0, hi=1.0)  # accepted; decoding stays deterministic
    changes: dict[str, Any] = {name: _number(form, name, kind) if kind is not str else form.get(name)
                               for name, kind in EXTRA_FIELDS.items() if form.get(name) not in (None, "")}
    changes["timestamps"] = fmt in formats.SUBTITLES or (fmt == "verbose_json" and server.timed)
    language = form.get("language") or None
    whisper = server.worker.bundle.model.config.is_whisper
    if language and whisper:  # other models have one language: the field is accepted and ignored
        changes["language"] = language
    prompt = form.get("prompt") or None
    if prompt and whisper:  # other models read no previous text: the field is accepted and ignored
        changes["prompt"] = prompt
    names = {"timestamps": "response_format"}
    base = server.transcriber.options
    try:
        options = base.replace(**changes)
        options.check(server.worker.bundle, name=lambda f: names.get(f, f))
    except UserError as err:
        raise field_error(err, names) from err
    spoken = options.language or getattr(server.worker.bundle.tokenizer, "language", None) or "unknown"
    return Asked(options, fmt, stream, words, spoken if whisper else (language or "unknown"))


def _boolean(form: Form, name: str) -> bool:
    value = (form.get(name) or "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise APIError(400, f"{name} {value}: not a boolean; send true or false", param=name, code="invalid_value")
    return value in ("true", "1")


def _number(form: Form, name: str, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    text = form.get(name)
    if text in (None, ""):
        return None
    try:
        value = kind(text)
    except ValueError:
        raise APIError(400, f"{name} {text}: not {'a whole number' if kind is int else 'a number'}; send one",
                       param=name, code="invalid_value") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise APIError(400, f"{name} {text}: must be in [{lo:g}, {hi:g}]; send a value in range", param=name,
                       code="invalid_value")
    return value


def _decode(form: Form, server: Server) -> Any:
    """The upload as a waveform (an undecodable one is a 400 naming the file); kept on disk only
    with ``--save-dir``."""
    assert form.file is not None
    if server.config.save_dir is not None:
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-{safe_name(Path(form.filename).name or 'upload')}"
        data = form.file
        atomic_write(server.config.save_dir / name, lambda tmp: Path(tmp).write_bytes(data))
    try:
        return decode_audio(form.file, form.filename, server.worker.sample_rate)
    except AudioError as err:
        raise APIError(400, str(err), param="file", code="invalid_audio") from err


def _submit(worker: Worker, job: Job) -> None:
    try:
        worker.submit(job)
    except QueueFull as full:
        raise APIError(429, f"queue: full ({worker.queue_size} requests waiting, --queue-size); retry after "
                       f"{full.retry_after} s", code="queue_full", headers={"Retry-After": str(full.retry_after)})
    except Stopping:
        raise APIError(503, "server: shutting down; send the request to another server or retry later",
                       code="shutting_down", headers={"Retry-After": "5"})


async def _windows(worker: Worker, job: Job, events: asyncio.Queue, timeout: float
                   ) -> AsyncIterator[WindowResult | APIError]:
    """The job's chunk results in order, as they come; an :class:`APIError` (504 past ``timeout``
    seconds from now, 500) ends them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(len(job.chunks)):
        try:
            event = await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            worker.cancel(job)
            yield APIError(504, f"request: not transcribed within {timeout:g} s (--timeout-s); retry later, "
                           "or send shorter audio", code="timeout")
            return
        if event[0] == "error":
            yield APIError(500, f"file: {event[1]}", param="file", code="transcription_failed")
            return
        yield event[2]


async def _raising(windows: AsyncIterator[WindowResult | APIError]) -> AsyncIterator[WindowResult]:
    async for w in windows:
        if isinstance(w, APIError):
            raise w
        yield w


async def _prepend(first: WindowResult, rest: AsyncIterator[WindowResult | APIError], worker: Worker, job: Job
                   ) -> AsyncIterator[WindowResult | dict[str, Any]]:
    """The stream's windows, the first already taken; an error after the status was sent becomes
    an error event; a client that hangs up cancels what is left of its job."""
    try:
        yield first
        async for w in rest:
            if isinstance(w, APIError):
                yield envelope(w.status, w.message, w.param, w.code)
                return
            yield w
    finally:
        worker.cancel(job)


# ---------------------------------------------------------------------------- the app
def create_app(worker: Worker, config: ServerConfig, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The server's FastAPI app. ``routers``: more routes (a page, a view), each its own module."""
    server = Server(worker, config, worker.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await run_in_threadpool(worker.stop)  # uvicorn has finished the open requests: the queue is empty

    app = FastAPI(title="speechformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_handlers(app)
    for r in (router, *routers):
        app.include_router(r)
    known = {route.path for r in (router, *routers) for route in r.routes if hasattr(route, "path")}
    app.add_middleware(CountRequests, metrics=server.metrics, known=known)
    return app


class CountRequests:
    """ASGI middleware: count every answer by route and status (an unknown path counts as "other")."""

    def __init__(self, app: Any, metrics: Metrics, known: set[str]) -> None:
        self.app, self.metrics, self.known = app, metrics, known

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            self.metrics.count_request(path if path in self.known else "other", status[0])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ``serve`` flags as a :class:`ServerConfig` (the key from the flag or the environment)."""
    for flag in ("max_upload_mb", "timeout_s", "max_batch_seconds"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')}", f"must be positive, got {getattr(args, flag)}",
                            "give a number above 0")
    for flag in ("queue_size",):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}", f"must be at least 1, got {getattr(args, flag)}",
                            "give a whole number of 1 or more")
    if args.max_wait_ms < 0:
        raise UserError("--max-wait-ms", f"must be at least 0, got {args.max_wait_ms}", "give 0 or more")
    save_dir = prepare_output_dir(args.save_dir, flag="--save-dir") if args.save_dir else None
    model = Path(args.model)
    return ServerConfig(model_name=model.stem if model.is_file() else model.name,
                        max_upload_mb=args.max_upload_mb, timeout_s=args.timeout_s,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, save_dir=save_dir)


def run_server(args: argparse.Namespace, load: Callable[[], Transcriber]) -> int:
    """Check the flags, ``load()`` the model, serve it until SIGTERM or Ctrl-C: uvicorn stops
    accepting, finishes the open requests (the worker keeps running for them), then the worker stops."""
    import uvicorn

    config = config_from_args(args)  # a bad flag is one line before the model loads
    transcriber = load()
    worker = Worker(transcriber, max_batch_seconds=args.max_batch_seconds, max_wait_ms=args.max_wait_ms,
                    queue_size=args.queue_size, batching=args.batching == "on")
    from .web import router as web  # the page at / and its look-inside view

    app = create_app(worker, config, routers=[web])
    print(f"speechformer serve: {config.model_name} on http://{args.host}:{args.port} (batching {args.batching}, "
          f"{'API key required' if config.api_key else 'no API key'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
