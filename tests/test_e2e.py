"""End to end: a tiny model overfits real (synthesised) speech; the CLI transcribes and scores with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechformer.audio import load_audio
from speechformer.data import read_manifest
from speechformer.metrics import score
from speechformer.transcribe import Transcriber, load_checkpoint

pytestmark = pytest.mark.slow


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "speechformer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_overfit_tiny_model_learns_its_utterances_to_wer_zero(overfit_model):
    utts = read_manifest(overfit_model["train"])
    t = Transcriber.from_pretrained(overfit_model["model"], device="cpu")
    results = t.transcribe([u.audio for u in utts])
    report = score([u.id for u in utts], [u.text for u in utts], [r.text for r in results])
    assert report.wer == 0.0, [(u.text, r.text) for u, r in zip(utts, results) if u.text != r.text]


def test_checkpoint_and_exported_model_give_the_same_transcripts(overfit_model):
    utts = read_manifest(overfit_model["train"])[:4]
    a = Transcriber.from_pretrained(overfit_model["ckpt"], device="cpu", beam_size=3).transcribe([u.audio for u in utts])
    b = Transcriber.from_pretrained(overfit_model["model"], device="cpu", beam_size=3).transcribe([u.audio for u in utts])
    assert [r.text for r in a] == [r.text for r in b] == [u.text for u in utts]


def test_checkpoint_is_plain_data(overfit_model):
    ckpt = load_checkpoint(overfit_model["ckpt"])  # weights_only=True inside
    meta = ckpt["speechformer"]
    assert meta["tokenizer"]["type"] == "sentencepiece" and meta["config"]["d_model"] == 96
    assert meta["max_input_seconds"] > 0


def _acceptance_inputs(folder: Path, utts) -> tuple[list[Path], list[str]]:
    """8 kHz stereo wav, 44.1 kHz flac, a 3-minute wav, and a corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b = utts[0], utts[1]
    wav_a = load_audio(a.audio, 8000).numpy()
    stereo = folder / "eight_khz_stereo.wav"
    sf.write(stereo, np.stack([wav_a, wav_a * 0.8], axis=1), 8000)
    flac = folder / "cd_rate.flac"
    sf.write(flac, load_audio(b.audio, 44100).numpy(), 44100)
    # three minutes: the training utterances one after another with a second of quiet between
    pieces, words = [], []
    silence = np.zeros(16000, dtype=np.float32)
    while sum(len(p) for p in pieces) < 180 * 16000:
        for u in utts:
            pieces += [load_audio(u.audio, 16000).numpy(), silence]
            words.append(u.text)
    long = folder / "three_minutes.wav"
    sf.write(long, np.concatenate(pieces)[:180 * 16000 + 1], 16000)
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(2000))
    return [stereo, flac, long, corrupt], [a.text, b.text, " ".join(words)]


def test_cli_transcribe_good_files_and_one_corrupt(overfit_model, tmp_path):
    utts = read_manifest(overfit_model["train"])
    paths, expected = _acceptance_inputs(tmp_path / "in", utts)
    out = tmp_path / "out.tsv"
    proc = run_cli("transcribe", "--model", str(overfit_model["model"]), *map(str, paths),
                   "--format", "tsv", "--output", str(out))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt.wav" in errors[0], proc.stderr
    rows = out.read_text().splitlines()[1:]
    assert [Path(r.split("\t")[0]).name for r in rows] == ["eight_khz_stereo.wav", "cd_rate.flac", "three_minutes.wav"]
    texts = [r.split("\t")[1] for r in rows]
    assert texts[1] == expected[1]
    # 8 kHz has lost the upper band this memorising model keyed on: check it was read, mixed to mono,
    # resampled and decoded exactly as the Python API does it
    api = Transcriber.from_pretrained(overfit_model["model"], device="cpu").transcribe([paths[0]])
    assert texts[0] and texts[0] == api[0].text
    # the long file was cut into chunks at quiet points and the pieces joined: several of the training
    # sentences come out whole, and about as many words as were spoken. (A model that memorised 8
    # utterances is brittle on a chunk's shifted context: its long-file WER is 66-76%, and which
    # sentence comes first changed with the rounding of the fused attention projections.)
    long_words = texts[2].split()
    assert len({u.text for u in utts if u.text in texts[2]}) >= 3, texts[2]
    assert 0.5 * len(expected[2].split()) < len(long_words) < 2 * len(expected[2].split())


def test_cli_transcribes_a_50_ms_clip_alone_and_short_clips_batched_together(overfit_model, tmp_path):
    """A 50 ms wav alone, and several short clips in one batch (batch_seconds 2): on main both
    ended in a conv2d RuntimeError ("Kernel size: (3 x 3)") and nothing was transcribed."""
    speech = load_audio(read_manifest(overfit_model["train"])[0].audio).numpy()
    fifty = tmp_path / "fifty_ms.wav"
    sf.write(fifty, speech[4000:4800], 16000)
    alone = run_cli("transcribe", "--model", str(overfit_model["model"]), str(fifty), "--format", "json")
    assert alone.returncode == 0, alone.stderr
    assert [r["path"] for r in json.loads(alone.stdout)] == [str(fifty)] and "error" not in alone.stdout
    clips = []
    for ms in (1, 10, 30, 50, 60):
        clips.append(tmp_path / f"clip_{ms}ms.wav")
        sf.write(clips[-1], speech[4000:4000 + 16 * ms], 16000)
    results = Transcriber.from_pretrained(overfit_model["ckpt"], device="cpu", batch_seconds=2).transcribe(clips)
    assert [(r.path, r.ok, r.error) for r in results] == [(p, True, None) for p in clips]


