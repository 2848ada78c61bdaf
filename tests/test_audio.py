"""Tests for speechformer.audio. All audio is generated in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechformer.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    audio_info,
    check_waveform,
    expand_audio_paths,
    load_audio,
    save_audio,
    split_long_audio,
)


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5, channels: int = 1) -> np.ndarray:
    """A sine tone, shape (frames,) or (frames, channels); channel k has amplitude amp/(k+1)."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    if channels == 1:
        return x.astype(np.float32)
    return np.stack([x / (k + 1) for k in range(channels)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- loading


def test_stereo_8k_pcm16_becomes_mono_16k(tmp_path: Path) -> None:
    path = tmp_path / "stereo8k.wav"
    sf.write(path, tone(1.5, 8000, channels=2), 8000, subtype="PCM_16")
    wav = load_audio(path, sample_rate=16000)
    assert wav.dtype == torch.float32 and wav.dim() == 1 and wav.is_contiguous()
    assert wav.numel() == 24000
    # mono = mean of the channels (amplitudes 0.5 and 0.25) -> peak near 0.375
    assert 0.33 < float(wav.abs().max()) < 0.42


def test_load_without_resampling_matches_file(tmp_path: Path) -> None:
    x = tone(0.5, 16000)
    path = tmp_path / "a.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    wav = load_audio(path)
    np.testing.assert_allclose(wav.numpy(), x, atol=1e-7)


def test_flac_44k(tmp_path: Path) -> None:
    path = tmp_path / "a.flac"
    sf.write(path, tone(2.0, 44100), 44100)
    wav = load_audio(path, sample_rate=16000)
    assert wav.numel() == 32000
    assert audio_info(path) == (44100, 88200, 1, 2.0)


@pytest.mark.parametrize(
    ("subtype", "tol"),
    [("PCM_U8", 1e-2), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("PCM_32", 1e-6), ("FLOAT", 1e-7), ("DOUBLE", 1e-7)],
)
def test_sample_formats(tmp_path: Path, subtype: str, tol: float) -> None:
    x = tone(0.25, 16000, amp=0.5)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, 16000, subtype=subtype)
    assert sf.info(path).subtype == subtype
    wav = load_audio(path)
    assert wav.dtype == torch.float32
    np.testing.assert_allclose(wav.numpy(), x, atol=tol)


@pytest.mark.parametrize("channels", [1, 2, 6, 8])
@pytest.mark.parametrize("rate", [8000, 22050, 48000, 96000])
def test_channels_and_rates(tmp_path: Path, channels: int, rate: int) -> None:
    path = tmp_path / "x.wav"
    sf.write(path, tone(0.5, rate, channels=channels), rate, subtype="PCM_16")
    assert audio_info(path)[2] == channels
    assert load_audio(path, sample_rate=16000).numel() == 8000


@pytest.mark.parametrize(
    ("ext", "fmt", "subtype"),
    [(".ogg", "OGG", "VORBIS"), (".opus", "OGG", "OPUS"), (".mp3", "MP3", "MPEG_LAYER_III")],
)
def test_compressed_formats(tmp_path: Path, ext: str, fmt: str, subtype: str) -> None:
    if ext not in AUDIO_EXTENSIONS:
        pytest.skip(f"this libsndfile cannot read {ext}")
    path = tmp_path / f"a{ext}"
    sf.write(path, tone(1.0, 48000), 48000, format=fmt, subtype=subtype)
    wav = load_audio(path, sample_rate=16000)
    # lossy codecs may add a little encoder padding
    assert abs(wav.numel() - 16000) < 1600
    assert float(wav.abs().max()) > 0.3


def test_audio_extensions_are_readable_formats() -> None:
    formats = sf.available_formats()
    assert ".wav" in AUDIO_EXTENSIONS and ".flac" in AUDIO_EXTENSIONS
    assert ".m4a" not in AUDIO_EXTENSIONS  # libsndfile has no AAC decoder
    by_ext = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".opus": "OGG", ".mp3": "MP3"}
    for ext in AUDIO_EXTENSIONS:
        assert by_ext[ext] in formats


