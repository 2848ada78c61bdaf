"""The server's web page (``GET /``) in a real browser, and its "look inside" route.

A real uvicorn server on 127.0.0.1 (a free port, in a thread) serves the ``overfit_model``
fixture (it transcribes its training utterances word for word, and has a CTC head, so it
gives word times) with the page's router. Headless Chromium, driven by selenium, opens the
page, uploads a wav file and reads the transcript, the words and their times, the SRT it
offers, and the "look inside" picture. Chromium is started with every background service off
and a fresh profile, so nothing leaves 127.0.0.1. The browser tests skip where Debian's
``chromium``/``chromium-driver`` or selenium is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi (serve extra) not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn (serve extra) not installed")

from speechformer.audio import load_audio  # noqa: E402
from speechformer.data import read_manifest  # noqa: E402
from speechformer.outputs import subtitle_text  # noqa: E402
from speechformer.serve.app import ServerConfig, create_app  # noqa: E402
from speechformer.serve.web import router as web_router  # noqa: E402
from speechformer.serve.worker import Worker  # noqa: E402
from speechformer.transcribe import Transcriber, load_model  # noqa: E402

KEY = "browser-key-7"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@contextmanager
def serving(transcriber: Transcriber):
    """A real server with the page's router, on 127.0.0.1 at a free port, in a thread."""
    worker = Worker(transcriber, max_batch_seconds=60.0, max_wait_ms=10.0, queue_size=8)
    config = ServerConfig("overfit", max_upload_mb=2.0, timeout_s=120.0, api_key=KEY)
    app = create_app(worker, config, routers=[web_router])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def page_server(overfit_model):
    bundle = load_model(overfit_model["model"])
    with serving(Transcriber(bundle, bundle.default_options(), "cpu")) as url:
        yield url, bundle


@pytest.fixture(scope="module")
def utterance(overfit_model):
    return read_manifest(overfit_model["train"])[0]


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver (Debian packages) not installed; .ci/run installs them")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (test extra) not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver, test, seconds: float = 120.0):
    end = time.monotonic() + seconds
    while True:
        value = test()
        if value:
            return value
        assert time.monotonic() < end, f"page status: {driver.find_element('id', 'status').text!r}"
        time.sleep(0.1)


def status_settled(driver, prefix: str):
    text = driver.find_element("id", "status").text
    return text if text.startswith(prefix) or driver.find_element("id", "status").get_attribute("class") == "error" \
        else None


def test_page_uploads_a_wav_and_shows_its_transcript_word_times_and_subtitles(page_server, utterance, browser):
    """The page, driven as a user would: key, file, Transcribe. It shows the memorised text,
    each word with the times the toolkit's own timed transcriber gives, plays from a clicked
    word, offers the SRT `speechformer transcribe --format srt` writes, and draws the look-inside picture."""
    url, bundle = page_server
    timed = Transcriber(bundle, bundle.default_options(timestamps=True), "cpu").transcribe([utterance.audio])[0]
    assert timed.text == utterance.text  # the fixture's model knows this utterance

    browser.get(url + "/")
    browser.find_element("id", "key").send_keys(KEY)
    browser.find_element("id", "file").send_keys(str(Path(utterance.audio).resolve()))
    browser.find_element("id", "transcribe").click()
    assert wait_until(browser, lambda: status_settled(browser, "done")).startswith("done"), \
        browser.find_element("id", "status").text

    assert browser.find_element("id", "transcript").text == utterance.text
    spans = browser.find_elements("css selector", "#words span.word")
    shown = [(s.text.split()[0], float(s.get_attribute("data-start")), float(s.get_attribute("data-end")))
             for s in spans]
    assert shown == [(w.word, round(w.start, 3), round(w.end, 3)) for w in timed.words]
    duration = len(load_audio(utterance.audio)) / 16000
    assert all(0 <= start <= end <= duration + 1e-3 for _, start, end in shown)

    spans[-1].click()  # play from the last word
    at = wait_until(browser, lambda: browser.execute_script("return document.getElementById('player').currentTime"),
                    10)
    assert at == pytest.approx(shown[-1][1], abs=0.3)

    srt = browser.execute_async_script(
        "const done = arguments[0]; fetch(document.getElementById('srt').href).then(r => r.text()).then(done);")
    assert srt.strip() == subtitle_text(timed, "srt").strip()

    browser.find_element("id", "look").click()
    wait_until(browser, lambda: status_settled(browser, "the spectrogram"))
    width = browser.execute_script("const i = document.querySelector('#inside img'); "
                                   "return i && i.complete ? i.naturalWidth : 0;")
    assert width > 100, browser.find_element("id", "status").text


def test_page_shows_the_servers_error_message_for_a_wrong_key(page_server, utterance, browser):
    url, _ = page_server
    browser.get(url + "/")
    browser.find_element("id", "key").send_keys("wrong")
    browser.find_element("id", "file").send_keys(str(Path(utterance.audio).resolve()))
    browser.find_element("id", "transcribe").click()
    wait_until(browser, lambda: browser.find_element("id", "status").get_attribute("class") == "error")
    assert browser.find_element("id", "status").text.startswith("401: Authorization: missing or wrong API key")


# ---------------------------------------------------------------------------- the page and route over httpx
def test_page_is_one_file_that_fetches_nothing_from_outside(page_server):
    url, _ = page_server
    r = httpx.get(url + "/", timeout=30)  # open without a key: the page holds nothing
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/audio/transcriptions" in page and "/v1/speechformer/explain" in page
    for outside in ("http://", "https://", "//cdn", "src=\"//", "import("):
        assert outside not in page, outside


def test_explain_route_returns_a_png_and_refuses_clearly(page_server, utterance, monkeypatch, tmp_path):
    import numpy as np
    import soundfile as sf

    from speechformer import plot

    url, bundle = page_server
    auth = {"Authorization": f"Bearer {KEY}"}
    audio = Path(utterance.audio).read_bytes()

    def post(data: bytes, name: str = "a.wav", headers=auth):
        return httpx.post(url + "/v1/speechformer/explain", files={"file": (name, data)}, headers=headers, timeout=120)

    r = post(audio)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert post(audio, headers={}).status_code == 401
    long = tmp_path / "long.wav"
    noise = 0.1 * np.random.default_rng(0).standard_normal(int((bundle.window_seconds + 1) * 16000))
    sf.write(long, noise.astype(np.float32), 16000)
    r = post(long.read_bytes(), "long.wav")
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert "longer than one window" in r.json()["error"]["message"]
    assert post(b"not audio at all", "x.wav").status_code == 400

    def no_matplotlib():
        raise ImportError(plot.PLOT_EXTRA_HINT)

    monkeypatch.setattr(plot, "pyplot", no_matplotlib)
    r = post(audio)
    assert r.status_code == 501
    assert r.json()["error"]["message"] == f"look inside: {plot.PLOT_EXTRA_HINT} on the server"