def test_long_audio_is_chunked_at_pauses_and_joined_in_order(overfit_model, monkeypatch):
    t = Transcriber.from_pretrained(overfit_model["model"], device="cpu")
    t.chunk_seconds = 3.0
    tone = np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.5
    quiet = np.zeros(12000, dtype=np.float32)
    wav = torch.from_numpy(np.concatenate([tone, quiet] * 10))  # 10 one-second "words", 0.75 s pauses
    seen = []

    def fake(wavs):
        seen.extend(len(w) for w in wavs)
        return [f"c{i}" for i in range(len(wavs))]

    monkeypatch.setattr(t, "transcribe_waveforms", fake)
    from speechformer.transcribe import AudioItem
    results = t._transcribe_loaded([AudioItem("long", Path("long.wav"))], [wav])
    assert len(seen) == 10 and max(seen) <= 3.0 * 16000  # one chunk per pause-separated burst
    assert results[0].text == " ".join(f"c{i}" for i in range(10))


def test_cli_transcribe_formats_and_folders(overfit_model, tmp_path):
    utts = read_manifest(overfit_model["train"])[:2]
    folder = tmp_path / "audio"
    folder.mkdir()
    for u in utts:
        sf.write(folder / f"{u.id}.wav", load_audio(u.audio).numpy(), 16000)
    proc = run_cli("transcribe", "--model", str(overfit_model["ckpt"]), str(folder), "--format", "json",
                   "--output-dir", str(tmp_path / "txt"))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(r["text"] for r in rows) == sorted(u.text for u in utts)
    assert sorted(p.name for p in (tmp_path / "txt").iterdir()) == sorted(f"{u.id}.txt" for u in utts)
    bad = run_cli("transcribe", "--model", str(overfit_model["model"]), str(folder), "--beam-size", "0")
    assert bad.returncode != 0 and "--beam-size" in bad.stderr


def test_cli_evaluate_writes_report(overfit_model, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--model", str(overfit_model["model"]), "--manifest", str(overfit_model["train"]),
                   "--out", str(out), "--beam-size", "2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wer"] == 0.0 and summary["num_utterances"] == 8
    lines = (out / "utterances.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:4] == ["id", "reference", "hypothesis", "errors"] and len(lines) == 9
    assert (out / "errors.txt").exists()
    assert "| train" in proc.stdout and "0.00" in proc.stdout


def test_cli_average_and_export(overfit_model, tmp_path):
    ckpt_dir = overfit_model["exp"] / "checkpoints"
    avg = tmp_path / "avg.ckpt"
    proc = run_cli("average", "--ckpt-dir", str(ckpt_dir), "--num", "2", "--out", str(avg))
    assert proc.returncode == 0, proc.stderr
    averaged = load_checkpoint(avg)["state_dict"]
    best = [p for p in ckpt_dir.glob("*.ckpt") if not p.name.startswith("last")]
    reference = load_checkpoint(best[0])["state_dict"]
    if len(best) == 1:  # the average of one checkpoint is itself
        for k, v in reference.items():
            torch.testing.assert_close(averaged[k], v)
    proc = run_cli("export", "--model", str(avg), "--out", str(tmp_path / "model"))
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "model").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}


def test_long_file_is_read_in_blocks_and_every_part_transcribed_once(overfit_model, monkeypatch, tmp_path):
    """A file longer than ``stream_seconds`` is never loaded whole: it is read block by block,
    and a chunk cut by a block's end starts the next block (nothing lost, nothing twice)."""
    from speechformer import transcribe as tr

    t = Transcriber.from_pretrained(overfit_model["model"], device="cpu", stream_seconds=12.0)
    t.chunk_seconds = 3.0
    t.stream_seconds = 12.0
    tone = np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.5
    quiet = np.zeros(12000, dtype=np.float32)
    sf.write(tmp_path / "long.wav", np.concatenate([tone, quiet] * 40), 16000)  # 40 bursts, 70 s
    loaded, chunks = [], []
    real_load = tr.load_audio

    def spy_load(*args, **kwargs):
        wav = real_load(*args, **kwargs)
        loaded.append(len(wav))
        return wav

    def fake(wavs):
        chunks.extend(len(w) for w in wavs)
        return ["w"] * len(wavs)

    monkeypatch.setattr(tr, "load_audio", spy_load)
    monkeypatch.setattr(t, "transcribe_waveforms", fake)
    result = t.transcribe([tmp_path / "long.wav"])[0]
    assert result.ok and result.duration == pytest.approx(70.0, abs=0.01)
    assert len(loaded) > 5 and max(loaded) <= 12.0 * 16000  # never the whole file at once
    assert len(chunks) == 40 and result.text == " ".join(["w"] * 40)  # each burst exactly once
