"""One text normalisation, used for tokenizer training, targets and WER scoring alike.

Why one function: if training and scoring normalise differently, WER measures the
normaliser, not the model. The rule is deliberately simple and documented:

1. Unicode NFKC, then lower case.
2. Curly apostrophes become ``'``; every character that is not a letter, a digit,
   an apostrophe or whitespace becomes a space (punctuation is not transcribed).
3. Apostrophes not inside a word are dropped; runs of whitespace collapse to one
   space; leading/trailing space is stripped.
"""

from __future__ import annotations

import re
import unicodedata

_NOT_KEPT = re.compile(r"[^\w' ]+", flags=re.UNICODE)
_LONE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Return the canonical form of a transcript (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("_", " ")
    text = _SPACES.sub(" ", text)
    text = _NOT_KEPT.sub(" ", text)
    text = _LONE_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def dropped_characters(text: str) -> list[str]:
    """Characters of ``text`` that :func:`normalize_text` removes although they may be spoken:
    letters, marks, digits and symbols (emoji, currency, maths) that rule 2 does not keep,
    such as a combining vowel sign or an emoji. Punctuation, spaces and control characters
    are removed on purpose and not listed. In order, with repeats."""
    canon = unicodedata.normalize("NFKC", text).lower()
    return [c for c in canon if unicodedata.category(c)[0] in "LMNS" and _NOT_KEPT.fullmatch(c)]
