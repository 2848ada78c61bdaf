"""Reading, checking, finding, writing and chunking audio.

This is the one module that knows about audio file formats. Everything else in
speechformer works on 1-D float32 ``torch.Tensor`` waveforms at a known sample
rate, obtained from :func:`load_audio`. Keeping format handling here means a
new format, a resampling change or a stricter check happens in one place.

Files are read with ``soundfile`` (libsndfile), not ``torchaudio.load``: the
latter needs the optional ``torchcodec`` package, while soundfile reads WAV
(8/16/24/32-bit integer and float), FLAC, OGG/Vorbis, Opus and (libsndfile >=
1.1) MP3 on its own.

Every failure to read or accept a file raises :class:`AudioError`, whose message
names the file, says what is wrong and what to do, on one line, so a bad file in
a list of thousands is found from the log alone.
"""

from __future__ import annotations

import errno
import glob
import io
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

if TYPE_CHECKING:  # torch is imported where tensors are made: the onnxruntime transcriber reads audio without it
    import torch

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioError",
    "audio_info",
    "check_waveform",
    "decode_audio",
    "expand_audio_paths",
    "find_audio_paths",
    "load_audio",
    "read_audio",
    "save_audio",
    "split_long_audio",
]

#: Samples with an absolute value below this count as silence.
SILENCE_THRESHOLD = 1e-6

#: Float audio is at full scale in [-1, 1]. Float processing (a gain, a filter's or resampler's
#: ringing) often leaves peaks a little over it: up to this peak the samples are clipped back to
#: [-1, 1]. Beyond it the scale itself is wrong (audio stored at integer scale, x32767, or a
#: glitch such as one sample at 1e6) and the file is rejected: the log-mel features would be
#: shifted far from anything the model saw and the transcript silently wrong, and no rescale can
#: be guessed safely (dividing by the peak of a single 1e6 glitch would silence the file).
MAX_FLOAT_PEAK = 2.0