def test_offset_and_duration(tmp_path: Path) -> None:
    rate = 8000
    ramp = (np.arange(3 * rate, dtype=np.float32) / (3 * rate)) * 0.9 + 0.05  # 3 s, unique values
    path = tmp_path / "ramp.wav"
    sf.write(path, ramp, rate, subtype="FLOAT")
    seg = load_audio(path, sample_rate=rate, offset=1.0, duration=0.5)
    np.testing.assert_allclose(seg.numpy(), ramp[rate : rate + rate // 2], atol=1e-7)
    tail = load_audio(path, sample_rate=rate, offset=2.5)
    np.testing.assert_allclose(tail.numpy(), ramp[int(2.5 * rate) :], atol=1e-7)
    clipped = load_audio(path, sample_rate=rate, offset=2.75, duration=10.0)
    assert clipped.numel() == rate // 4
    resampled = load_audio(path, sample_rate=16000, offset=1.0, duration=0.5)
    assert resampled.numel() == 8000
    with pytest.raises(AudioError, match="past the end"):
        load_audio(path, sample_rate=rate, offset=3.0)


# --------------------------------------------------------------------------- bad input


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt_utt_0042.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert "corrupt_utt_0042.wav" in str(info.value)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(AudioError, match="corrupt_utt_0042.wav"):
        audio_info(path)


def test_truncated_wav(tmp_path: Path) -> None:
    path = tmp_path / "trunc.wav"
    sf.write(path, tone(1.0, 16000), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:30])  # header cut in half
    with pytest.raises(AudioError, match="trunc.wav"):
        load_audio(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(AudioError, match=r"empty\.wav: file is empty"):
        load_audio(path)


def test_wav_with_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "nosamples.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match="no samples"):
        load_audio(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav: file not found"):
        load_audio(path)
    with pytest.raises(AudioError, match="file not found"):
        audio_info(path)


def test_nan_samples(tmp_path: Path) -> None:
    x = tone(0.5, 16000)
    x[100] = np.nan
    x[200] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: contains 2 NaN/inf"):
        load_audio(path)


def test_silent_only(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    save_audio(path, np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="contains only silence"):
        load_audio(path)


def test_check_waveform() -> None:
    out = check_waveform(torch.tensor([0.1, -0.2], dtype=torch.float64), "x")
    assert out.dtype == torch.float32 and out.is_contiguous()
    with pytest.raises(AudioError, match="shape"):
        check_waveform(torch.ones(2, 100), "x")
    with pytest.raises(AudioError, match="no samples"):
        check_waveform(torch.zeros(0), "x")
    with pytest.raises(AudioError, match="NaN"):
        check_waveform(torch.tensor([0.1, float("nan")]), "x")
    with pytest.raises(AudioError, match="only silence"):
        check_waveform(torch.full((100,), 1e-7), "x")
    assert check_waveform(torch.full((100,), 1e-5), "x").numel() == 100


def test_float_file_a_little_over_full_scale_is_clipped(tmp_path: Path) -> None:
    """Peaks up to 2.0, as float processing leaves them: read, clipped to [-1, 1], the rest as stored."""
    x = tone(0.5, 16000, amp=0.5)
    x[1000], x[2000] = 1.7, -1.3
    path = tmp_path / "hot.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    wav = load_audio(path).numpy()
    assert wav.max() == 1.0 and wav.min() == -1.0
    inside = np.abs(x) <= 1
    assert np.array_equal(wav[inside], x[inside])


def test_float_file_with_a_huge_glitch_is_rejected_naming_file_and_peak(tmp_path: Path) -> None:
    """One sample at 1e6 in a float wav: main transcribed it as an empty string, exit 0."""
    x = tone(0.5, 16000)
    x[4000] = 1e6
    path = tmp_path / "glitch.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"glitch\.wav: float samples reach 1e\+06, outside full scale \[-1, 1\] "
                                         r"\(1 of 8000 samples .*glitches.*; repair or remove the file"):
        load_audio(path)


def test_float_file_at_integer_scale_is_rejected_with_the_fix(tmp_path: Path) -> None:
    """A float wav stored at int16 scale (x32767): main gave one wrong word; now an error that says
    how to re-encode it. Resampled or not, stereo or not: the check is on the file's own samples."""
    for rate, channels in ((16000, 1), (44100, 2)):
        path = tmp_path / f"int_scale_{rate}.wav"
        sf.write(path, tone(0.5, rate, channels=channels) * 32767, rate, subtype="FLOAT")
        with pytest.raises(AudioError) as err:
            load_audio(path)
        message = str(err.value)
        assert message.startswith(f"{path}: float samples reach 1"), message  # 16383.5 (mono), 12287.6 (mixed)
        assert "integer scale" in message and "x / 32768" in message and "\n" not in message
    # the command the message gives, run on the file, makes one that loads at the right scale
    import shutil
    import subprocess
    import sys

    shutil.copy(path, tmp_path / "IN.wav")
    command = message.split("`")[1]
    assert command.startswith("python -c ")
    subprocess.run([sys.executable, "-c", command[len("python -c "):].strip('"')], cwd=tmp_path, check=True)
    fixed = load_audio(tmp_path / "OUT.wav", sample_rate=44100)
    assert sf.info(tmp_path / "OUT.wav").subtype == "PCM_16" and 0.3 < float(fixed.abs().max()) <= 0.5


def test_integer_pcm_files_are_read_exactly_as_decoded() -> None:
    """The full-scale rule leaves integer PCM alone, also at full scale and resampled (the
    resampler's overshoot past 1.0 is kept, not clipped)."""
    import tempfile

    import torchaudio.functional as AF

    square = np.sign(np.sin(np.arange(22050) * 0.05)).astype(np.float32) * 0.99997
    with tempfile.TemporaryDirectory() as d:
        for rate in (16000, 22050):
            path = Path(d) / f"pcm_{rate}.wav"
            sf.write(path, square[:rate // 2], rate, subtype="PCM_16")
            decoded = torch.from_numpy(sf.read(path, dtype="float32")[0])
            expected = decoded if rate == 16000 else AF.resample(decoded, rate, 16000)
            wav = load_audio(path)
            assert torch.equal(wav, expected)
            if rate != 16000:
                assert float(wav.abs().max()) > 1.0  # overshoot kept


def test_check_waveform_takes_integer_tensors_as_pcm() -> None:
    """An int16 tensor is PCM: divided by 32768 (main passed 16384 on as a float)."""
    pcm = torch.tensor([16384, -32768, 0, 100], dtype=torch.int16)
    assert torch.equal(check_waveform(pcm, "x"), torch.tensor([0.5, -1.0, 0.0, 100 / 32768]))
    assert torch.equal(check_waveform(torch.tensor([128, 0, 192], dtype=torch.uint8), "x"),
                       torch.tensor([0.0, -1.0, 0.5]))
    with pytest.raises(AudioError, match="x: float samples reach 32768"):
        check_waveform(pcm.float(), "x")


def test_save_audio_writes_pcm16(tmp_path: Path) -> None:
    path = save_audio(tmp_path / "sub" / "out.wav", torch.from_numpy(tone(0.5, 16000)), 16000)
    info = sf.info(path)
    assert (info.samplerate, info.frames, info.subtype) == (16000, 8000, "PCM_16")


# --------------------------------------------------------------------------- paths


def _touch_wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_audio(path, tone(0.1, 16000), 16000)
    return path


def test_expand_folder_recursive_sorted(tmp_path: Path) -> None:
    b = _touch_wav(tmp_path / "d" / "b.wav")
    a = _touch_wav(tmp_path / "d" / "a.WAV")
    c = _touch_wav(tmp_path / "d" / "sub" / "c.wav")
    (tmp_path / "d" / "notes.txt").write_text("not audio")
    assert expand_audio_paths([tmp_path / "d"]) == [a, b, c]


def test_expand_glob_file_order_and_duplicates(tmp_path: Path) -> None:
    a = _touch_wav(tmp_path / "x" / "a.wav")
    b = _touch_wav(tmp_path / "x" / "b.wav")
    c = _touch_wav(tmp_path / "y" / "deep" / "c.wav")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0")
    got = expand_audio_paths([str(b), f"{tmp_path}/x/*.wav", odd, f"{tmp_path}/y/**/*.wav", a])
    assert got == [b, a, odd, c]


def test_expand_missing_raises(tmp_path: Path) -> None:
    _touch_wav(tmp_path / "a.wav")
    with pytest.raises(FileNotFoundError, match="missing_thing"):
        expand_audio_paths([tmp_path / "a.wav", tmp_path / "missing_thing"])
    with pytest.raises(FileNotFoundError, match=r"\*\.flac"):
        expand_audio_paths([f"{tmp_path}/*.flac"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="emptydir"):
        expand_audio_paths([tmp_path / "emptydir"])


# --------------------------------------------------------------------------- splitting


def _bursts(rate: int, burst_s: list[float], gap_s: float, lead_s: float = 0.5) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tone bursts separated by digital silence; returns the signal and burst spans."""
    parts, spans, pos = [np.zeros(int(lead_s * rate), np.float32)], [], int(lead_s * rate)
    for i, b in enumerate(burst_s):
        t = tone(b, rate, freq=300 + 100 * i)
        parts.append(t)
        spans.append((pos, pos + t.size))
        pos += t.size
        g = np.zeros(int(gap_s * rate), np.float32)
        parts.append(g)
        pos += g.size
    return np.concatenate(parts), spans


def _check_chunks(chunks: list[tuple[int, int]], n: int, max_len: int, spans: list[tuple[int, int]]) -> None:
    assert chunks, "no chunks"
    for s, e in chunks:
        assert 0 <= s < e <= n
        assert e - s <= max_len
    for (_, e1), (s2, _) in zip(chunks, chunks[1:]):
        assert e1 <= s2, "chunks overlap or are out of order"
    covered = np.zeros(n, bool)
    for s, e in chunks:
        covered[s:e] = True
    for s, e in spans:
        assert covered[s:e].all(), f"speech {s}-{e} not covered"


def test_split_cuts_in_silences() -> None:
    rate = 16000
    x, spans = _bursts(rate, [1.5, 1.0, 1.8], gap_s=1.0)
    max_s = 2.5
    chunks = split_long_audio(torch.from_numpy(x), rate, max_seconds=max_s)
    _check_chunks(chunks, x.size, int(max_s * rate), spans)
    assert len(chunks) == 3
    # every cut point lies in silence: no burst straddles a chunk boundary
    for s, e in chunks:
        for bs, be in spans:
            assert be <= s or bs >= e or (s <= bs and be <= e)
    # the boundaries between chunks are in the gaps, near their middle
    for (_, e1), (s2, _) in zip(chunks, chunks[1:]):
        gap = next((be, bs2) for (_, be), (bs2, _) in zip(spans, spans[1:]) if be <= e1 <= bs2)
        assert gap[0] <= s2 <= gap[1]


def test_split_merges_short_bursts() -> None:
    rate = 16000
    x, spans = _bursts(rate, [0.5, 0.5, 0.5, 0.5], gap_s=0.6)
    chunks = split_long_audio(x, rate, max_seconds=2.0)
    _check_chunks(chunks, x.size, 32000, spans)
    # two bursts (0.5 + 0.6 + 0.5 s = 1.6 s) fit in one 2 s chunk
    assert len(chunks) == 2


def test_split_hard_splits_long_speech() -> None:
    rate = 16000
    x, spans = _bursts(rate, [7.3], gap_s=0.5)
    chunks = split_long_audio(x, rate, max_seconds=3.0, min_seconds=1.0)
    _check_chunks(chunks, x.size, 48000, spans)
    assert len(chunks) == 3
    assert all(e - s >= rate for s, e in chunks)


def test_split_hard_split_uses_quietest_point() -> None:
    rate = 16000
    x, spans = _bursts(rate, [5.0], gap_s=0.5)
    dip = (spans[0][0] + int(2.2 * rate), spans[0][0] + int(2.3 * rate))
    x[dip[0] : dip[1]] *= 0.03  # quieter, but not silence at top_db=40
    chunks = split_long_audio(x, rate, max_seconds=3.0)
    _check_chunks(chunks, x.size, 48000, spans)
    assert len(chunks) == 2
    assert dip[0] <= chunks[0][1] == chunks[1][0] <= dip[1]


def test_split_hard_split_respects_min_seconds() -> None:
    rate = 16000
    x, spans = _bursts(rate, [6.4], gap_s=0.1)
    start = spans[0][0]
    for at in (2.9, 5.8):  # a dip 0.6 s before the end would leave a too-short last piece
        x[start + int(at * rate) : start + int((at + 0.05) * rate)] *= 0.03
    chunks = split_long_audio(x, rate, max_seconds=3.0, min_seconds=1.0)
    _check_chunks(chunks, x.size, 48000, spans)
    assert len(chunks) == 3
    assert all(e - s >= rate for s, e in chunks)


def test_split_with_background_noise() -> None:
    rate = 16000
    x, spans = _bursts(rate, [1.2, 0.8, 1.5, 0.9, 1.1], gap_s=0.8)
    x = x + np.random.default_rng(0).normal(0, 1e-3, x.size).astype(np.float32)  # ~ -54 dB below the tones
    chunks = split_long_audio(x, rate, max_seconds=3.0)
    _check_chunks(chunks, x.size, 48000, spans)
    for s, e in chunks[1:]:
        assert not any(bs < s < be for bs, be in spans), "cut inside a burst"


def test_split_short_and_silent() -> None:
    rate = 16000
    x = tone(1.0, rate)
    assert split_long_audio(x, rate, max_seconds=5.0) == [(0, rate)]
    assert split_long_audio(np.zeros(10 * rate, np.float32), rate, max_seconds=2.0) == []
    with pytest.raises(ValueError):
        split_long_audio(x, rate, max_seconds=1.0, min_seconds=1.0)


@settings(max_examples=25, deadline=None)
@given(
    bursts=st.lists(st.floats(0.1, 4.0), min_size=1, max_size=6),
    gap=st.floats(0.3, 1.5),
    max_s=st.floats(1.5, 5.0),
)
def test_split_invariants(bursts: list[float], gap: float, max_s: float) -> None:
    """Whatever the layout: chunks fit max_seconds, are ordered, and cover every burst."""
    rate = 8000
    x, spans = _bursts(rate, bursts, gap_s=gap)
    chunks = split_long_audio(x, rate, max_seconds=max_s, min_seconds=0.5)
    if x.size <= int(max_s * rate):
        assert chunks == [(0, x.size)]
    _check_chunks(chunks, x.size, int(max_s * rate), spans)


# --------------------------------------------------------------------------- property-based: anything in, clean out
_DTYPES = st.sampled_from(["int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64", "bool",
                           "complex64"])


@settings(max_examples=60, deadline=None)
@given(dtype=_DTYPES, n=st.integers(0, 4000), channels=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       special=st.sampled_from([None, "nan", "inf", "zeros", "huge"]))
def test_check_waveform_processes_or_rejects_any_array(dtype, n, channels, seed, special):
    """Any array: either a finite 1-D float32 waveform comes back, or an AudioError naming it."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, channels) if channels > 1 else n) * 1000
    if special == "zeros":
        x[:] = 0
    elif special == "huge":
        x *= 1e30
    with np.errstate(all="ignore"):  # casting 1e30 to int is part of the point
        x = x.astype(dtype) if dtype != "bool" else x > 0
    if special in ("nan", "inf") and x.dtype.kind in "fc" and x.size:
        x.flat[rng.integers(x.size)] = np.nan if special == "nan" else np.inf
    try:
        tensor = torch.from_numpy(np.ascontiguousarray(x))
    except TypeError:  # numpy dtypes torch has no equivalent for
        return
    try:
        out = check_waveform(tensor, "any.wav")
    except AudioError as err:
        assert str(err).startswith("any.wav: ")
        return
    assert out.dtype == torch.float32 and out.dim() == 1 and out.numel() == n
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) <= 1.0  # full scale, whatever came in
    if x.dtype.kind == "f" and np.abs(x).max() <= 1.0:
        assert torch.equal(out, tensor.float())  # in-range floats pass unchanged


_SUBTYPES = {"int16": "PCM_16", "int32": "PCM_32", "float32": "FLOAT", "float64": "DOUBLE"}


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(sorted(_SUBTYPES)), n=st.integers(0, 3000), channels=st.integers(1, 4),
       rate=st.sampled_from([8000, 11025, 16000, 44100, 96000]), seed=st.integers(0, 2**31 - 1),
       special=st.sampled_from([None, "nan", "inf", "zeros", "truncate", "hot", "glitch"]))
def test_load_audio_reads_or_rejects_any_file(tmp_path_factory, dtype, n, channels, rate, seed, special):
    """Any file soundfile can write (and truncated ones): a clean waveform at 16 kHz or an AudioError.
    Float files a little over full scale ("hot", peak <= 2) are read; far over ("glitch") never are."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, channels))
    if dtype.startswith("int"):
        x = (x * np.iinfo(dtype).max).astype(dtype)
    else:
        x = x.astype(dtype)
        if special in ("nan", "inf", "hot", "glitch") and x.size:
            value = {"nan": np.nan, "inf": np.inf, "hot": 1.9, "glitch": 1e6}[special]
            x[rng.integers(n), :] = value  # every channel, so the mono mix keeps it
    if special == "zeros":
        x[:] = 0
    path = tmp_path_factory.mktemp("prop") / "x.wav"
    sf.write(path, x, rate, subtype=_SUBTYPES[dtype])
    if special == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.integers(0, len(data) + 1)])
    try:
        wav = load_audio(path, sample_rate=16000)
    except AudioError as err:
        assert str(err).startswith(f"{path}: ")
        assert not (special == "hot" and dtype.startswith("float") and n), err  # a hot file is read
        return
    assert not (special == "glitch" and dtype.startswith("float") and n), "a 1e6 glitch was accepted"
    assert wav.dtype == torch.float32 and wav.dim() == 1 and wav.numel() > 0
    assert bool(torch.isfinite(wav).all())
