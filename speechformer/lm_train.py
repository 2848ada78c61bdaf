"""Training the language model of :mod:`speechformer.lm` with Lightning (``speechformer lm train``).

Text in, LM folder out: one sentence a line (``.txt`` or ``.txt.gz``), normalised and cut into
the tokenizer's pieces as transcripts are; batches of sentences padded to their longest; the
acoustic model's optimiser and schedule (:func:`speechformer.lightning.adamw_warmup_cosine`);
the perplexity on ``--valid-text`` after every epoch; at the end, the folder written by
:func:`speechformer.lm.export_lm`. No training checkpoints: an LM of this size trains in
minutes, and a killed run leaves the previous folder as it was (every file is written atomically).
"""

from __future__ import annotations

import gzip
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from array import array
from typing import Any, Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F

from .errors import UserError
from .lightning import adamw_warmup_cosine, quiet_lightning_notices
from .lm import LanguageModel, LMConfig, export_lm, pad_batch, perplexity
from .tokenizer import Tokenizer, load_tokenizer


def text_lines(path: str | Path, flag: str = "--text") -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, gzip-compressed if it ends in ``.gz``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}", "not found" if not path.exists() else "not a file",
                        "give a text file with one sentence a line (.txt or .txt.gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as handle:  # bytes, decoded line by line: an error names its line
            for number, raw in enumerate(handle, 1):
                yield number, raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}:{number}", f"not UTF-8 text ({err.reason} at byte {err.start} of the line)",
                        "convert the file to UTF-8 (iconv -t utf-8)") from err
    except (gzip.BadGzipFile, EOFError) as err:
        raise UserError(path, f"not a readable gzip file ({err})", "compress it again, or give the plain text") from err


class Sentences(Sequence[list[int]]):
    """Sentences of pieces stored flat (4 bytes a piece and 8 an offset, not a Python list each):
    LibriSpeech's 40 million LM sentences fit in a few GB. ``sentences[i]`` is a list of ids."""

    def __init__(self) -> None:
        self.pieces, self.offsets = array("i"), array("q", [0])

    def append(self, ids: list[int]) -> None:
        self.pieces.extend(ids)
        self.offsets.append(len(self.pieces))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:  # type: ignore[override]
        return self.pieces[self.offsets[i]:self.offsets[i + 1]].tolist()

    def num_pieces(self) -> int:
        return len(self.pieces)


def read_sentences(path: str | Path, tokenizer: Tokenizer, max_pieces: int, flag: str = "--text") -> Sentences:
    """The pieces of every non-empty line; lines longer than ``max_pieces`` are left out (and counted)."""
    sentences, too_long = Sentences(), 0
    for _, line in text_lines(path, flag):
        pieces = tokenizer.encode(line)
        if not pieces:
            continue
        if len(pieces) > max_pieces:
            too_long += 1
            continue
        sentences.append(pieces)
    if too_long:
        print(f"{path}: note: {too_long} line(s) longer than {max_pieces} pieces left out (raise --max-positions "
              "to keep them)", file=sys.stderr)
    if not sentences:
        raise UserError(f"{flag} {path}", "no sentences (every line is empty or too long)",
                        "give a text file with one sentence a line")
    return sentences


def sentencepiece_tokenizer(path: str | Path) -> Tokenizer:
    """The ``--tokenizer`` folder's sentencepiece model (the LM's pieces must be an acoustic model's)."""
    tokenizer = load_tokenizer(path)
    if not isinstance(tokenizer, Tokenizer):
        raise UserError(f"--tokenizer {path}", "a Whisper tokenizer; a language model is trained on a "
                        "sentencepiece tokenizer", "give the tokenizer folder of a speechformer model")
    return tokenizer


