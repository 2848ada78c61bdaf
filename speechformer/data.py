"""Manifests, the dataset, the duration-bucketing batch sampler, padding collate, the DataModule.

Manifest: JSON Lines, one utterance a line::

    {"id": "u1", "audio": "wavs/u1.wav", "duration": 3.21, "text": "hello world", "speaker": "s1"}

with an optional ``"offset"`` (seconds) for a segment of a longer file. A relative
``audio`` path is resolved against the manifest's own folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torchaudio
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .audio import load_audio
from .frontend import WHISPER_WINDOW_SECONDS
from .tokenizer import AnyTokenizer, load_tokenizer

if TYPE_CHECKING:
    from .model import ModelConfig


@dataclass
class Utterance:
    id: str
    audio: Path
    duration: float
    text: str
    speaker: str = ""
    offset: float = 0.0
    line: int = 0  # 1-based line in the manifest it was read from (0: not read from one)


class ManifestError(ValueError):
    """A manifest problem; the message names the file and line of every problem found."""

    def __init__(self, message: str, problems: Sequence["ManifestProblem"] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class ManifestProblem:
    """One bad line of a manifest (``line`` is 1-based; 0 for the file as a whole)."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"


#: How far a manifest duration may differ from the audio file's own before it counts as wrong:
#: the larger of 0.1 s and 2 % (encoders pad mp3/opus a little).
DURATION_TOLERANCE_S, DURATION_TOLERANCE_REL = 0.1, 0.02


def _check_line(row: Any, path: Path, require_text: bool) -> tuple[Utterance | None, list[str]]:
    """Parse one decoded JSON line; return the utterance (or None) and what is wrong with it."""
    if not isinstance(row, dict):
        return None, ["expected a JSON object like {\"id\": ..., \"audio\": ..., \"duration\": ..., \"text\": ...}"]
    problems: list[str] = []
    required = ("id", "audio", "duration") + (("text",) if require_text else ())
    missing = [k for k in required if k not in row]
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)}")
    uid = row.get("id")
    if "id" in row and (not isinstance(uid, (str, int)) or not str(uid).strip()):
        problems.append(f"id must be a non-empty string, got {uid!r}")
    if "audio" in row and (not isinstance(row["audio"], str) or not row["audio"].strip()):
        problems.append(f"audio must be a path, got {row['audio']!r}")
    duration = offset = 0.0
    try:
        duration = float(row.get("duration", 1.0))
        offset = float(row.get("offset", 0.0))
    except (TypeError, ValueError):
        problems.append("duration/offset must be numbers (seconds)")
    else:
        if "duration" in row and (not math.isfinite(duration) or duration <= 0):
            problems.append(f"duration must be positive seconds, got {row['duration']!r}")
        if not math.isfinite(offset) or offset < 0:
            problems.append(f"offset must be >= 0 seconds, got {row.get('offset')!r}")
    text = row.get("text", "")
    if not isinstance(text, str):
        problems.append(f"text must be a string, got {type(text).__name__}")
    elif require_text and "text" in row and not text.strip():
        problems.append("empty transcript (remove the line or give its text)")
    if problems:
        return None, problems
    audio = Path(row["audio"])
    if not audio.is_absolute():
        audio = path.parent / audio
    return Utterance(str(uid), audio, duration, text, str(row.get("speaker", "")), offset), []


def _check_audio(u: Utterance, info_cache: dict[Path, Any]) -> str | None:
    """Compare an utterance with its audio file's header: exists, readable, long enough."""
    from .audio import AudioError, audio_info

    if u.audio not in info_cache:
        try:
            info_cache[u.audio] = audio_info(u.audio)
        except AudioError as err:
            info_cache[u.audio] = err
    info = info_cache[u.audio]
    if isinstance(info, AudioError):
        return f"audio {u.audio}: {info.reason}; {info.hint}"
    length = info[3]
    tolerance = max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_REL * length)
    if u.offset > 0:
        if u.offset + u.duration > length + tolerance:
            return (f"segment {u.offset:.3f}+{u.duration:.3f} s ends past the end of {u.audio} ({length:.3f} s); "
                    "fix the offset/duration")
    elif abs(u.duration - length) > tolerance:
        return (f"duration {u.duration:.3f} s but {u.audio} is {length:.3f} s long; "
                "re-run the data preparation or fix the duration")
    return None