class AudioError(ValueError):
    """An audio file (or waveform) that cannot be used.

    The message has the form ``"{path}: {reason}; {what to do}"``. It subclasses
    ``ValueError`` so callers that already catch bad input keep working.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str) -> None:
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        super().__init__(f"{self.path}: {reason}; {hint}")


class SilentAudio(AudioError):
    """Audio with nothing but silence in it. A file of it is refused like any unusable one; a
    silent stretch of a long file read block by block is just a stretch with nothing to say
    (the transcriber catches this type, not the words of the message)."""


def _supported_extensions() -> tuple[str, ...]:
    """File extensions whose container this soundfile build can read.

    Worked out at import time because MP3 and Opus depend on the libsndfile
    version soundfile was built with (MP3 needs >= 1.1.0). M4A/AAC is never
    readable by libsndfile and is therefore not listed.
    """
    formats = sf.available_formats()
    candidates: list[tuple[str, bool]] = [
        (".wav", "WAV" in formats),
        (".flac", "FLAC" in formats),
        (".ogg", "OGG" in formats),
        (".opus", "OGG" in formats and "OPUS" in sf.available_subtypes("OGG")),
        (".mp3", "MP3" in formats),
    ]
    return tuple(ext for ext, ok in candidates if ok)


#: Extensions searched for when a folder or glob is expanded (lower case).
AUDIO_EXTENSIONS: tuple[str, ...] = _supported_extensions()


def _read_failure(path: Path, exc: Exception) -> AudioError:
    """Turn a soundfile/OS error into an AudioError with a useful hint."""
    if not path.exists():
        return AudioError(path, "file not found", "check the path and the data preparation step")
    if path.is_dir():
        return AudioError(path, "is a folder, not an audio file", "pass the files inside it")
    if path.stat().st_size == 0:
        return AudioError(path, "file is empty (0 bytes)", "re-create or remove it")
    detail = str(exc).replace(f"Error opening {str(path)!r}: ", "").strip() or type(exc).__name__
    return AudioError(
        path,
        f"cannot be read as audio ({detail})",
        "check that it is a complete file in a supported format "
        f"({', '.join(AUDIO_EXTENSIONS)}), or convert it to 16-bit WAV",
    )


def audio_info(path: str | os.PathLike[str]) -> tuple[int, int, int, float]:
    """Return ``(sample_rate, num_frames, channels, duration_seconds)`` of a file.

    Only the header is read, so this is cheap enough to call on a whole corpus
    (e.g. to sort or filter utterances by duration). Raises :class:`AudioError`
    when the file is missing or not readable.
    """
    p = Path(path)
    try:
        info = sf.info(str(p))
    except (RuntimeError, OSError) as exc:  # LibsndfileError is a RuntimeError
        raise _read_failure(p, exc) from exc
    if info.samplerate <= 0:
        raise AudioError(p, f"header gives sample rate {info.samplerate}", "re-encode the file")
    return int(info.samplerate), int(info.frames), int(info.channels), info.frames / info.samplerate


def _integer_full_scale(wav: torch.Tensor) -> torch.Tensor:
    """Integer samples as float32 at full scale [-1, 1): PCM's convention (int16 / 32768, uint8
    centred on 128), the one soundfile and every audio tool use. Other dtypes are cast as they are."""
    import torch

    if wav.dtype == torch.uint8:
        return (wav.to(torch.float32) - 128.0) / 128.0
    if wav.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        return (wav.to(torch.float64) / -float(torch.iinfo(wav.dtype).min)).to(torch.float32)
    return wav.to(torch.float32)


def _over_full_scale(name: str | os.PathLike[str], samples: np.ndarray, peak: float) -> AudioError:
    """The error for float samples far beyond full scale, with the fix that fits what is seen."""
    over = int((np.abs(samples) > MAX_FLOAT_PEAK).sum())
    if over * 100 < samples.size:  # a few samples: glitches, which no gain would fix
        cause = f"{over} of {samples.size} samples are beyond +-{MAX_FLOAT_PEAK:g}: glitches?"
        fix = "repair or remove the file (scaling it down by its peak would make it silent)"
    else:
        cause = f"{over} of {samples.size} samples are beyond +-{MAX_FLOAT_PEAK:g}, as if stored at integer scale"
        # soundfile, not sox: sox clips float input to [-1, 1] as it reads it, before any -v or --norm
        fix = ("if it is integer-scale audio, divide it by 32768 and store it as 16-bit PCM, e.g. `python -c "
               "\"import soundfile as sf; x, r = sf.read('IN.wav'); sf.write('OUT.wav', x / 32768, r, "
               "subtype='PCM_16')\"` (else divide by its peak)")
    return AudioError(name, f"float samples reach {peak:.6g}, outside full scale [-1, 1] ({cause})", fix)


def check_waveform(wav: torch.Tensor, name: str | os.PathLike[str]) -> torch.Tensor:
    """Validate a waveform and return it as a contiguous 1-D float32 tensor in [-1, 1].

    Rejects (with :class:`AudioError` naming ``name``) waveforms that are not
    1-D, are empty, contain NaN/inf, reach beyond ``MAX_FLOAT_PEAK`` (a wrong scale
    or a glitch: the transcript would be silently wrong), or contain only silence
    (every sample below ``SILENCE_THRESHOLD`` in magnitude). Such inputs otherwise
    surface much later as NaN losses, empty features or empty transcripts, far from
    the file that caused them. Integer tensors are taken as PCM (int16 / 32768);
    float peaks up to ``MAX_FLOAT_PEAK`` are clipped to [-1, 1].
    """
    import torch

    if not isinstance(wav, torch.Tensor):
        raise AudioError(name, f"expected a torch.Tensor, got {type(wav).__name__}", "convert it with torch.as_tensor")
    if wav.dim() != 1:
        raise AudioError(
            name,
            f"waveform has shape {tuple(wav.shape)}, expected 1-D (samples,)",
            "average or select channels first",
        )
    if wav.numel() == 0:
        raise AudioError(name, "contains no samples", "check the file, offset and duration")
    if wav.is_complex():
        raise AudioError(name, "waveform is complex", "pass real-valued samples")
    wav = _integer_full_scale(wav).contiguous()
    # numpy, not torch, for these whole-array scans: they run between training steps, and torch's
    # multi-threaded kernels wait for a busy second core (measured 80x slower on a loaded 2-core box)
    samples = wav.numpy() if wav.device.type == "cpu" else wav.cpu().numpy()
    return wav.clamp(-1.0, 1.0) if _peak(samples, name) > 1.0 else wav


def _peak(samples: np.ndarray, name: str | os.PathLike[str]) -> float:
    """The peak of float samples, after :func:`check_waveform`'s refusals (non-finite, far
    beyond full scale, silent): the checks of tensors and of :func:`read_audio`'s arrays."""
    finite = np.isfinite(samples)
    if not finite.all():
        raise AudioError(name, f"contains {int((~finite).sum())} NaN/inf samples", "re-encode or remove the file")
    peak = float(np.abs(samples).max())
    if peak > MAX_FLOAT_PEAK:
        raise _over_full_scale(name, samples, peak)
    if peak < SILENCE_THRESHOLD:
        raise SilentAudio(name, "contains only silence", "check the recording or remove it from the list")
    return peak


