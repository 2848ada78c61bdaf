"""Word timestamps from a CTC forced alignment, subtitles, and the CLI's --timestamps/--format srt."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechformer.audio import load_audio
from speechformer.data import read_manifest
from speechformer.timestamps import (FrameClock, Word, align_tokens, format_srt, format_vtt, group_words,
                                     word_timestamps, words_to_cues)

SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """A strict little SRT reader: number, times line, text, blank line."""
    cues = []
    blocks = text.strip("\n").split("\n\n")
    for n, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(n), block
        m = re.fullmatch(SRT_TIME + " --> " + SRT_TIME, lines[1])
        assert m, lines[1]
        g = [int(x) for x in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        cues.append((start, end, " ".join(lines[2:])))
    return cues


def test_forced_alignment_puts_each_token_on_its_frames_and_words_group_at_the_marker():
    # frames: blank, "▁he" x2, blank, "llo" , blank x3, "▁wor", "ld", blank
    frames = [0, 5, 5, 0, 6, 0, 0, 0, 7, 8, 0]
    log_probs = torch.full((len(frames), 10), -20.0)
    log_probs[torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    log_probs = log_probs.log_softmax(-1)
    spans = align_tokens(log_probs, [5, 6, 7, 8], blank=0)
    assert [(s, e) for s, e, _ in spans] == [(1, 3), (4, 5), (8, 9), (9, 10)]
    clock = FrameClock(stride=0.04, offset=0.03)
    words = group_words(["\u2581he", "llo", "\u2581wor", "ld"], spans, clock)
    assert [w.word for w in words] == ["hello", "world"]
    assert words[0].start == pytest.approx(0.03 + 0.5 * 0.04) and words[0].end == pytest.approx(0.03 + 4.5 * 0.04)
    assert words[1].start == pytest.approx(0.03 + 7.5 * 0.04) and words[1].end == pytest.approx(0.03 + 9.5 * 0.04)
    assert all(w.score > 0.9 for w in words)
    # more tokens than frames can hold: the words share the audio evenly instead of failing
    fallback = word_timestamps(log_probs[:3], [5, 6, 7, 8], ["\u2581he", "llo", "\u2581wor", "ld"], 0, clock, 1.0)
    assert [w.word for w in fallback] == ["hello", "world"] and fallback[1].end <= 1.0


@pytest.mark.parametrize("subsampling, layers, stride, offset", [
    ("conv2d", 2, 0.04, 0.03), ("conv2d", 3, 0.08, 0.07), ("conv1d_glu", 2, 0.04, 0.06), ("conv1d_glu", 3, 0.08, 0.14)])
def test_frame_clock_matches_the_subsampling_geometry(subsampling, layers, stride, offset):
    from speechformer.model import ModelConfig, SpeechTransformer

    model = SpeechTransformer(ModelConfig(vocab_size=20, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1,
                                          n_decoder_layers=1, subsampling=subsampling, subsampling_layers=layers))
    clock = FrameClock.for_model(model)
    assert clock.stride == pytest.approx(stride) and clock.offset == pytest.approx(offset)
    # a click at 1.0 s moves the encoder frames whose centre is within their receptive field of it
    model.eval()
    wav = torch.zeros(1, 32000)
    clicked = wav.clone()
    clicked[0, 16000:16040] = 1.0
    with torch.no_grad():
        feats, frames = model.frontend(wav, torch.tensor([32000]))
        feats2, _ = model.frontend(clicked, torch.tensor([32000]))
        a = model.subsampling(feats)
        b = model.subsampling(feats2)
    moved = ((a - b).abs().amax(-1)[0] > 1e-6).nonzero().flatten().tolist()
    centres = [clock.offset + k * clock.stride for k in moved]
    reach = max(0.1, (model.subsampling.min_frames - 1) / 2 * 0.01 + 0.02)  # half the receptive field + a window
    assert min(abs(c - 1.0) for c in centres) < 0.04 and max(abs(c - 1.0) for c in centres) < reach
    assert abs(sum(centres) / len(centres) - 1.0) < clock.stride / 3  # the frames it moved lie around the click


def test_cues_and_subtitle_formats():
    words = [Word("a", 0.0, 0.2), Word("b", 0.3, 0.5), Word("c", 3.0, 3.4), Word("x" * 41, 3.5, 4.0)]
    cues = words_to_cues(words)
    assert [c.text for c in cues] == ["a b", "c", "x" * 41]  # a pause, then a line too long
    assert cues[0].end <= cues[1].start and cues[1].end <= cues[2].start
    assert cues[2].end == pytest.approx(5.0)  # held for a second after the last word
    assert words_to_cues(words, duration=4.2)[-1].end == pytest.approx(4.2)  # but never past the audio
    srt = format_srt(cues)
    parsed = parse_srt(srt)
    assert [p[2] for p in parsed] == ["a b", "c", "x" * 41] and parsed[1][0] == 3.0
    assert format_srt([type(cues[0])(3725.5, 3726.0, "t")]).startswith("1\n01:02:05,500 --> 01:02:06,000\nt\n")
    vtt = format_vtt(cues)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and "\n\n00:00:03.000 --> " in vtt


# ---------------------------------------------------------------------------- with a trained model
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "speechformer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_cli_writes_an_srt_with_word_times_inside_the_audio(overfit_model, tmp_path):
    utt = read_manifest(overfit_model["train"])[0]
    wav = load_audio(utt.audio)
    duration = len(wav) / 16000
    out = tmp_path / "one.srt"
    proc = run_cli("transcribe", "--model", str(overfit_model["model"]), str(utt.audio), "--format", "srt",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    cues = parse_srt(out.read_text(encoding="utf-8"))
    assert " ".join(c[2] for c in cues) == utt.text
    starts = [c[0] for c in cues]
    assert starts == sorted(starts) and all(0 <= s < e <= duration + 1e-3 for s, e, _ in cues)
    # json carries the words; joint decoding and CTC greedy recover the memorised text too
    for extra in ([], ["--decoder", "joint", "--beam-size", "3"], ["--decoder", "ctc"]):
        proc = run_cli("transcribe", "--model", str(overfit_model["model"]), str(utt.audio), "--format", "json",
                       "--timestamps", *extra)
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)[0]
        assert row["text"] == utt.text
        words = row["words"]
        assert [w["word"] for w in words] == utt.text.split()
        times = [t for w in words for t in (w["start"], w["end"])]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= duration + 1e-3
    # the last word ends in the last second of speech, not at the start of the file
    assert words[-1]["end"] > 0.5 * duration


@pytest.mark.slow
def test_long_audio_word_times_are_offset_by_each_window_start(overfit_model, tmp_path):
    from speechformer.transcribe import Transcriber

    utts = read_manifest(overfit_model["train"])[:2]
    parts = [load_audio(u.audio).numpy() for u in utts]
    pause = np.zeros(16000, dtype=np.float32)
    sf.write(tmp_path / "two.wav", np.concatenate([parts[0], pause, parts[1]]), 16000)
    t = Transcriber.from_pretrained(overfit_model["model"], device="cpu", timestamps=True,
                                    chunk_seconds=max(len(p) for p in parts) / 16000 + 0.5)
    result = t.transcribe([tmp_path / "two.wav"])[0]
    assert result.ok and result.words
    times = [x for w in result.words for x in (w.start, w.end)]
    assert times == sorted(times) and times[-1] <= result.duration + 1e-3
    second_start = (len(parts[0]) + len(pause)) / 16000
    late = [w for w in result.words if w.start >= second_start - 0.3]
    assert late and len(late) < len(result.words)  # the second window's words sit after the pause
    assert late[-1].end > second_start + 0.5 * len(parts[1]) / 16000
    # the same through the block reader for files longer than stream_seconds (a block ends inside the
    # second utterance: that chunk starts the next block, whose times are offset by the block's start)
    t.stream_seconds = result.duration - 0.5
    streamed = t.transcribe([tmp_path / "two.wav"])[0]
    assert [w.word for w in streamed.words] == [w.word for w in result.words]
    assert [w.start for w in streamed.words] == pytest.approx([w.start for w in result.words], abs=0.05)


def test_timestamps_fail_early_naming_the_flag_for_a_model_without_ctc_head_or_whisper_time_tokens(tmp_path, capsys):
    """A Whisper-shaped model with a sentencepiece tokenizer has neither a CTC head nor time
    tokens: --timestamps and --format srt fail before any audio is read, each naming itself."""
    from speechformer.model import ModelConfig, SpeechTransformer
    from speechformer.tokenizer import train_tokenizer
    from speechformer.transcribe import ModelBundle, Transcriber, export_model

    tok = train_tokenizer(["hello world", "good morning"] * 20, 20, tmp_path / "tok")
    cfg = ModelConfig.whisper(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                              n_vocab=tok.vocab_size, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=1)
    bundle = ModelBundle(SpeechTransformer(cfg).eval(), tok)
    with pytest.raises(ValueError, match="--timestamps: this model cannot time its transcript.*CTC head.*Whisper"):
        Transcriber(bundle, bundle.default_options(timestamps=True))
    with pytest.raises(ValueError, match="--decoder joint: needs a CTC head"):
        Transcriber(bundle, bundle.default_options(decoder="joint", beam_size=2))
    export_model(bundle, tmp_path / "model")
    sf.write(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    # the message names the option the user typed, not --timestamps: one line, exit 2
    proc = run_cli("transcribe", "--model", str(tmp_path / "model"), str(tmp_path / "a.wav"), "--format", "srt")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --format srt: this model cannot time"), proc.stderr
    assert "--timestamps needs" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    from speechformer.cli import main

    for flags, named in ((["--format", "vtt"], "--format vtt"), (["--format", "json", "--timestamps"], "--timestamps")):
        assert main(["transcribe", "--model", str(tmp_path / "model"), str(tmp_path / "a.wav"), *flags]) == 2
        assert capsys.readouterr().err.startswith(f"error: {named}: this model cannot time")
    proc = run_cli("transcribe", "--model", str(tmp_path / "model"), str(tmp_path / "a.wav"), "--ctc-weight", "0.5")
    assert proc.returncode == 2 and "--decoder joint" in proc.stderr