class LMModule(L.LightningModule):
    """Cross-entropy of the next piece; the perplexity on the validation sentences each epoch."""

    def __init__(self, model: LanguageModel, lr: float, weight_decay: float, warmup_steps: int,
                 total_steps: int, min_lr_ratio: float = 0.05) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.total_steps, self.min_lr_ratio = total_steps, min_lr_ratio
        self._nll, self._count = 0.0, 0
        self.valid_perplexity: float | None = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self.model(inputs).float().transpose(1, 2), targets, ignore_index=-100)
        self.log("train_loss", loss, prog_bar=True, batch_size=inputs.shape[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        nll = F.cross_entropy(self.model(inputs).float().transpose(1, 2), targets, ignore_index=-100,
                              reduction="sum")
        self._nll += float(nll)
        self._count += int((targets != -100).sum())

    def on_validation_epoch_end(self) -> None:
        if not self._count:
            return
        loss = self._nll / self._count
        self._nll, self._count = 0.0, 0
        self.valid_perplexity = math.exp(loss)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            print(f"lm train: epoch {self.current_epoch + 1}: valid perplexity {self.valid_perplexity:.3f}",
                  file=sys.stderr)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self.model.named_parameters(), self.lr, self.weight_decay, (0.9, 0.98),
                                   self.warmup_steps, self.total_steps, self.min_lr_ratio)


@dataclass
class LMTraining:
    """How to train: the loop's settings (the model's sizes are an :class:`LMConfig`)."""

    max_epochs: int = 10
    max_steps: int = -1  # > 0: stop after this many optimiser steps instead
    batch_size: int = 64  # sentences per batch
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    accelerator: str = "auto"
    precision: str = "32-true"
    seed: int = 0
    progress: bool = True


def _loader(sentences: Sentences, config: LMConfig, batch_size: int, shuffle: bool, seed: int
            ) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(sentences, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=lambda batch: pad_batch(batch, config))


def train_lm(text: str | Path, tokenizer_dir: str | Path, out: str | Path, config: LMConfig,
             training: LMTraining = LMTraining(), valid_text: str | Path | None = None) -> dict[str, Any]:
    """Train an LM on ``text`` over the pieces of ``tokenizer_dir``, export it to ``out``; return a summary."""
    started = time.perf_counter()
    tokenizer = sentencepiece_tokenizer(tokenizer_dir)
    config.vocab_size = tokenizer.vocab_size
    train = read_sentences(text, tokenizer, config.max_positions - 1)
    valid = read_sentences(valid_text, tokenizer, config.max_positions - 1, "--valid-text") if valid_text else None
    L.seed_everything(training.seed, verbose=False)
    model = LanguageModel(config)
    steps_per_epoch = math.ceil(len(train) / training.batch_size)
    total = training.max_steps if training.max_steps > 0 else steps_per_epoch * training.max_epochs
    module = LMModule(model, training.lr, training.weight_decay, training.warmup_steps, total)
    quiet_lightning_notices()
    if not valid:  # LMModule has a validation_step; without --valid-text it simply does not run
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
    trainer = L.Trainer(max_epochs=training.max_epochs if training.max_steps <= 0 else -1,
                        max_steps=training.max_steps, accelerator=training.accelerator, devices=1,
                        precision=training.precision, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=training.progress, gradient_clip_val=1.0,
                        num_sanity_val_steps=0, **({} if valid else {"limit_val_batches": 0}))
    trainer.fit(module, _loader(train, config, training.batch_size, True, training.seed),
                _loader(valid, config, training.batch_size, False, 0) if valid else None)
    model = module.model.cpu().eval()
    summary = {"train_text": str(text), "train_sentences": len(train), "train_pieces": train.num_pieces(),
               "steps": trainer.global_step, "epochs": round(trainer.global_step / steps_per_epoch, 2),
               "valid_text": str(valid_text) if valid_text else None,
               "valid_perplexity": round(perplexity(model, valid), 4) if valid else None,
               "train_seconds": round(time.perf_counter() - started, 1)}
    export_lm(model, tokenizer, out, **summary)
    return summary