def load_audio(
    path: str | os.PathLike[str],
    sample_rate: int = 16000,
    offset: float = 0.0,
    duration: float | None = None,
) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform at ``sample_rate``.

    Args:
        path: audio file (any format soundfile reads; see ``AUDIO_EXTENSIONS``).
        sample_rate: wanted rate; the file is resampled when its own differs.
        offset: seconds to skip from the start of the file.
        duration: seconds to read from ``offset``; ``None`` reads to the end.
            Only that frame range is decoded, so segments of long recordings
            are cheap to load.

    Channels are averaged to mono and the samples checked by :func:`check_waveform` at
    the file's own rate, before resampling: a float file's peaks a little over full scale
    are clipped, integer PCM (always within full scale) comes back exactly as decoded.
    Raises :class:`AudioError` (naming the file) when it is missing, unreadable,
    empty in the requested range, non-finite, far beyond full scale or silent.
    """
    import torch
    import torchaudio.functional as AF

    samples, file_rate = read_audio(path, sample_rate, offset, duration)
    wav = torch.from_numpy(samples)
    if file_rate != sample_rate:
        wav = AF.resample(wav, orig_freq=file_rate, new_freq=sample_rate)
    return wav


def read_audio(
    path: str | os.PathLike[str],
    sample_rate: int = 16000,
    offset: float = 0.0,
    duration: float | None = None,
) -> tuple[np.ndarray, int]:
    """:func:`load_audio` without torch and without resampling: the checked mono float32
    samples (numpy) at the file's own rate, and that rate. ``sample_rate`` is only checked."""
    p = Path(path)
    try:
        return _read_mono(str(p), p, sample_rate, offset, duration)
    except AudioError:
        raise
    except (RuntimeError, OSError) as exc:
        raise _read_failure(p, exc) from exc


def decode_audio(data: bytes, name: str, sample_rate: int = 16000) -> torch.Tensor:
    """An audio file's bytes (an upload to ``speechformer serve``) as :func:`load_audio` reads a
    file: mono float32 at ``sample_rate``, checked the same way, with :class:`AudioError` naming
    ``name``. Decoded in memory: the bytes are never written to disk."""
    import torch
    import torchaudio.functional as AF

    if not data:
        raise AudioError(name, "file is empty (0 bytes)", "send the whole audio file")
    try:
        samples, file_rate = _read_mono(io.BytesIO(data), name, sample_rate, 0.0, None)
    except AudioError:
        raise
    except (RuntimeError, OSError) as exc:  # LibsndfileError is a RuntimeError
        detail = str(exc).replace("Error opening <_io.BytesIO object", "").strip() or type(exc).__name__
        detail = re.sub(r"^at 0x[0-9a-f]+>: ", "", detail)
        raise AudioError(name, f"cannot be read as audio ({detail})", "check that it is a complete file in a "
                         f"supported format ({', '.join(AUDIO_EXTENSIONS)}), or convert it to 16-bit WAV") from exc
    wav = torch.from_numpy(samples)
    if file_rate != sample_rate:
        wav = AF.resample(wav, orig_freq=file_rate, new_freq=sample_rate)
    return wav


def _read_mono(source: str | io.BytesIO, name: str | os.PathLike[str], sample_rate: int, offset: float,
               duration: float | None) -> tuple[np.ndarray, int]:
    """The reading behind :func:`read_audio` and :func:`decode_audio` (``source``: a path or the
    bytes): checked mono float32 samples at the file's rate, and that rate."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if offset < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"offset must be >= 0 and duration > 0, got offset={offset}, duration={duration}")
    with sf.SoundFile(source) as f:
        file_rate = int(f.samplerate)
        total = int(f.frames)
        start = int(round(offset * file_rate))
        stop = total if duration is None else min(total, start + int(round(duration * file_rate)))
        if start >= total and total > 0:
            raise AudioError(
                name,
                f"offset {offset:.3f} s is at or past the end of the file ({total / file_rate:.3f} s)",
                "check the segment times",
            )
        if start > 0:
            f.seek(start)
        data = f.read(frames=max(0, stop - start), dtype="float32", always_2d=True)
    samples = np.ascontiguousarray(data[:, 0] if data.shape[1] == 1 else data.mean(axis=1))
    if samples.size == 0:
        raise AudioError(name, "contains no samples", "check the file, offset and duration")
    return (np.clip(samples, -1.0, 1.0) if _peak(samples, name) > 1.0 else samples), file_rate


def save_audio(path: str | os.PathLike[str], wav: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write a mono (1-D) or ``(samples, channels)`` waveform as 16-bit PCM WAV.

    Values are clipped to [-1, 1] by soundfile's conversion. The parent folder is
    created if needed. Returns the path written.
    """
    p = Path(path)
    data = np.asarray(wav) if isinstance(wav, np.ndarray) else wav.detach().cpu().numpy()
    p.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(p), data.astype(np.float32, copy=False), int(sample_rate), format="WAV", subtype="PCM_16")
    return p


