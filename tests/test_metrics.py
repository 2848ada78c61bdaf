"""Tests for speechformer.metrics, against hand-computed edit counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from speechformer.metrics import EvalReport, UtteranceScore, format_summary, score, write_report


def test_single_utterance_sub_and_del() -> None:
    r = score(["u1"], ["a b c d"], ["a x c"])
    assert (r.substitutions, r.deletions, r.insertions) == (1, 1, 0)
    assert r.num_ref_words == 4 and r.num_utterances == 1
    assert r.wer == pytest.approx(0.5)
    # characters "a b c d" (7) vs "a x c" (5): b->x, delete " d" = 3 edits
    assert r.cer == pytest.approx(3 / 7)
    u = r.utterances[0]
    assert u == UtteranceScore("u1", "a b c d", "a x c", 1, 1, 0, 4)
    assert u.errors == 2
    assert r.top_substitutions == [("b", "x", 1)]
    assert r.top_deletions == [("d", 1)]
    assert r.top_insertions == []


def test_corpus_level_not_mean_of_utterances() -> None:
    # u1: 1 error / 1 word (WER 1.0); u2: 0 errors / 9 words (WER 0.0)
    r = score(["u1", "u2"], ["hello", "one two three four five six seven eight nine"],
              ["world", "one two three four five six seven eight nine"])
    assert r.wer == pytest.approx(1 / 10)  # the mean of per-utterance WERs would be 0.5
    assert r.num_ref_words == 10


def test_insertions_and_perfect() -> None:
    r = score(["a", "b"], ["the cat", "yes"], ["the big cat sat", "yes"])
    assert (r.substitutions, r.deletions, r.insertions) == (0, 0, 2)
    assert r.wer == pytest.approx(2 / 3)
    assert dict(r.top_insertions) == {"big": 1, "sat": 1}
    assert r.utterances[1].errors == 0


def test_normalisation_applied() -> None:
    r = score(["u"], ["Hello, World! Don't stop."], ["hello world don't   STOP"])
    assert r.wer == 0.0 and r.cer == 0.0
    assert r.utterances[0].reference == "hello world don't stop"
    raw = score(["u"], ["Hello, World!"], ["hello world"], normalize=False)
    assert raw.substitutions == 2


def test_empty_hypothesis_and_reference() -> None:
    r = score(["u1", "u2", "u3"], ["a b c", "", ""], ["", "x y", ""])
    u1, u2, u3 = r.utterances
    assert (u1.substitutions, u1.deletions, u1.insertions) == (0, 3, 0)
    assert (u2.substitutions, u2.deletions, u2.insertions, u2.ref_words) == (0, 0, 2, 0)
    assert u3.errors == 0
    assert r.wer == pytest.approx(5 / 3)
    # chars: 5 deleted ("a b c"), 3 inserted ("x y")
    assert r.cer == pytest.approx(8 / 5)
    assert dict(r.top_deletions) == {"a": 1, "b": 1, "c": 1}
    assert dict(r.top_insertions) == {"x": 1, "y": 1}


def test_punctuation_only_reference_counts_as_empty() -> None:
    r = score(["u"], ["?!"], ["uh"])
    assert r.num_ref_words == 0 and r.insertions == 1
    assert math.isinf(r.wer)
    assert score(["u"], [""], [""]).wer == 0.0


def test_top_substitutions_counted_and_sorted() -> None:
    refs = ["the cat sat", "a cat ran", "the dog sat", "one two"]
    hyps = ["the hat sat", "a hat ran", "the dog sad", "one too"]
    r = score(list("abcd"), refs, hyps, top_k=2)
    assert r.top_substitutions == [("cat", "hat", 2), ("sat", "sad", 1)]  # tie broken alphabetically
    assert r.substitutions == 4


def test_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 ids"):
        score(["a", "b"], ["x"], ["x", "y"])


def _example() -> EvalReport:
    return score(
        ["utt2", "utt1", "utt3"],
        ["a b c d", "hello world", "yes"],
        ["a x c", "hello world", "yes yes"],
    )


def test_write_report(tmp_path: Path) -> None:
    report = _example()
    paths = write_report(report, tmp_path / "eval")
    assert set(paths) == {"summary", "utterances", "errors"}
    for p in paths.values():
        assert p.exists() and p.parent == tmp_path / "eval"
    assert sorted(q.name for q in (tmp_path / "eval").iterdir()) == ["errors.txt", "summary.json", "utterances.tsv"]

    summary = json.loads(paths["summary"].read_text())
    assert summary["wer"] == pytest.approx(3 / 7, abs=1e-6)
    assert summary["wer_percent"] == 42.86
    assert (summary["substitutions"], summary["deletions"], summary["insertions"]) == (1, 1, 1)
    assert summary["num_utterances"] == 3 and summary["num_ref_words"] == 7

    lines = paths["utterances"].read_text().splitlines()
    assert lines[0].split("\t") == ["id", "reference", "hypothesis", "errors", "sub", "del", "ins", "ref_words"]
    assert lines[1].split("\t") == ["utt2", "a b c d", "a x c", "2", "1", "1", "0", "4"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["utt2", "utt3", "utt1"]

    errors = paths["errors"].read_text()
    assert "b -> x  1" in errors
    sections = errors.split("\n\n")
    assert len(sections) == 3
    assert "d  1" in sections[1] and "yes  1" in sections[2]


def test_format_summary() -> None:
    text = format_summary(_example(), name="dev")
    head, rule, row = text.splitlines()
    assert [c.strip() for c in head.strip("|").split("|")] == ["set", "utts", "words", "WER %", "CER %", "sub", "del", "ins"]
    assert [c.strip() for c in row.strip("|").split("|")] == ["dev", "3", "7", "42.86", "33.33", "1", "1", "1"]
    assert len(head) == len(rule) == len(row)
