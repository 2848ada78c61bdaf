"""Sentencepiece BPE: train, load, encode, decode.

Byte-pair encoding starts from characters and repeatedly merges the most frequent
adjacent pair into a new symbol, so frequent words become one token and rare words
split into pieces: no word is ever out of vocabulary.

Id layout (fixed, so the model config can rely on it): 0 ``<blank>`` (the CTC blank,
never produced by ``encode``), 1 ``<unk>``, 2 ``<s>`` (decoder start), 3 ``</s>`` (end).
Text is normalised with :func:`speechformer.text.normalize_text` before training and
encoding, the same function that scoring uses.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from .text import normalize_text

BLANK_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_FILE = "tokenizer.model"


class Tokenizer:
    """A loaded sentencepiece model with speechformer's id layout and normalisation."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (
                BLANK_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError("tokenizer: not a speechformer tokenizer (expected ids blank=0 unk=1 bos=2 eos=3); "
                             "train one with `speechformer tokenizer train`")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a ``tokenizer.model`` file or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {path} not found; train one with `speechformer tokenizer train`")
        return cls(path.read_bytes())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    blank_id, unk_id, bos_id, eos_id = BLANK_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(normalize_text(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i > EOS_ID])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MODEL_FILE
        path.write_bytes(self.model_proto)
        return path


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a BPE model of ``vocab_size`` pieces on normalised ``texts``; save it in ``out_dir``."""
    sentences = [t for t in (normalize_text(x) for x in texts) if t]
    if not sentences:
        raise ValueError("tokenizer: no non-empty transcripts to train on")
    if vocab_size < 8:
        raise ValueError(f"tokenizer: --vocab-size must be at least 8, got {vocab_size}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, pad_id=BLANK_ID, pad_piece="<blank>",
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=2, minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"tokenizer: --vocab-size {vocab_size} does not fit these transcripts: {err}") from err
    tok = Tokenizer(model.getvalue())
    tok.save(out_dir)
    return tok
