"""Manifests, the dataset, the duration-bucketing batch sampler, padding collate, the DataModule.

Manifest: JSON Lines, one utterance a line::

    {"id": "u1", "audio": "wavs/u1.wav", "duration": 3.21, "text": "hello world", "speaker": "s1"}

with an optional ``"offset"`` (seconds) for a segment of a longer file. A relative
``audio`` path is resolved against the manifest's own folder.
"""

from __future__ import annotations

import json
import os
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .audio import load_audio
from .tokenizer import AnyTokenizer, load_tokenizer


@dataclass
class Utterance:
    id: str
    audio: Path
    duration: float
    text: str
    speaker: str = ""
    offset: float = 0.0


class ManifestError(ValueError):
    """A manifest problem; the message names the file and line."""


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest. Any bad line raises :class:`ManifestError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; create one with data_prep/ or `speechformer prepare`")
    utts: list[Utterance] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ManifestError(f"{where}: expected a JSON object")
            missing = [k for k in ("id", "audio", "duration") if k not in row]
            if missing:
                raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
            uid = str(row["id"])
            if uid in seen:
                raise ManifestError(f"{where}: duplicate id {uid!r} (first on line {seen[uid]})")
            seen[uid] = lineno
            try:
                duration = float(row["duration"])
                offset = float(row.get("offset", 0.0))
            except (TypeError, ValueError) as err:
                raise ManifestError(f"{where}: duration/offset must be numbers") from err
            if not math.isfinite(duration) or duration <= 0:
                raise ManifestError(f"{where}: duration must be positive, got {row['duration']!r}")
            audio = Path(row["audio"])
            if not audio.is_absolute():
                audio = path.parent / audio
            utts.append(Utterance(uid, audio, duration, str(row.get("text", "")), str(row.get("speaker", "")),
                                  offset))
    if not utts:
        raise ManifestError(f"{path}: manifest is empty")
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
    """Utterances of a manifest as (id, waveform, token ids)."""

    def __init__(self, utts: Sequence[Utterance], tokenizer: AnyTokenizer | None, sample_rate: int = 16000) -> None:
        self.utts = list(utts)
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.utts)

    @property
    def durations(self) -> list[float]:
        return [u.duration for u in self.utts]

    def __getitem__(self, index: int) -> dict[str, Any]:
        u = self.utts[index]
        wav = load_audio(u.audio, self.sample_rate, offset=u.offset,
                         duration=u.duration if u.offset else None)
        tokens = self.tokenizer.encode(u.text) if self.tokenizer is not None else []
        return {"id": u.id, "wav": wav, "tokens": torch.tensor(tokens, dtype=torch.long), "text": u.text}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad waveforms with zeros and token ids with 0; keep the true lengths."""
    wav_lengths = torch.tensor([len(it["wav"]) for it in items])
    wav = torch.zeros(len(items), int(wav_lengths.max()))
    for i, it in enumerate(items):
        wav[i, :len(it["wav"])] = it["wav"]
    token_lengths = torch.tensor([len(it["tokens"]) for it in items])
    tokens = torch.zeros(len(items), max(1, int(token_lengths.max())), dtype=torch.long)
    for i, it in enumerate(items):
        tokens[i, :len(it["tokens"])] = it["tokens"]
    return {"ids": [it["id"] for it in items], "texts": [it["text"] for it in items], "wav": wav,
            "wav_lengths": wav_lengths, "tokens": tokens, "token_lengths": token_lengths}


class DurationBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances, each capped by total padded seconds.

    Utterances are shuffled, cut into buckets of ``bucket_size`` batches' worth, sorted
    by duration inside each bucket and packed greedily so that (longest in batch) x
    (count) <= ``max_seconds``: little padding, bounded memory. The batch order is then
    shuffled. Every rank builds the identical list (same seed and epoch) and takes every
    ``num_replicas``-th batch; if the count does not divide evenly, the largest batches
    are split in two until it does, so every rank gets the same number of batches and
    every utterance is seen exactly once per epoch.
    """

    def __init__(self, durations: Sequence[float], max_seconds: float, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, bucket_size: int = 100, max_batch_size: int = 0) -> None:
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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> "DurationBatchSampler":
        """Lightning hands each new epoch to ``loader.sampler.set_epoch`` and
        ``loader.batch_sampler.sampler.set_epoch``, never to the batch sampler itself: this is
        how the epoch reaches :meth:`set_epoch` (without it every epoch repeated the first
        epoch's batches, in the same order)."""
        return self

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
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
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self._all_batches()) // self.num_replicas


class SpeechDataModule(L.LightningDataModule):
    """Train/valid/test manifests -> duration-bucketed DataLoaders (DDP-aware)."""

    def __init__(self, train_manifest: str = "", valid_manifest: str = "", test_manifest: str = "",
                 tokenizer: str = "", sample_rate: int = 16000, max_batch_seconds: float = 120.0,
                 max_batch_size: int = 0, num_workers: int = 1, seed: int = 0,
                 max_duration: float = 0.0) -> None:
        super().__init__()
        self.train_manifest, self.valid_manifest, self.test_manifest = train_manifest, valid_manifest, test_manifest
        self.tokenizer_path = tokenizer
        self.sample_rate = sample_rate
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_duration = max_duration
        self.tokenizer: AnyTokenizer | None = None
        self.datasets: dict[str, SpeechDataset] = {}

    def _dataset(self, split: str, manifest: str) -> SpeechDataset:
        if split not in self.datasets:
            if not manifest:
                raise ValueError(f"data: no {split}_manifest given (set data.{split}_manifest)")
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.tokenizer_path)
            utts = read_manifest(manifest)
            if self.max_duration > 0 and split == "train":
                utts = [u for u in utts if u.duration <= self.max_duration]
            self.datasets[split] = SpeechDataset(utts, self.tokenizer, self.sample_rate)
        return self.datasets[split]

    def _loader(self, split: str, manifest: str, shuffle: bool) -> DataLoader:
        ds = self._dataset(split, manifest)
        trainer = self.trainer
        replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        sampler = DurationBatchSampler(ds.durations, self.max_batch_seconds, shuffle=shuffle, seed=self.seed,
                                       num_replicas=replicas, rank=rank, max_batch_size=self.max_batch_size)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers else None)

    def train_dataset(self) -> SpeechDataset:
        return self._dataset("train", self.train_manifest)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_manifest, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.valid_manifest, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_manifest, shuffle=False)
