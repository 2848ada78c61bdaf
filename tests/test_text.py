"""Tests for speechformer.text.normalize_text, the one shared normaliser."""

from __future__ import annotations

import pytest

from speechformer.text import normalize_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello World", "hello world"),
        ("HELLO, world!  How are you?", "hello world how are you"),
        ("Don't stop", "don't stop"),
        ("It\u2019s fine", "it's fine"),  # curly apostrophe becomes '
        ("'quoted' words", "quoted words"),  # lone quotes dropped
        ("the dogs' bowls", "the dogs bowls"),  # trailing apostrophe is not inside a word
        ("rock 'n' roll", "rock n roll"),
        ('he said "yes"', "he said yes"),
        ("  spaced\tout\n\nlines  ", "spaced out lines"),
        ("well-known e-mail", "well known e mail"),
        ("snake_case", "snake case"),
        ("room 101", "room 101"),
        ("ＦＵＬＬ width", "full width"),  # NFKC
        ("Café Ñandú", "café ñandú"),  # letters outside ASCII are kept
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_idempotent() -> None:
    for raw in ["Don't STOP -- now!", "'a' b' 'c", "x\u2019y"]:
        once = normalize_text(raw)
        assert normalize_text(once) == once
