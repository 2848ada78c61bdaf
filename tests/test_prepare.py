"""Corpus preparation (speechformer/prepare/, data_prep/*.py), speed perturbation, compute-stats.

Each corpus test builds a small tree in the corpus's real layout with generated audio
(flac for LibriSpeech, mp3 for Common Voice, wav elsewhere) and checks the manifests field
by field. The last test is the acceptance run: `speechformer prepare librispeech` on spoken
utterances, a 20-step `speechformer fit`, `export` and `evaluate`, all through the CLI.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from conftest import ROOT
from speechformer.audio import load_audio
from speechformer.data import SpeechDataModule, SpeechDataset, Utterance, read_manifest, write_manifest
from speechformer.prepare import PrepareError
from speechformer.prepare import librispeech as ls
from speechformer.prepare.cli import main as prepare_main
from speechformer.prepare.commonvoice import prepare_commonvoice
from speechformer.prepare.download import fetch
from speechformer.prepare.kaldi import read_kaldi_dir
from speechformer.prepare.ljspeech import split as lj_split

SR = 16000


def tone(seconds: float, sr: int = SR, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A sine with a little noise, ``round(seconds * sr)`` samples."""
    n = int(round(seconds * sr))
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / sr) + 0.01 * rng.standard_normal(n)).astype(np.float32)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "speechformer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


# ------------------------------------------------------------------------------------- LibriSpeech
LIBRI = {  # subset -> [(utterance id, seconds, transcript as in trans.txt)]
    "dev-clean": [("1272-128104-0000", 1.234, "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES"),
                  ("1272-128104-0001", 0.75, "NOR IS MISTER QUILTER'S MANNER LESS INTERESTING"),
                  ("1462-170138-0000", 2.0, "HE HAD WRITTEN A NUMBER OF BOOKS HIMSELF")],
    "test-clean": [("1089-134686-0000", 1.5, "HE HOPED THERE WOULD BE STEW FOR DINNER")],
}


def make_librispeech(root: Path, corpus: dict = LIBRI) -> Path:
    """ROOT/LibriSpeech/SUBSET/SPK/CHAP/{SPK-CHAP.trans.txt, SPK-CHAP-NNNN.flac}."""
    for subset, utts in corpus.items():
        for i, (uid, seconds, text) in enumerate(utts):
            spk, chap, _ = uid.split("-")
            folder = root / "LibriSpeech" / subset / spk / chap
            folder.mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"{uid}.flac", tone(seconds, seed=i), SR)
            with (folder / f"{spk}-{chap}.trans.txt").open("a", encoding="utf-8") as f:
                f.write(f"{uid} {text}\n")
    return root


def test_librispeech_manifests_per_subset(tmp_path):
    root = make_librispeech(tmp_path / "corpus")
    written = ls.prepare_librispeech(root, tmp_path / "data")
    assert sorted(written) == ["dev-clean", "test-clean"]
    for subset, utts in LIBRI.items():
        got = rows(tmp_path / "data" / f"{subset}.jsonl")
        assert [r["id"] for r in got] == sorted(u[0] for u in utts)
        for r, (uid, seconds, text) in zip(got, sorted(utts)):
            spk, chap, _ = uid.split("-")
            assert r["audio"] == f"../corpus/LibriSpeech/{subset}/{spk}/{chap}/{uid}.flac"
            assert r["duration"] == pytest.approx(seconds, abs=1e-3)
            assert r["text"] == text.lower()
            assert r["speaker"] == spk
            assert "offset" not in r
    # the manifest's audio resolves and loads
    u = read_manifest(tmp_path / "data" / "dev-clean.jsonl")[1]
    assert len(load_audio(u.audio)) == int(round(0.75 * SR))


def test_librispeech_root_may_be_the_librispeech_folder_and_subsets_can_be_chosen(tmp_path):
    root = make_librispeech(tmp_path / "corpus")
    out = tmp_path / "data"
    assert prepare_main(["librispeech", str(root / "LibriSpeech"), "--out", str(out), "--subsets", "test-clean"]) == 0
    assert [p.name for p in out.iterdir()] == ["test-clean.jsonl"]
    assert prepare_main(["librispeech", str(root), "--out", str(out), "--subsets", "dev-other"]) == 2


