"""Word and character error rates, and an error report that says where they come from.

Scores are *corpus-level*: the total number of word (character) errors over the
total number of reference words (characters). The mean of per-utterance WERs is
not used because it gives a two-word utterance the same weight as a fifty-word
one.

Both sides are normalised with :func:`speechformer.text.normalize_text` by
default — the same function used to build training targets — so case and
punctuation never count as errors, and scores are comparable across recipes.

Alignment and edit counts come from ``jiwer`` (``process_words`` and
``process_characters``, jiwer >= 3). Empty references and hypotheses are handled
here rather than by jiwer, because jiwer 3.x raises on empty reference strings:
an empty reference with a non-empty hypothesis counts as all insertions, an
empty hypothesis as all deletions.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jiwer

from speechformer.atomic import atomic_write_text
from speechformer.text import normalize_text

__all__ = ["EvalReport", "UtteranceScore", "format_summary", "score", "write_report"]


@dataclass
class UtteranceScore:
    """Edit counts for one utterance.

    ``reference`` and ``hypothesis`` are the texts as scored (i.e. after
    normalisation when it was applied).
    """

    id: str
    reference: str
    hypothesis: str
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int

    @property
    def errors(self) -> int:
        """Total word errors (substitutions + deletions + insertions)."""
        return self.substitutions + self.deletions + self.insertions


@dataclass
class EvalReport:
    """Corpus-level scores plus per-utterance counts and the most common errors.

    ``wer`` and ``cer`` are fractions (0.1 = 10 %). When the references hold no
    words at all they are 0.0 if there is no error and ``inf`` otherwise.
    """

    wer: float
    cer: float
    num_utterances: int
    num_ref_words: int
    substitutions: int
    deletions: int
    insertions: int
    utterances: list[UtteranceScore] = field(default_factory=list)
    top_substitutions: list[tuple[str, str, int]] = field(default_factory=list)
    top_deletions: list[tuple[str, int]] = field(default_factory=list)
    top_insertions: list[tuple[str, int]] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Total word errors over the corpus."""
        return self.substitutions + self.deletions + self.insertions


def _rate(errors: int, total: int) -> float:
    if total > 0:
        return errors / total
    return 0.0 if errors == 0 else math.inf


def _char_counts(ref: str, hyp: str) -> tuple[int, int]:
    """Return (character edits, reference characters) for one pair.

    Characters include the single spaces between words, as in jiwer's CER.
    """
    if not ref:
        return len(hyp), 0
    if not hyp:
        return len(ref), len(ref)
    out = jiwer.process_characters(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref)