def scan_manifest(path: str | Path, *, require_text: bool = True,
                  check_audio: bool = False) -> tuple[list[Utterance], list[ManifestProblem]]:
    """Read a JSONL manifest and find *every* problem in it, not just the first.

    Returns the good utterances and the problems (bad lines are left out of the first).
    Checked: each line is UTF-8 and a JSON object with ``id``, ``audio``, ``duration``
    (and a non-empty ``text`` when ``require_text``); numbers are numbers, durations
    positive, offsets not negative; ids are unique (the first wins). With
    ``check_audio`` the audio files' headers are read too (no decoding): the file exists,
    is readable, and its length agrees with ``duration`` (or holds the segment).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; create one with data_prep/ or `speechformer prepare`")
    utts: list[Utterance] = []
    problems: list[ManifestProblem] = []
    seen: dict[str, int] = {}
    info_cache: dict[Path, Any] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(ManifestProblem(path, lineno, f"not UTF-8 text (byte {err.start}); "
                                                              "re-encode the manifest as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(ManifestProblem(path, lineno, f"not valid JSON ({err.msg})"))
                continue
            utt, bad = _check_line(row, path, require_text)
            problems += [ManifestProblem(path, lineno, m) for m in bad]
            if utt is None:
                continue
            if utt.id in seen:
                problems.append(ManifestProblem(path, lineno, f"duplicate id {utt.id!r} (first on line {seen[utt.id]})"))
                continue
            seen[utt.id] = lineno
            utt.line = lineno
            if check_audio and (message := _check_audio(utt, info_cache)):
                problems.append(ManifestProblem(path, lineno, message))
                continue
            utts.append(utt)
    if not utts and not problems:
        problems.append(ManifestProblem(path, 0, "manifest is empty"))
    return utts, problems


def format_problems(problems: Sequence[ManifestProblem], limit: int = 50) -> str:
    """Every problem on its own line (the first ``limit``), then a count."""
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)


class UtteranceLimits:
    """What one utterance may be for a model, worked out from its :class:`ModelConfig`.

    A model has room for so many encoder frames (``max_source_positions``, after the frontend's
    10 ms frames are subsampled 4x or 2x; Whisper: one 30 s window) and so many decoder tokens
    (``max_target_positions``, the prompt included); an utterance past either stopped training
    mid-epoch, before any checkpoint, naming no utterance. And CTC aligns each token to an encoder
    frame (two frames for a repeated token): audio with fewer frames than that cannot carry its
    transcript (its CTC loss is zeroed, it teaches nothing). ``speeds`` are the speed perturbation
    factors training draws from: the slowest makes the audio longest, the fastest shortest.
    """

    def __init__(self, config: "ModelConfig", prompt_length: int = 1, speeds: Sequence[float] = ()) -> None:
        from .frontend import LogMelFrontend, WhisperFrontend
        from .model.layers import UNPADDED_STEMS, Conv1dSubsampling

        self.config = config
        self.prompt_length = prompt_length
        self.speeds = (min(speeds), max(speeds)) if speeds else (1.0, 1.0)
        self.whisper = config.is_whisper
        self._frontend = WhisperFrontend() if self.whisper else LogMelFrontend(config.sample_rate, config.n_mels)
        stem = UNPADDED_STEMS.get(config.subsampling)
        self._subsampling_lengths = (partial(stem.lengths_after, layers=config.subsampling_layers) if stem
                                     else Conv1dSubsampling.output_lengths)
        # rotary positions alone have no table (nothing is added to the stream): no frame limit
        self.max_frames = None if config.encoder_positions == "rotary" else config.max_source_positions
        self.max_tokens = config.max_target_positions - prompt_length
        self.ctc = config.ctc_head and config.ctc_weight > 0

    def encoder_frames(self, seconds: Sequence[float]) -> list[int]:
        """Encoder frames the model makes of each of ``seconds`` of audio (by the frontend's and the
        subsampler's own length rules, for all utterances at once)."""
        samples = (torch.tensor(list(seconds), dtype=torch.float64) * self.config.sample_rate).round().long()
        return self._subsampling_lengths(self._frontend.frame_lengths(samples.clamp(min=1))).tolist()

    def longest_seconds(self) -> float:
        """The longest audio (to 10 ms) whose encoder frames fit the position table (Whisper: 30 s)."""
        if self.whisper or self.max_frames is None:
            return WHISPER_WINDOW_SECONDS if self.whisper else math.inf
        lo, hi = 0, 1  # in 10 ms steps; frames grow with the length
        while self.encoder_frames([hi / 100])[0] <= self.max_frames:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.encoder_frames([mid / 100])[0] <= self.max_frames else (lo, mid)
        return lo / 100

    def problems(self, utts: Sequence[Utterance], path: str | Path,
                 tokenizer: AnyTokenizer | None) -> list[ManifestProblem]:
        """A problem naming the line of each utterance of ``utts`` this model cannot take."""
        most = self.encoder_frames([u.duration / self.speeds[0] for u in utts])
        fewest = self.encoder_frames([u.duration / self.speeds[1] for u in utts])
        out = []
        for u, long_frames, short_frames in zip(utts, most, fewest):
            tokens = tokenizer.encode(u.text) if tokenizer is not None else []
            if message := self._problem(u, tokens, long_frames, short_frames):
                out.append(ManifestProblem(Path(path), u.line, message))
        return out

    def _problem(self, utt: Utterance, tokens: Sequence[int], most: int, fewest: int) -> str | None:
        c = self.config
        longest, shortest = utt.duration / self.speeds[0], utt.duration / self.speeds[1]
        perturbed = " (speed-perturbed)" if self.speeds != (1.0, 1.0) else ""
        drop = "set data.max_duration to leave such utterances out of training, or split the utterance"
        if self.whisper and longest > WHISPER_WINDOW_SECONDS:
            return (f"{longest:.2f} s of audio{perturbed}, longer than the Whisper model's "
                    f"{WHISPER_WINDOW_SECONDS:g} s window; {drop} (data.max_duration: {WHISPER_WINDOW_SECONDS:g})")
        if not self.whisper and self.max_frames is not None and most > self.max_frames:
            limit = self.longest_seconds()
            return (f"{longest:.2f} s of audio{perturbed} is {most} encoder frames, more than the model's "
                    f"{self.max_frames} (max_source_positions: at most {limit:g} s); {drop} "
                    f"(data.max_duration: {limit:g}), or train a model with a larger max_source_positions")
        if len(tokens) > self.max_tokens:
            return (f"transcript is {len(tokens)} tokens, more than the decoder's {self.max_tokens} "
                    f"(max_target_positions {c.max_target_positions} less the {self.prompt_length}-token prompt); "
                    "split the utterance, or train a model with a larger max_target_positions")
        needed = len(tokens) + sum(a == b for a, b in zip(tokens, tokens[1:]))  # a blank between repeats
        if self.ctc and fewest < needed:
            return (f"{shortest:.3f} s of audio{perturbed} is {fewest} encoder frame(s), too few for CTC to align "
                    f"its {len(tokens)} tokens (needs {needed}); check the duration and the transcript, or remove "
                    "the line")
        return None


def lost_characters(utts: Sequence[Utterance], tokenizer: AnyTokenizer) -> dict[str, list[int]]:
    """Each character of the transcripts that their token ids do not carry (see
    ``Tokenizer.lost_characters``), most frequent first, with the line of each occurrence."""
    lines: dict[str, list[int]] = {}
    for u in utts:
        for char in tokenizer.lost_characters(u.text):
            lines.setdefault(char, []).append(u.line)
    return dict(sorted(lines.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def format_lost_characters(path: str | Path, lost: dict[str, list[int]], limit: int = 20, lines: int = 5) -> str:
    """``lost_characters`` as lines a person reads: each character, its count and first lines."""
    n_lines = len({line for where in lost.values() for line in where})
    out = [f"{path}: {len(lost)} character(s) in {n_lines} line(s) that the tokenizer does not represent "
           "(removed by the text normalisation or encoded as <unk>); the model can never write them:"]
    for char, where in list(lost.items())[:limit]:
        first = sorted(set(where))
        shown = ", ".join(map(str, first[:lines])) + (", ..." if len(first) > lines else "")
        out.append(f"  {char!r} (U+{ord(char):04X}) x{len(where)}, line(s) {shown}")
    if len(lost) > limit:
        out.append(f"  ... and {len(lost) - limit} more character(s)")
    return "\n".join(out)


def apply_model_limits(utts: list[Utterance], problems: list[ManifestProblem], path: str | Path,
                       limits: UtteranceLimits | None, tokenizer: AnyTokenizer | None, max_duration: float = 0.0
                       ) -> tuple[list[Utterance], list[ManifestProblem], list[Utterance]]:
    """What training keeps of a scanned manifest: utterances longer than ``max_duration`` (0: none)
    are left out (returned third), then each one ``limits`` rules out becomes a problem (all
    problems in line order). Shared by training and ``speechformer data validate``."""
    too_long = [u for u in utts if u.duration > max_duration] if max_duration > 0 else []
    if too_long:
        utts = [u for u in utts if u.duration <= max_duration]
    if limits is not None and (over := limits.problems(utts, path, tokenizer)):
        ruled_out = {p.line for p in over}
        utts = [u for u in utts if u.line not in ruled_out]
        problems = sorted(problems + over, key=lambda p: p.line)
    return utts, problems, too_long


def max_duration_note(too_long: Sequence[Utterance], max_duration: float) -> str:
    return (f"data.max_duration {max_duration:g} s leaves out {len(too_long)} longer utterance(s) "
            f"(the first on line {too_long[0].line})")


def read_manifest(path: str | Path, *, require_text: bool = True, check_audio: bool = False,
                  skip_bad: bool = False, skip_option: str | None = None, limits: UtteranceLimits | None = None,
                  tokenizer: AnyTokenizer | None = None, max_duration: float = 0.0) -> list[Utterance]:
    """Read a JSONL manifest (see :func:`scan_manifest` for what is checked).

    A bad line raises :class:`ManifestError` listing every problem with its file and line,
    unless ``skip_bad``: then the bad lines are left out and a warning says how many.
    ``skip_option`` names the setting that would skip them (``data.skip_bad_lines`` for training),
    for the error's hint; without one (``evaluate``, ``transcribe --manifest``...) the hint
    says to fix or remove the lines, since that command cannot skip them.
    ``max_duration`` (seconds, 0: none) leaves longer utterances out first, with a warning that
    counts them; ``limits`` then makes each utterance the model cannot take a problem too.
    """
    utts, problems = scan_manifest(path, require_text=require_text, check_audio=check_audio)
    utts, problems, too_long = apply_model_limits(utts, problems, path, limits, tokenizer, max_duration)
    if too_long:
        warnings.warn(f"{path}: {max_duration_note(too_long, max_duration)}", stacklevel=2)
    if problems and not (skip_bad and utts):
        remedy = f"{skip_option}=true trains on the good lines" if skip_option else "fix or remove those lines"
        raise ManifestError(f"{len(problems)} problem(s) in {path}:\n{format_problems(problems)}\n"
                            f"(`speechformer data validate {path}` lists them all, `--config CONFIG` also those "
                            f"the model cannot take; {remedy})", problems)
    if problems:
        bad_lines = len({p.line for p in problems})
        warnings.warn(f"{path}: skipped {bad_lines} bad line(s), kept {len(utts)} utterance(s):\n"
                      f"{format_problems(problems, limit=10)}", stacklevel=2)
    return utts


def write_manifest(path: str | Path, utts: Sequence[Utterance]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for u in utts:
            try:  # relative to the manifest, so both can move together
                audio = Path(os.path.relpath(u.audio, path.parent))
            except ValueError:  # another drive
                audio = u.audio
            row: dict[str, Any] = {"id": u.id, "audio": str(audio), "duration": round(u.duration, 3),
                                   "text": u.text, "speaker": u.speaker}
            if u.offset:
                row["offset"] = u.offset
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class SpeechDataset(Dataset):
    """Utterances of a manifest as (id, waveform, token ids).

    ``speed_perturb`` (e.g. ``[0.9, 1.0, 1.1]``): each time an utterance is read, one factor
    is drawn at random and the audio is resampled as if it had been recorded at
    ``factor x sample_rate``, so it plays ``factor`` times faster, pitch shifted with it
    (Kaldi's and ESPnet's speed perturbation, done on the fly instead of tripling the
    corpus on disk); the length becomes ``len / factor``. Batching still uses the manifest
    durations, so a batch can be up to ``1 / min(factors)`` longer than ``max_batch_seconds``.

    The index may be ``(index, draw)`` (what :class:`DurationBatchSampler` yields with
    ``draw_seeds``): the factor is then a function of ``draw`` alone (:meth:`draw_choice`), whichever
    process or loader worker reads the item and whenever, so a resumed run perturbs as the
    uninterrupted one did. The sampler gives every item of a batch the same draw, so a batch plays
    at one speed: with a factor per utterance, most batches padded to the one utterance slowed to
    0.9x (1.11x the audio of no perturbation on the recipe's corpus; one factor per batch, 1.005x).
    A plain index draws from torch's global generator.
    """

    def __init__(self, utts: Sequence[Utterance], tokenizer: AnyTokenizer | None, sample_rate: int = 16000,
                 speed_perturb: Sequence[float] = ()) -> None:
        self.utts = list(utts)
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        if any(not 0.5 <= f <= 2.0 for f in speed_perturb):
            raise ValueError(f"speed_perturb factors must be within [0.5, 2], got {list(speed_perturb)}")
        self.speed_perturb = [float(f) for f in speed_perturb]

    def __len__(self) -> int:
        return len(self.utts)

    @property
    def durations(self) -> list[float]:
        return [u.duration for u in self.utts]

    def draw_choice(self, draw: int | None) -> int:
        """Which of ``speed_perturb``'s factors ``draw`` picks (``None``: torch's global generator)."""
        n = len(self.speed_perturb)
        return random.Random(draw).randrange(n) if draw is not None else int(torch.randint(n, ()))

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        index, draw = index if isinstance(index, tuple) else (index, None)
        u = self.utts[index]
        wav = load_audio(u.audio, self.sample_rate, offset=u.offset,
                         duration=u.duration if u.offset else None)
        if self.speed_perturb:
            wav = change_speed(wav, self.sample_rate, self.speed_perturb[self.draw_choice(draw)])
        tokens = self.tokenizer.encode(u.text) if self.tokenizer is not None else []
        return {"id": u.id, "wav": wav, "tokens": torch.tensor(tokens, dtype=torch.long), "text": u.text}


def change_speed(wav: Tensor, sample_rate: int, factor: float) -> Tensor:
    """``wav`` played ``factor`` times faster (tempo and pitch), by resampling: ``len / factor`` samples."""
    if factor == 1.0:
        return wav
    return _resampler(int(round(sample_rate * factor)), sample_rate)(wav)


class _Resampler:
    """torchaudio's windowed-sinc resampling by one rational factor, its kernel made once.

    The kernel is ``torchaudio.transforms.Resample``'s (``torchaudio.functional.resample``
    rebuilds it on every call: 3/4 of a speed-perturbed utterance's cost). It is applied as one
    matmul over strided windows of the signal, which is what torchaudio's strided ``conv1d``
    computes: the convolution's CPU kernel is built anew for each new signal length (every
    utterance of a corpus), 7-14x the matmul's time on varying lengths (measured).
    """

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        r = torchaudio.transforms.Resample(orig_freq, new_freq)
        self.step, self.phases = r.orig_freq // r.gcd, r.new_freq // r.gcd  # in, out samples per period
        self.width = r.width
        self.taps = r.kernel[:, 0, :].T.contiguous()  # [window, phases]: one output sample per phase

    def __call__(self, wav: Tensor) -> Tensor:
        length = wav.shape[-1]
        x = torch.nn.functional.pad(wav.reshape(-1, length), (self.width, self.width + self.step))
        out = (x.unfold(-1, self.taps.shape[0], self.step) @ self.taps).flatten(1)  # [n, periods * phases]
        return out[:, :-(-self.phases * length // self.step)].reshape(wav.shape[:-1] + (-1,))


@lru_cache(maxsize=16)
def _resampler(orig_freq: int, new_freq: int) -> _Resampler:
    """One resampler per factor (speed perturbation draws among a few)."""
    return _Resampler(orig_freq, new_freq)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad waveforms with zeros and token ids with 0; keep the true lengths.

    The padding is done in numpy: torch's multi-threaded copies wait for a busy second core, and
    with the loader in the training process (num_workers=0 on small machines) that made collate
    half of the loader's time (measured by benchmarks/loader.py).
    """
    wav_lengths = [len(it["wav"]) for it in items]
    wav = np.zeros((len(items), max(wav_lengths)), dtype=np.float32)
    for row, it in zip(wav, items):
        row[:len(it["wav"])] = it["wav"].numpy()
    token_lengths = [len(it["tokens"]) for it in items]
    tokens = np.zeros((len(items), max(1, max(token_lengths))), dtype=np.int64)
    for row, it in zip(tokens, items):
        row[:len(it["tokens"])] = it["tokens"].numpy()
    return {"ids": [it["id"] for it in items], "texts": [it["text"] for it in items],
            "wav": torch.from_numpy(wav), "wav_lengths": torch.tensor(wav_lengths),
            "tokens": torch.from_numpy(tokens), "token_lengths": torch.tensor(token_lengths)}


class DurationBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances, each capped by total padded seconds.

    Utterances are shuffled, cut into buckets of ``bucket_size`` batches' worth, sorted
    by duration inside each bucket and packed greedily so that (longest in batch) x
    (count) <= ``max_seconds``: little padding, bounded memory. The batches are made once
    (seed only), so every epoch has the same number; each epoch shuffles their order. Every rank builds the identical list (same seed and epoch) and takes every
    ``num_replicas``-th batch; if the count does not divide evenly, the largest batches
    are split in two until it does, so every rank gets the same number of batches and
    every utterance is seen exactly once per epoch.

    With ``draw_seeds`` each item is ``(index, draw)``, ``draw`` a number unique to (seed, epoch,
    batch) and shared by the batch's items, from which :class:`SpeechDataset` draws its random
    augmentation (one speed factor for the whole batch, so the batch's lengths stay alike and its
    padding small): like the batches, it is a function of the seed and the epoch only, so nothing
    about the data needs saving for an exact resume.
    """

    def __init__(self, durations: Sequence[float], max_seconds: float, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, bucket_size: int = 100, max_batch_size: int = 0,
                 draw_seeds: bool = False) -> None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        if len(durations) < num_replicas:
            raise ValueError(f"{len(durations)} utterances cannot be shared by {num_replicas} processes")
        self.durations = list(durations)
        self.max_seconds = max_seconds
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.bucket_size = bucket_size
        self.max_batch_size = max_batch_size
        self.draw_seeds = draw_seeds
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` start after its first ``batches_done`` batches
        (the ones trained before an interruption): the epoch goes on in the same order,
        nothing repeated, nothing skipped. Other epochs are untouched."""
        self._resume = (epoch, batches_done)

    @property
    def sampler(self) -> "DurationBatchSampler":
        """Lightning hands each new epoch to ``loader.sampler.set_epoch`` and
        ``loader.batch_sampler.sampler.set_epoch``, never to the batch sampler itself: this is
        how the epoch reaches :meth:`set_epoch` (without it every epoch repeated the first
        epoch's batches, in the same order)."""
        return self

    def _all_batches(self) -> list[list[int]]:
        # The batches themselves are made once (seeded by ``seed`` only); each epoch shuffles their
        # order. Lightning counts an epoch's batches once, at the start of training, and runs the
        # end-of-epoch validation when that count is reached: batches re-packed every epoch came
        # out one more or one fewer, and validation silently skipped those epochs.
        rng = random.Random(self.seed * 100_003)
        order = list(range(len(self.durations)))
        if self.shuffle:
            rng.shuffle(order)
        mean = sum(self.durations) / len(self.durations)
        per_bucket = max(1, int(self.bucket_size * self.max_seconds / max(mean, 1e-3)))
        batches: list[list[int]] = []
        for start in range(0, len(order), per_bucket):
            bucket = sorted(order[start:start + per_bucket], key=lambda i: self.durations[i])
            batch: list[int] = []
            longest = 0.0
            for i in bucket:
                longest_if = max(longest, self.durations[i])
                full = self.max_batch_size and len(batch) >= self.max_batch_size
                if batch and (longest_if * (len(batch) + 1) > self.max_seconds or full):
                    batches.append(batch)
                    batch, longest_if = [], self.durations[i]
                batch.append(i)
                longest = longest_if
            if batch:
                batches.append(batch)
        while len(batches) % self.num_replicas:
            j = max(range(len(batches)), key=lambda n: len(batches[n]))
            if len(batches[j]) < 2:
                raise ValueError("cannot split batches evenly across processes")
            big = batches.pop(j)
            batches[j:j] = [big[:len(big) // 2], big[len(big) // 2:]]
        if self.shuffle:
            random.Random(self.seed * 100_003 + 1 + self.epoch).shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        batches = self._all_batches()[self.rank::self.num_replicas][skip:]
        if self.draw_seeds:
            first = (self.seed * 1_000_003 + self.epoch) * len(self.durations)
            # a batch's draw is named by its first utterance, which is in no other batch
            batches = [[(i, first + batch[0]) for i in batch] for batch in batches]  # type: ignore[misc]
        yield from batches

    def __len__(self) -> int:
        return len(self._all_batches()) // self.num_replicas


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch is saved in every checkpoint.

    Lightning stores ``state_dict()`` of a training loader that has one, and hands it back
    through ``load_state_dict`` when it resumes in the middle of an epoch. The state is the
    epoch and the number of batches already trained in it, read from the trainer's own
    progress counters (not from the loader, whose workers and Lightning's prefetching run
    ahead of training); the sampler then rebuilds that epoch's batch order and starts after
    them. The sampler's epoch is also set from the trainer each time an iterator is made,
    because Lightning creates the first iterator (and loader workers start prefetching from
    it) before it calls ``set_epoch``.
    """

    def __init__(self, *args: Any, trainer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trainer = trainer

    def _position(self) -> tuple[int, int]:
        loop = self._trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def __iter__(self):  # type: ignore[no-untyped-def]
        if self._trainer is not None and isinstance(self.batch_sampler, DurationBatchSampler):
            self.batch_sampler.set_epoch(self._position()[0])
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._position() if self._trainer is not None else (0, 0)
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.batch_sampler, DurationBatchSampler):
            self.batch_sampler.resume(int(state["epoch"]), int(state["batches_done"]))


class SpeechDataModule(L.LightningDataModule):
    """Train/valid/test manifests -> duration-bucketed DataLoaders (DDP-aware)."""

    def __init__(self, train_manifest: str = "", valid_manifest: str = "", test_manifest: str = "",
                 tokenizer: str = "", sample_rate: int = 16000, max_batch_seconds: float = 120.0,
                 max_batch_size: int = 0, num_workers: int = 1, seed: int = 0,
                 max_duration: float = 0.0, check_audio: bool = True, skip_bad_lines: bool = False,
                 speed_perturb: list[float] | None = None) -> None:
        """``check_audio`` reads every audio header when a manifest is loaded (missing, unreadable
        or wrong-length files are manifest problems, found before training starts);
        ``skip_bad_lines`` trains on the good lines of a manifest with problems instead of refusing it.
        ``speed_perturb``: speed factors drawn per training utterance (e.g. ``[0.9, 1.0, 1.1]``,
        see :class:`SpeechDataset`); validation and test audio is never perturbed."""
        super().__init__()
        for name, value in (("max_batch_seconds", max_batch_seconds), ("sample_rate", sample_rate)):
            if not value > 0:
                raise ValueError(f"data.{name} must be positive, got {value}")
        for name, value in (("max_batch_size", max_batch_size), ("num_workers", num_workers),
                            ("max_duration", max_duration)):
            if not value >= 0:
                raise ValueError(f"data.{name} must be at least 0, got {value}")
        if max_duration and max_duration > max_batch_seconds:
            raise ValueError(f"data.max_duration ({max_duration} s) is longer than data.max_batch_seconds "
                             f"({max_batch_seconds} s): such utterances would not fit in a batch")
        self.speed_perturb = list(speed_perturb or [])
        self.train_manifest, self.valid_manifest, self.test_manifest = train_manifest, valid_manifest, test_manifest
        self.tokenizer_path = tokenizer
        self.sample_rate = sample_rate
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_duration = max_duration
        self.check_audio = check_audio
        self.skip_bad_lines = skip_bad_lines
        self.tokenizer: AnyTokenizer | None = None
        self.datasets: dict[str, SpeechDataset] = {}
        #: the model's config, for the utterance limits (:class:`UtteranceLimits`) every manifest is
        #: checked against; ``setup`` takes it from the LightningModule being trained if not set here
        self.model_config: ModelConfig | None = None

    def _limits(self, split: str) -> UtteranceLimits | None:
        if self.model_config is None:
            return None
        return UtteranceLimits(self.model_config, len(self.tokenizer.prompt) if self.tokenizer is not None else 1,
                               self.speed_perturb if split == "train" else ())

    def _dataset(self, split: str, manifest: str) -> SpeechDataset:
        if split not in self.datasets:
            if not manifest:
                raise ValueError(f"data: no {split}_manifest given (set data.{split}_manifest)")
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.tokenizer_path)
            utts = read_manifest(manifest, check_audio=self.check_audio, skip_bad=self.skip_bad_lines,
                                 skip_option="data.skip_bad_lines", limits=self._limits(split),
                                 tokenizer=self.tokenizer, max_duration=self.max_duration if split == "train" else 0.0)
            lost = lost_characters(utts, self.tokenizer) if self.tokenizer is not None else {}
            if lost:  # a warning, not an error: a few <unk> may be acceptable
                warnings.warn(format_lost_characters(manifest, lost), stacklevel=2)
            self.datasets[split] = SpeechDataset(utts, self.tokenizer, self.sample_rate,
                                                 self.speed_perturb if split == "train" else ())
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        """Read (and check) the manifests of the stage before any training or decoding starts,
        against the limits of the model being trained (see :class:`UtteranceLimits`)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.model_config is None and module is not None:
            from .model import ModelConfig

            config = getattr(module, "config", None)
            self.model_config = config if isinstance(config, ModelConfig) else None
        splits = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",)}.get(stage, ())
        for split in splits:
            manifest = getattr(self, f"{split}_manifest")
            if manifest or split == "train":
                self._dataset(split, manifest)

    def _sampler(self, split: str, manifest: str, shuffle: bool) -> DurationBatchSampler:
        ds = self._dataset(split, manifest)
        trainer = self.trainer
        replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        return DurationBatchSampler(ds.durations, self.max_batch_seconds, shuffle=shuffle, seed=self.seed,
                                    num_replicas=replicas, rank=rank, max_batch_size=self.max_batch_size,
                                    draw_seeds=bool(ds.speed_perturb))

    def train_batches_per_epoch(self) -> int:
        """Batches each process trains on per epoch (without building a loader)."""
        return len(self._sampler("train", self.train_manifest, shuffle=True))

    def _loader(self, split: str, manifest: str, shuffle: bool) -> DataLoader:
        ds = self._dataset(split, manifest)
        trainer = self.trainer
        sampler = self._sampler(split, manifest, shuffle)
        loader = ResumableLoader if split == "train" else DataLoader
        extra = {"trainer": trainer} if split == "train" else {}
        # the loader's own generator seeds its workers: making an iterator (each epoch) then draws
        # nothing from the global generator, whose state a resumed run restores (dropout's)
        return loader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers else None,
                      generator=torch.Generator().manual_seed(self.seed), **extra)

    def train_dataset(self) -> SpeechDataset:
        return self._dataset("train", self.train_manifest)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_manifest, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.valid_manifest, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_manifest, shuffle=False)