def test_librispeech_missing_flac_names_the_transcript_line(tmp_path):
    root = make_librispeech(tmp_path / "corpus")
    (root / "LibriSpeech/dev-clean/1272/128104/1272-128104-0001.flac").unlink()
    with pytest.raises(PrepareError, match=r"1272-128104\.trans\.txt:2: .*1272-128104-0001\.flac not found"):
        ls.prepare_librispeech(root, tmp_path / "data")


# -------------------------------------------------------------------- LibriSpeech --download (offline)
class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves one in-memory file, honours ``Range: bytes=N-``, logs the ranges asked for;
    ``cut`` > 0 makes it announce the full length but send only ``cut`` bytes, then hang up."""

    payload = b""
    name = "/dev-clean.tar.gz"
    ranges: list[str] = []
    cut = 0
    honour_range = True

    def do_GET(self) -> None:  # noqa: N802
        if self.path != self.name:
            self.send_error(404)
            return
        data, start = type(self).payload, 0
        asked = self.headers.get("Range")
        type(self).ranges.append(asked or "")
        if asked and type(self).honour_range:
            start = int(asked.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:type(self).cut] if type(self).cut else body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    handler = type("Handler", (RangeHandler,), {"ranges": [], "cut": 0, "honour_range": True})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fake_archive(tmp_path: Path) -> bytes:
    """A dev-clean.tar.gz as OpenSLR ships it (members under LibriSpeech/dev-clean/)."""
    src = make_librispeech(tmp_path / "src", {"dev-clean": LIBRI["dev-clean"]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "LibriSpeech", arcname="LibriSpeech")
    return buf.getvalue()


def test_download_resumes_after_a_broken_connection_checks_and_extracts(tmp_path, server, monkeypatch):
    handler, url = server
    handler.payload = fake_archive(tmp_path)
    monkeypatch.setitem(ls.SHA256, "dev-clean", hashlib.sha256(handler.payload).hexdigest())
    root = tmp_path / "root"
    half = len(handler.payload) // 2
    handler.cut = half  # the connection drops half way
    with pytest.raises(PrepareError, match=r"(broke off after|of \d+ bytes arrived).* run again to resume"):
        ls.download(root, ["dev-clean"], mirror=url)
    part = root / "dev-clean.tar.gz.part"
    assert part.stat().st_size == half
    handler.cut = 0
    ls.download(root, ["dev-clean"], mirror=url)
    assert handler.ranges == ["", f"bytes={half}-"]  # the second request asked only for the rest
    assert (root / "dev-clean.tar.gz").read_bytes() == handler.payload and not part.exists()
    assert (root / "dev-clean.done").exists()
    ls.prepare_librispeech(root, tmp_path / "data")
    assert [r["id"] for r in rows(tmp_path / "data/dev-clean.jsonl")] == [u[0] for u in LIBRI["dev-clean"]]
    ls.download(root, ["dev-clean"], mirror=url)  # done: no request at all
    assert len(handler.ranges) == 2


def test_download_rejects_a_wrong_checksum_and_refetches(tmp_path, server, monkeypatch):
    handler, url = server
    handler.payload = fake_archive(tmp_path)
    monkeypatch.setitem(ls.SHA256, "dev-clean", "0" * 64)
    with pytest.raises(PrepareError, match="SHA-256 .* differs from the published"):
        ls.download(tmp_path / "root", ["dev-clean"], mirror=url)
    assert not list((tmp_path / "root").glob("dev-clean.tar.gz*"))  # nothing half-trusted is left
    # a complete .part (the transfer ended exactly at the end): the server answers 416, the file is kept
    part = tmp_path / "root" / "x.tar.gz.part"
    part.write_bytes(handler.payload)
    out = fetch(f"{url}/dev-clean.tar.gz", tmp_path / "root" / "x.tar.gz")
    assert out.read_bytes() == handler.payload and handler.ranges[-1] == f"bytes={len(handler.payload)}-"
    # a server that ignores Range sends the whole file again: start over, never append a second copy
    handler.honour_range = False
    (tmp_path / "root" / "y.tar.gz.part").write_bytes(handler.payload[:1000])
    out = fetch(f"{url}/dev-clean.tar.gz", tmp_path / "root" / "y.tar.gz")
    assert out.read_bytes() == handler.payload and handler.ranges[-1] == "bytes=1000-"
    with pytest.raises(PrepareError, match="HTTP 404"):
        fetch(f"{url}/nothing.tar.gz", tmp_path / "root" / "nothing.tar.gz")


# ------------------------------------------------------------------------------------- Common Voice
needs_mp3 = pytest.mark.skipif("MP3" not in sf.available_formats(),
                               reason="this libsndfile cannot write MP3 (needs libsndfile >= 1.1)")
CV_HEADER = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment"
CV = {  # split -> [(clip, seconds, client, sentence)]
    "train": [("common_voice_en_100.mp3", 1.5, "aaa1", "Hello, world!"),
              ("common_voice_en_101.mp3", 2.25, "bbb2", 'She said "no"  twice.')],
    "dev": [("common_voice_en_200.mp3", 1.0, "aaa1", "Quiet evenings.")],
    "test": [("common_voice_en_300.mp3", 3.0, "ccc3", "Rivers and mountains")],
}


def make_commonvoice(base: Path) -> Path:
    (base / "clips").mkdir(parents=True)
    for split, clips in CV.items():
        lines = [CV_HEADER]
        for i, (clip, seconds, client, sentence) in enumerate(clips):
            sf.write(base / "clips" / clip, tone(seconds, 48000, seed=i), 48000, format="MP3")
            lines.append(f"{client}\t{clip}\tsid{i}\t{sentence}\t\t2\t0\t\t\t\t\ten\t")
        if split == "train":  # a row without a sentence is skipped
            lines.append("ddd4\tcommon_voice_en_999.mp3\tsid9\t\t\t2\t0\t\t\t\t\ten\t")
        (base / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base


@needs_mp3
def test_commonvoice_manifests_with_mp3_durations(tmp_path, capsys):
    base = make_commonvoice(tmp_path / "cv-corpus" / "en")
    prepare_commonvoice(base, tmp_path / "data")
    assert "skipped 1 row(s) of train.tsv with an empty sentence: common_voice_en_999" in capsys.readouterr().err
    for split, clips in CV.items():
        got = rows(tmp_path / "data" / f"{split}.jsonl")
        assert [r["id"] for r in got] == [c[0][:-4] for c in clips]
        for r, (clip, seconds, client, sentence) in zip(got, clips):
            assert r["audio"] == f"../cv-corpus/en/clips/{clip}"
            assert r["duration"] == pytest.approx(seconds, abs=1e-3)
            assert r["text"] == " ".join(sentence.split())
            assert r["speaker"] == client


@needs_mp3
def test_commonvoice_mp3_decodes_to_the_written_tone(tmp_path):
    path = tmp_path / "a.mp3"
    sf.write(path, tone(1.5, 48000), 48000, format="MP3")
    wav = load_audio(path, SR).numpy()
    assert abs(len(wav) - 1.5 * SR) <= 1
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.argmax(spectrum) * SR / len(wav) == pytest.approx(440, abs=2)  # the tone survived MP3 + resampling


@needs_mp3
def test_commonvoice_errors_name_the_tsv_line(tmp_path):
    base = make_commonvoice(tmp_path / "en")
    (base / "clips" / "common_voice_en_101.mp3").unlink()
    with pytest.raises(PrepareError, match=r"train\.tsv:3: .*common_voice_en_101\.mp3 not found"):
        prepare_commonvoice(base, tmp_path / "data")
    (base / "test.tsv").write_text("path\tsentence\nx.mp3\thi\n")
    with pytest.raises(PrepareError, match=r"test\.tsv:1: missing column\(s\) client_id"):
        prepare_commonvoice(base, tmp_path / "data", splits=["test"])


# ------------------------------------------------------------------------------------- LJSpeech
def make_ljspeech(root: Path, n: int = 7) -> list[tuple[str, float, str]]:
    (root / "wavs").mkdir(parents=True)
    clips = []
    lines = []
    for i in range(n):
        uid = f"LJ{1 + i // 3:03d}-{i % 3 + 1:04d}"
        seconds = 0.5 + 0.25 * i
        sf.write(root / "wavs" / f"{uid}.wav", tone(seconds, 22050, seed=i), 22050, subtype="PCM_16")
        raw, norm = f"In {1800 + i}, Mr. Smith came.", f"In eighteen hundred {i}, Mister Smith came."
        if i == 2:
            norm = ""  # falls back to the raw column
        clips.append((uid, seconds, norm or raw))
        lines.append(f"{uid}|{raw}|{norm}")
    (root / "metadata.csv").write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")  # order does not matter
    return clips


def test_ljspeech_fixed_split_and_normalized_text(tmp_path):
    clips = make_ljspeech(tmp_path / "LJSpeech-1.1")
    assert prepare_main(["ljspeech", str(tmp_path / "LJSpeech-1.1"), "--out", str(tmp_path / "data"),
                         "--valid", "2", "--test", "2"]) == 0
    parts = {name: rows(tmp_path / "data" / f"{name}.jsonl") for name in ("train", "valid", "test")}
    assert [[r["id"] for r in parts[n]] for n in ("train", "valid", "test")] == [
        [c[0] for c in clips[:3]], [c[0] for c in clips[3:5]], [c[0] for c in clips[5:]]]
    got = {r["id"]: r for p in parts.values() for r in p}
    for uid, seconds, text in clips:
        assert got[uid]["duration"] == pytest.approx(seconds, abs=1e-3)
        assert got[uid]["text"] == text and got[uid]["speaker"] == "LJ"
        assert got[uid]["audio"] == f"../LJSpeech-1.1/wavs/{uid}.wav"


def test_ljspeech_default_split_sizes():
    utts = [Utterance(f"LJ{1 + i // 262:03d}-{i % 262 + 1:04d}", Path("x.wav"), 1.0, "t") for i in range(13100)]
    parts = lj_split(list(reversed(utts)))
    assert [len(parts[n]) for n in ("train", "valid", "test")] == [12600, 250, 250]
    assert parts["test"][-1].id == "LJ050-0262" and parts["valid"][0].id == utts[12600].id


# ------------------------------------------------------------------------------------- Kaldi
def make_kaldi(base: Path) -> Path:
    audio = base / "audio"
    audio.mkdir(parents=True)
    sf.write(audio / "meeting.wav", tone(10.0, seed=1), SR)
    sf.write(audio / "call.flac", tone(4.0, 8000, seed=2), 8000)
    data = base / "data" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text("call audio/call.flac\nmeeting audio/meeting.wav\n")
    (data / "segments").write_text("spk1-meeting-000 meeting 0.00 2.50\nspk1-meeting-001 meeting 3.25 6.10\n"
                                   "spk2-call-000 call 1.5 -1\nspk2-meeting-002 meeting 7 9.875\n")
    (data / "text").write_text("spk1-meeting-000 hello there\nspk1-meeting-001 how  are you\n"
                               "spk2-call-000 fine thanks\nspk2-meeting-002 good bye\n")
    (data / "utt2spk").write_text("spk1-meeting-000 spk1\nspk1-meeting-001 spk1\nspk2-call-000 spk2\n"
                                  "spk2-meeting-002 spk2\n")
    return data


def test_kaldi_dir_with_segments_gives_offsets(tmp_path):
    data = make_kaldi(tmp_path)
    out = tmp_path / "m.jsonl"
    assert prepare_main(["kaldi", str(data), "--out", str(out), "--audio-root", str(tmp_path)]) == 0
    got = [(r["id"], r["audio"], r["duration"], r.get("offset", 0.0), r["text"], r["speaker"]) for r in rows(out)]
    assert got == [
        ("spk1-meeting-000", "audio/meeting.wav", 2.5, 0.0, "hello there", "spk1"),
        ("spk1-meeting-001", "audio/meeting.wav", 2.85, 3.25, "how are you", "spk1"),
        ("spk2-call-000", "audio/call.flac", 2.5, 1.5, "fine thanks", "spk2"),
        ("spk2-meeting-002", "audio/meeting.wav", 2.875, 7.0, "good bye", "spk2"),
    ]
    # the segment is what the loader reads
    u = read_manifest(out)[1]
    assert len(load_audio(u.audio, offset=u.offset, duration=u.duration)) == int(round(2.85 * SR))


def test_kaldi_dir_without_segments_and_relative_paths_from_the_working_folder(tmp_path, monkeypatch):
    data = make_kaldi(tmp_path)
    (data / "segments").unlink()
    (data / "text").write_text("call fine thanks\nmeeting hello there\n")
    (data / "utt2spk").unlink()
    monkeypatch.chdir(tmp_path)
    utts = read_kaldi_dir(data)
    assert [(u.id, u.audio, u.duration, u.offset, u.speaker) for u in utts] == [
        ("call", tmp_path / "audio/call.flac", 4.0, 0.0, ""), ("meeting", tmp_path / "audio/meeting.wav", 10.0, 0.0, "")]


def test_kaldi_pipe_and_bad_segment_are_named(tmp_path):
    data = make_kaldi(tmp_path)
    (data / "wav.scp").write_text("call audio/call.flac\nmeeting sox audio/meeting.sph -t wav - |\n")
    with pytest.raises(PrepareError, match=r"wav\.scp:2: is a command pipe \('sox audio/meeting\.sph -t wav - \|'\)"):
        read_kaldi_dir(data, tmp_path)
    (data / "wav.scp").write_text("call audio/call.flac\nmeeting audio/meeting.wav\n")
    (data / "segments").write_text((data / "segments").read_text().replace("9.875", "12.0"))
    with pytest.raises(PrepareError, match=r"segments:4: segment ends at 12\.000 s, after the end"):
        read_kaldi_dir(data, tmp_path)


@pytest.mark.parametrize("segmented", [True, False])
def test_manifest_to_kaldi_and_back_is_the_same(tmp_path, segmented):
    if segmented:
        src = read_kaldi_dir(make_kaldi(tmp_path), tmp_path)
    else:
        (tmp_path / "wavs").mkdir()
        src = []
        for i, seconds in enumerate((1.25, 2.0, 0.875)):
            sf.write(tmp_path / "wavs" / f"u{i}.wav", tone(seconds, seed=i), SR)
            src.append(Utterance(f"s{i % 2}-u{i}", tmp_path / "wavs" / f"u{i}.wav", seconds, f"words {i}", f"s{i % 2}"))
    write_manifest(tmp_path / "a.jsonl", src)
    assert prepare_main(["to-kaldi", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "kaldi")]) == 0
    assert (tmp_path / "kaldi" / "segments").exists() == segmented
    assert (tmp_path / "kaldi" / "spk2utt").read_text().splitlines()[0].split()[0] == ("spk1" if segmented else "s0")
    assert prepare_main(["kaldi", str(tmp_path / "kaldi"), "--out", str(tmp_path / "b.jsonl")]) == 0
    a, b = read_manifest(tmp_path / "a.jsonl"), read_manifest(tmp_path / "b.jsonl")
    a = sorted(a, key=lambda u: u.id)  # Kaldi files are sorted by key
    assert [(u.id, u.audio.resolve(), u.duration, u.offset, u.text, u.speaker) for u in a] == \
           [(u.id, u.audio.resolve(), u.duration, u.offset, u.text, u.speaker) for u in b]


# ------------------------------------------------------------------------------------- speed perturbation
@pytest.mark.parametrize("factor", [0.9, 1.0, 1.1])
def test_speed_perturbation_changes_the_length_by_the_factor(tmp_path, factor):
    sf.write(tmp_path / "a.wav", tone(2.0), SR)
    utt = Utterance("a", tmp_path / "a.wav", 2.0, "a")
    wav = SpeechDataset([utt], None, SR, speed_perturb=[factor])[0]["wav"]
    assert abs(len(wav) - 2.0 * SR / factor) <= 1
    if factor != 1.0:  # the tone moves with the speed (tempo and pitch, as Kaldi's sox speed)
        peak = np.argmax(np.abs(np.fft.rfft(wav.numpy()))) * SR / len(wav)
        assert peak == pytest.approx(440 * factor, abs=2)


def test_speed_perturbation_keeps_its_resampling_kernel_and_equals_torchaudios_resample():
    from speechformer.data import _resampler, change_speed

    for seconds in (0.0113, 1.0, 2.7071):  # lengths that are no multiple of the resampling period
        wav = torch.from_numpy(tone(seconds))
        for factor in (0.9, 1.1):
            expected = torchaudio.functional.resample(wav, int(round(SR * factor)), SR)
            got = change_speed(wav, SR, factor)
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
        two = torch.stack([wav, -wav])  # a batch of signals: each resampled on its own
        assert torch.allclose(change_speed(two, SR, 1.1)[1], -change_speed(wav, SR, 1.1), atol=1e-6)
    assert _resampler(int(SR * 0.9), SR) is _resampler(int(SR * 0.9), SR)  # made once, not per utterance


def test_speed_perturbation_draws_among_factors_for_training_only(tmp_path, monkeypatch):
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    write_manifest(tmp_path / "m.jsonl", [Utterance("a", tmp_path / "a.wav", 1.0, "a")])
    monkeypatch.setattr("speechformer.data.load_tokenizer", lambda path: None)  # audio only
    dm = SpeechDataModule(train_manifest=str(tmp_path / "m.jsonl"), valid_manifest=str(tmp_path / "m.jsonl"),
                          speed_perturb=[0.9, 1.0, 1.1])
    train = dm.train_dataset()
    assert train.speed_perturb == [0.9, 1.0, 1.1]
    assert dm._dataset("valid", dm.valid_manifest).speed_perturb == []
    torch.manual_seed(0)
    assert {len(train[0]["wav"]) for _ in range(40)} == {math.ceil(SR / 0.9), SR, math.ceil(SR / 1.1)}  # resample rounds up
    with pytest.raises(ValueError, match="speed_perturb"):
        SpeechDataset([], None, SR, speed_perturb=[0.0])


# ------------------------------------------------------------------------------------- compute-stats
def test_compute_stats_equals_what_training_computes_and_training_loads_it(tmp_path):
    from speechformer.frontend import LogMelFrontend
    from speechformer.lightning import SpeechModule
    from speechformer.model import ModelConfig
    from speechformer.prepare.stats import load_feature_stats

    utts = []
    for i in range(4):
        sf.write(tmp_path / f"u{i}.wav", tone(0.5 + 0.25 * i, freq=200 + 100 * i, seed=i), SR)
        utts.append(Utterance(f"u{i}", tmp_path / f"u{i}.wav", 0.5 + 0.25 * i, "x"))
    write_manifest(tmp_path / "m.jsonl", utts)
    assert prepare_main(["compute-stats", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "stats.json")]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["utterances"] == 4 and stats["frames"] == sum(int(u.duration * SR) // 160 + 1 for u in utts)

    config = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, vocab_size=8)
    module = SpeechModule(model=config, stats_utterances=100)
    # what fit does without a stats file; speed perturbation of the training set does not enter the statistics
    module.compute_feature_stats(SpeechDataset(utts, None, SR, speed_perturb=[0.9, 1.1]))
    loaded = LogMelFrontend()
    load_feature_stats(tmp_path / "stats.json", loaded)
    assert torch.equal(loaded.mean, module.model.frontend.mean) and torch.equal(loaded.std, module.model.frontend.std)
    assert torch.allclose(loaded.mean, torch.tensor(stats["mean"]))

    with pytest.raises(PrepareError, match="n_mels 80 in the file but 40 in the model"):
        load_feature_stats(tmp_path / "stats.json", LogMelFrontend(n_mels=40))
    # fit's setup takes the file instead of computing (model.feature_stats)
    module = SpeechModule(model=config, feature_stats=str(tmp_path / "stats.json"))

    class DM:
        def train_dataset(self):
            return SpeechDataset(utts[:1], None, SR)

    module.trainer = type("T", (), {"datamodule": DM()})()
    module.compute_feature_stats = None  # must not be called
    module.setup("fit")
    assert torch.equal(module.model.frontend.mean, loaded.mean)


# ------------------------------------------------------------------------------------- acceptance
@pytest.mark.slow
def test_prepare_librispeech_then_fit_20_steps_then_evaluate_via_the_cli(tmp_path, tiny_corpus):
    """tiny_corpus (espeak-ng speech) as a LibriSpeech tree -> prepare -> tokenizer -> compute-stats ->
    fit 20 steps (speed perturbation on) -> export -> evaluate test-clean."""
    subsets = {"train": "train-clean-100", "valid": "dev-clean", "test": "test-clean"}
    speakers: dict[str, str] = {}
    for split, subset in subsets.items():
        for i, u in enumerate(read_manifest(tiny_corpus / f"{split}.jsonl")):
            spk = speakers.setdefault(u.speaker, str(100 + len(speakers)))
            chap = "10"
            folder = tmp_path / "corpus" / "LibriSpeech" / subset / spk / chap
            folder.mkdir(parents=True, exist_ok=True)
            uid = f"{spk}-{chap}-{i:04d}"
            sf.write(folder / f"{uid}.flac", load_audio(u.audio, SR).numpy(), SR)
            with (folder / f"{spk}-{chap}.trans.txt").open("a") as f:
                f.write(f"{uid} {u.text.upper()}\n")
    data, exp = tmp_path / "data", tmp_path / "exp"

    def ok(*args: str) -> str:
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    out = ok("prepare", "librispeech", "corpus", "--out", "data")
    assert "train-clean-100: 8 utterances" in out and "test-clean: 2 utterances" in out
    ok("tokenizer", "train", "--manifest", "data/train-clean-100.jsonl", "--vocab-size", "40", "--out", "exp/tok")
    ok("compute-stats", "data/train-clean-100.jsonl", "--out", "exp/stats.json")
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 20, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "check_val_every_n_epoch": 5, "default_root_dir": "exp",
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": "exp/checkpoints", "save_last": True}}]},
        "model": {"model": {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_encoder_layers": 1,
                            "n_decoder_layers": 1, "subsampling_channels": 16, "dropout": 0.0},
                  "lr": 0.003, "warmup_steps": 5, "peak_tflops": 1.0, "feature_stats": "exp/stats.json"},
        "data": {"train_manifest": "data/train-clean-100.jsonl", "valid_manifest": "data/dev-clean.jsonl",
                 "tokenizer": "exp/tok", "max_batch_seconds": 20, "num_workers": 0,
                 "speed_perturb": [0.9, 1.0, 1.1]},
    }
    (tmp_path / "fit.yaml").write_text(json.dumps(config))  # JSON is YAML
    out = ok("fit", "--config", "fit.yaml")
    assert "feature statistics from exp/stats.json" in out
    ckpt = torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 20
    ok("export", "--model", "exp/checkpoints/last.ckpt", "--out", "exp/model")
    out = ok("evaluate", "--model", "exp/model", "--manifest", "data/test-clean.jsonl", "--out", "exp/eval",
             "--device", "cpu", "--quiet")
    summary = json.loads((exp / "eval" / "summary.json").read_text())
    assert summary["num_utterances"] == 2 and summary["wer"] is not None
    ids = [line.split("\t")[0] for line in (exp / "eval" / "utterances.tsv").read_text().splitlines()[1:]]
    assert sorted(ids) == [r["id"] for r in rows(data / "test-clean.jsonl")]


def test_data_prep_scripts_are_the_same_commands(tmp_path):
    """data_prep/*.py run from a checkout (no install) and write what `speechformer prepare` writes."""
    data = make_kaldi(tmp_path)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "kaldi.py"), str(data), "--out", "a.jsonl"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert prepare_main(["kaldi", str(data), "--out", str(tmp_path / "b.jsonl"), "--audio-root", str(tmp_path)]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert "kaldi: " in proc.stdout and "4 utterances (3 with an offset)" in proc.stdout