def _top(counter: Counter, k: int) -> list:
    """Most common items, ties broken by the item itself so output is stable."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def score(
    ids: Sequence[str],
    references: Sequence[str],
    hypotheses: Sequence[str],
    normalize: bool = True,
    top_k: int = 20,
) -> EvalReport:
    """Score hypotheses against references; return an :class:`EvalReport`.

    Args:
        ids: utterance ids (used in the per-utterance table).
        references: reference transcripts, one per id.
        hypotheses: recognised transcripts, one per id.
        normalize: apply :func:`normalize_text` to both sides first. Without it,
            only whitespace is collapsed.
        top_k: how many of the most frequent substitutions, deletions and
            insertions to keep.

    Raises ``ValueError`` when the three sequences differ in length.
    """
    ids, references, hypotheses = list(ids), list(references), list(hypotheses)
    if not len(ids) == len(references) == len(hypotheses):
        raise ValueError(
            f"score() needs one reference and one hypothesis per id: got {len(ids)} ids, "
            f"{len(references)} references, {len(hypotheses)} hypotheses"
        )
    prep = normalize_text if normalize else (lambda t: " ".join(t.split()))

    utts: list[UtteranceScore] = []
    subs: Counter[tuple[str, str]] = Counter()
    dels: Counter[str] = Counter()
    ins: Counter[str] = Counter()
    char_errors = char_total = 0

    for utt_id, raw_ref, raw_hyp in zip(ids, references, hypotheses):
        ref, hyp = prep(raw_ref), prep(raw_hyp)
        ref_words, hyp_words = ref.split(), hyp.split()
        if not ref_words or not hyp_words:
            s, d, i = 0, len(ref_words), len(hyp_words)
            dels.update(ref_words)
            ins.update(hyp_words)
        else:
            out = jiwer.process_words(ref, hyp)
            s, d, i = out.substitutions, out.deletions, out.insertions
            r_toks, h_toks = out.references[0], out.hypotheses[0]
            for chunk in out.alignments[0]:
                r = r_toks[chunk.ref_start_idx : chunk.ref_end_idx]
                h = h_toks[chunk.hyp_start_idx : chunk.hyp_end_idx]
                if chunk.type == "substitute":
                    subs.update(zip(r, h))
                elif chunk.type == "delete":
                    dels.update(r)
                elif chunk.type == "insert":
                    ins.update(h)
        ce, ct = _char_counts(ref, hyp)
        char_errors += ce
        char_total += ct
        utts.append(UtteranceScore(str(utt_id), ref, hyp, s, d, i, len(ref_words)))

    n_sub = sum(u.substitutions for u in utts)
    n_del = sum(u.deletions for u in utts)
    n_ins = sum(u.insertions for u in utts)
    n_ref = sum(u.ref_words for u in utts)
    return EvalReport(
        wer=_rate(n_sub + n_del + n_ins, n_ref),
        cer=_rate(char_errors, char_total),
        num_utterances=len(utts),
        num_ref_words=n_ref,
        substitutions=n_sub,
        deletions=n_del,
        insertions=n_ins,
        utterances=utts,
        top_substitutions=[(r, h, c) for (r, h), c in _top(subs, top_k)],
        top_deletions=_top(dels, top_k),
        top_insertions=_top(ins, top_k),
    )


def _json_number(x: float, digits: int) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def _tsv_field(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def _lines(rows: Iterable[str]) -> str:
    return "".join(f"{r}\n" for r in rows)


def write_report(report: EvalReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (created if needed).

    * ``summary.json``: wer/cer (fractions, 6 decimals, ``null`` if undefined),
      wer_percent/cer_percent (2 decimals), and the counts;
    * ``utterances.tsv``: ``id reference hypothesis errors sub del ins ref_words``,
      worst utterances first (errors descending, then id);
    * ``errors.txt``: the most frequent substitutions (``ref -> hyp  count``),
      deletions and insertions, in three sections.

    Returns ``{"summary": ..., "utterances": ..., "errors": ...}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out / "summary.json",
        "utterances": out / "utterances.tsv",
        "errors": out / "errors.txt",
    }

    summary = {
        "wer": _json_number(report.wer, 6),
        "cer": _json_number(report.cer, 6),
        "wer_percent": _json_number(100 * report.wer, 2),
        "cer_percent": _json_number(100 * report.cer, 2),
        "num_utterances": report.num_utterances,
        "num_ref_words": report.num_ref_words,
        "errors": report.errors,
        "substitutions": report.substitutions,
        "deletions": report.deletions,
        "insertions": report.insertions,
    }
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2) + "\n")

    header = "id\treference\thypothesis\terrors\tsub\tdel\tins\tref_words"
    rows = [
        "\t".join(
            [
                _tsv_field(u.id),
                _tsv_field(u.reference),
                _tsv_field(u.hypothesis),
                str(u.errors),
                str(u.substitutions),
                str(u.deletions),
                str(u.insertions),
                str(u.ref_words),
            ]
        )
        for u in sorted(report.utterances, key=lambda u: (-u.errors, u.id))
    ]
    atomic_write_text(paths["utterances"], _lines([header, *rows]))

    err_lines = ["# substitutions: ref -> hyp  count"]
    err_lines += [f"{r} -> {h}  {c}" for r, h, c in report.top_substitutions]
    err_lines += ["", "# deletions: ref  count"]
    err_lines += [f"{w}  {c}" for w, c in report.top_deletions]
    err_lines += ["", "# insertions: hyp  count"]
    err_lines += [f"{w}  {c}" for w, c in report.top_insertions]
    atomic_write_text(paths["errors"], _lines(err_lines))
    return paths


def format_summary(report: EvalReport, name: str = "test") -> str:
    """Return a small Markdown table (header, rule, one row) for printing.

    Example::

        | set      | utts  | words  | WER %  | CER %  | sub   | del   | ins   |
        |----------|-------|--------|--------|--------|-------|-------|-------|
        | test     |     2 |      7 |  28.57 |  12.50 |     1 |     1 |     0 |
    """

    def pct(x: float) -> str:
        return f"{100 * x:.2f}" if math.isfinite(x) else "n/a"

    header = ["set", "utts", "words", "WER %", "CER %", "sub", "del", "ins"]
    values = [
        name,
        str(report.num_utterances),
        str(report.num_ref_words),
        pct(report.wer),
        pct(report.cer),
        str(report.substitutions),
        str(report.deletions),
        str(report.insertions),
    ]
    # fixed minimum widths, so that rows printed for several sets line up under one header
    minimum = [12, 5, 6, 6, 6, 5, 5, 5]
    widths = [max(len(h), len(v), m) for h, v, m in zip(header, values, minimum)]
    head = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    row = "| " + " | ".join(
        (v.ljust(w) if i == 0 else v.rjust(w)) for i, (v, w) in enumerate(zip(values, widths))
    ) + " |"
    return "\n".join([head, rule, row])