def find_audio_paths(items: Iterable[str | os.PathLike[str]]) -> list[Path | AudioError]:
    """Turn files, folders and glob patterns into audio file paths, in order; what finds none is an error.

    Each item is, in this order of precedence:

    * an existing file: returned as is, whatever its extension, so that a
      corrupt or oddly named file is reported by :func:`load_audio` instead of
      being skipped silently;
    * an existing folder: searched recursively for files whose (lower-cased)
      extension is in ``AUDIO_EXTENSIONS``, sorted;
    * otherwise a glob pattern (``**`` allowed): matched files with an audio
      extension, sorted; matched folders are searched as above.

    The order of ``items`` is kept and duplicates (same resolved path) are dropped. An item
    that yields no audio file (a missing path, a broken link or link loop, an empty or
    unreadable folder, a pattern that matches nothing), and a broken link with an audio
    extension met in a folder or a pattern, becomes an :class:`AudioError` in its place: one
    bad path among thousands is reported by name while the rest are transcribed.
    """
    out: list[Path | AudioError] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    def audio_in(q: Path) -> list[Path | AudioError]:
        """The audio files in a folder (or ``q`` itself); links to nothing with an audio extension are errors."""
        found: list[Path | AudioError] = []
        for r in (sorted(q.rglob("*")) if q.is_dir() else [q]):
            if r.suffix.lower() in AUDIO_EXTENSIONS and not r.is_dir():
                found.append(r if r.is_file() else _missing(r, str(r)))
        return found

    for item in items:
        p = Path(item)
        if p.is_file():
            found: list[Path | AudioError] = [p]
        elif p.is_dir():
            found = audio_in(p)
        else:
            found = [f for m in sorted(glob.glob(str(item), recursive=True)) for f in audio_in(Path(m))]
        if not found:
            out.append(_missing(p, str(item)))
        for q in found:
            if isinstance(q, AudioError):
                out.append(q)
            else:
                add(q)
    return out


def expand_audio_paths(items: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """:func:`find_audio_paths` for callers that want all or nothing: the first item that yields
    no audio file raises ``FileNotFoundError`` naming it."""
    found = find_audio_paths(items)
    for q in found:
        if isinstance(q, AudioError):
            raise FileNotFoundError(str(q))
    return [q for q in found if isinstance(q, Path)]


def _missing(p: Path, item: str) -> AudioError:
    """Why the path or pattern ``item`` gives no audio file, and what to do about it."""
    exts = "/".join(AUDIO_EXTENSIONS)
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            return AudioError(item, "folder cannot be read (permission denied)", "check its permissions")
        return AudioError(item, f"folder has no {exts} file", "check the folder, or pass the files themselves")
    if os.path.islink(p):
        try:
            os.stat(p)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return AudioError(item, "symbolic link loop", "fix or remove the link")
        return AudioError(item, f"broken symbolic link (to {os.readlink(p)})", "fix or remove the link")
    if glob.has_magic(item):
        return AudioError(item, f"no {exts} file matches this pattern", "check the pattern")
    return AudioError(item, "no such file or folder", "check the path")


def _quietest_point(x: np.ndarray, lo: int, hi: int, sample_rate: int) -> int:
    """Index in ``[lo, hi]`` at the centre of the lowest-energy 20 ms window."""
    if hi <= lo:
        return lo
    win = max(1, int(0.02 * sample_rate))
    seg = x[max(0, lo - win // 2) : hi + win // 2 + 1].astype(np.float64) ** 2
    if seg.size <= win:
        return (lo + hi) // 2
    energy = np.convolve(seg, np.ones(win), mode="valid")  # energy[i] = window starting at i
    centres = np.arange(energy.size) + max(0, lo - win // 2) + win // 2
    ok = (centres >= lo) & (centres <= hi)
    if not ok.any():
        return (lo + hi) // 2
    idx = np.flatnonzero(ok)
    return int(centres[idx[np.argmin(energy[idx])]])


def split_long_audio(
    wav: torch.Tensor | np.ndarray,
    sample_rate: int,
    max_seconds: float,
    top_db: float = 40,
    min_seconds: float = 1.0,
    pause_seconds: float | None = None,
) -> list[tuple[int, int]]:
    """Cut a long recording into chunks of at most ``max_seconds``, at quiet points.

    Returns ``(start, end)`` sample indices (end exclusive), in order, not
    overlapping. Why: models are trained on utterances of bounded length, and
    cutting inside a word costs errors on both sides of the cut.

    Method: ``librosa.effects.split`` finds non-silent intervals (frames within
    ``top_db`` of the loudest frame). Consecutive intervals are merged greedily
    while the merged span fits in ``max_seconds``; chunk boundaries are put in the
    middle of the silent gap between groups (moved towards the speech when the
    chunk would otherwise be too long, in which case some silence between chunks
    is left out). An interval longer than ``max_seconds`` on its own is hard-split
    at the quietest 20 ms point between ``max(min_seconds, max_seconds / 2)`` and
    ``max_seconds`` from its start; ``min_seconds`` also keeps the piece after the
    cut at least that long where the interval allows. With ``pause_seconds``, a
    silent gap at least that long always ends a chunk (a sentence boundary: models
    trained on single sentences do best on single sentences).

    Guarantees: every chunk is at most ``max_seconds`` long, and every sample of
    every non-silent interval lies in some chunk. Audio no longer than
    ``max_seconds`` gives ``[(0, len)]``; audio that is entirely silent (all
    ``|x| < 1e-6``) gives ``[]``.
    """
    x = np.asarray(wav) if isinstance(wav, np.ndarray) else wav.detach().cpu().numpy()
    if x.ndim != 1:
        raise ValueError(f"split_long_audio expects a 1-D waveform, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    n = int(x.size)
    max_len = int(math.floor(max_seconds * sample_rate))
    min_len = int(round(min_seconds * sample_rate))
    if max_len <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if not 0 <= min_len < max_len:
        raise ValueError(f"need 0 <= min_seconds < max_seconds, got {min_seconds} and {max_seconds}")
    if n == 0 or float(np.abs(x).max()) < SILENCE_THRESHOLD:
        return []
    if n <= max_len:
        return [(0, n)]

    intervals = [(int(s), int(e)) for s, e in _nonsilent_intervals(x, top_db=top_db)]

    # 1. Hard-split intervals that are too long on their own.
    pieces: list[tuple[int, int]] = []
    for s, e in intervals:
        while e - s > max_len:
            lo = s + max(min_len, max_len // 2)
            hi = s + max_len
            if e - hi < min_len:  # keep the remainder at least min_len long if possible
                hi = max(lo, e - min_len)
            cut = _quietest_point(x, lo, hi, sample_rate)
            pieces.append((s, cut))
            s = cut
        pieces.append((s, e))

    # 2. Greedily group consecutive pieces whose total span fits in max_len.
    groups: list[tuple[int, int]] = []
    min_pause = None if pause_seconds is None else int(pause_seconds * sample_rate)
    for s, e in pieces:
        paused = min_pause is not None and groups and s - groups[-1][1] >= min_pause
        if groups and e - groups[-1][0] <= max_len and not paused:
            groups[-1] = (groups[-1][0], e)
        else:
            groups.append((s, e))

    # 3. Extend each group into the silence around it, up to the gap midpoints.
    chunks: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(groups):
        left_limit = 0 if i == 0 else (groups[i - 1][1] + a) // 2
        right_limit = n if i == len(groups) - 1 else (b + groups[i + 1][0]) // 2
        slack = max_len - (b - a)
        room_left, room_right = a - left_limit, right_limit - b
        pad_left = min(room_left, slack // 2)
        pad_right = min(room_right, slack - pad_left)
        pad_left = min(room_left, slack - pad_right)
        chunks.append((a - pad_left, b + pad_right))
    return chunks


def _nonsilent_intervals(x: np.ndarray, top_db: float) -> np.ndarray:
    """Non-silent ``(start, end)`` sample intervals, via ``librosa.effects.split``.

    Imported lazily: librosa pulls in numba and takes seconds to import, which
    callers that only load audio should not pay.
    """
    import librosa

    return librosa.effects.split(x, top_db=top_db, frame_length=2048, hop_length=512)
