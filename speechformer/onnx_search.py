"""The search of :mod:`speechformer.decoding` in numpy, over the graphs of an ONNX export.

Step for step the same algorithm as the PyTorch search (so the transcripts are the same, which
``tests/test_onnx.py`` checks): *scorers* give the next-token log-probabilities of every live
hypothesis (the attention decoder, :class:`DecoderScorer`, on every token; CTC prefix scores,
:class:`CTCScorer`, a *partial* scorer, on the pre-beam candidates and the end token), each
with a weight; *logit filters* (the suppressed tokens, Whisper's timestamp grammar) act on the
decoder's scores first; a *selector* keeps the hypotheses (:class:`Greedy`, :class:`Beam`).
``decoder="ctc"`` is the CTC head alone (:func:`ctc_greedy`). The rows are ``beams``
consecutive hypotheses per utterance; every utterance's encoder outputs are computed once and
shared by its beams (the decoder graph takes them per utterance).

No torch here: numpy and the onnxruntime session the caller's ``step`` wraps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .options import DecodeOptions
from .tokenizer import DecodeRules
from .windows import Hypothesis

NEG_INF = -np.inf
#: one decoder step: tokens [N, L], caches (self_k, self_v), cross_k, cross_v, mem_lengths -> log_probs, caches
Step = Callable[[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray, np.ndarray],
                tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis; rows that are all -inf stay -inf (no NaN)."""
    top = x.max(-1, keepdims=True)
    shifted = x - np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log Σ exp over ``axis``; -inf where every term is -inf."""
    top = x.max(axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - top).sum(axis, keepdims=True)) + top).squeeze(axis)


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of each row of ``x`` [R, M] and their indices, largest first."""
    idx = np.argpartition(-x, k - 1, axis=-1)[:, :k] if k < x.shape[-1] else np.tile(np.arange(x.shape[-1]),
                                                                                     (len(x), 1))
    vals = np.take_along_axis(x, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(vals, order, -1), np.take_along_axis(idx, order, -1)


# ---------------------------------------------------------------------------- logit filters
class SuppressTokens:
    """Tokens never emitted, and more not emitted first (``decoding.SuppressTokens``)."""

    def __init__(self, always: Sequence[int], vocab_size: int, at_start: Sequence[int] = ()) -> None:
        self.always = np.zeros(vocab_size, dtype=bool)
        self.always[[i for i in always if i < vocab_size]] = True
        self.first = self.always.copy()
        self.first[[i for i in at_start if i < vocab_size]] = True

    def apply(self, logits: np.ndarray, history: np.ndarray, step: int) -> np.ndarray:
        return np.where(self.first if step == 0 else self.always, NEG_INF, logits)


class TimestampRules:
    """Whisper's timestamp grammar, as ``decoding.apply_timestamp_rules`` (see its docstring)."""

    def __init__(self, rules: DecodeRules) -> None:
        assert rules.timestamp_begin is not None, "rules without time tokens"
        self.rules = rules

    def apply(self, logits: np.ndarray, history: np.ndarray, step: int) -> np.ndarray:
        r = self.rules
        begin = r.timestamp_begin
        ids = np.arange(logits.shape[-1])
        is_time = ids >= begin
        banned = np.broadcast_to(ids == (-1 if r.no_timestamps_id is None else r.no_timestamps_id), logits.shape)
        if history.shape[1] == 0:
            return np.where(banned | ~is_time | (ids > begin + r.max_initial_timestamp), NEG_INF, logits)
        was_time = history >= begin
        last = was_time[:, -1]
        before_last = was_time[:, -2] if history.shape[1] > 1 else np.ones_like(last)
        ended = last & ~before_last
        banned = banned | ((last & before_last)[:, None] & is_time) | (ended[:, None] & (ids < r.eos_id))
        latest = np.where(was_time, history, -1).max(1)
        banned = banned | (is_time & (ids < (latest + (~ended).astype(np.int64))[:, None]))
        logits = np.where(banned, NEG_INF, logits)
        logp = log_softmax(logits)
        times_win = logsumexp(logp[:, begin:], -1) > logp[:, :begin].max(-1)
        return np.where(times_win[:, None] & ~is_time, NEG_INF, logits)


def logit_filters(rules: DecodeRules, vocab_size: int) -> list[SuppressTokens | TimestampRules]:
    """The filters ``rules`` ask for (``decoding.logit_filters``)."""
    filters: list[SuppressTokens | TimestampRules] = [SuppressTokens(rules.suppress, vocab_size,
                                                                     rules.suppress_at_start)]
    if rules.timestamp_begin is not None:
        filters.append(TimestampRules(rules))
    return filters


# ---------------------------------------------------------------------------- scorers
class DecoderScorer:
    """The decoder graph with its self-attention caches, one row per hypothesis; the
    utterances' cross-attention keys/values stay one per utterance."""

    partial, ranks = False, True

    def __init__(self, step: Step, enc: dict[str, np.ndarray], rules: DecodeRules, beams: int,
                 cache_shape: tuple[int, int, int], vocab_size: int, weight: float = 1.0) -> None:
        self.step, self.rules, self.beams, self.weight = step, rules, beams, weight
        self.cross_k, self.cross_v, self.mem_lengths = enc["cross_k"], enc["cross_v"], enc["mem_lengths"]
        rows = len(self.mem_lengths) * beams
        layers, heads, head_dim = cache_shape
        empty = np.zeros((layers, rows, heads, 0, head_dim), np.float32)
        self.cache = (empty, empty)
        self.tokens = np.tile(np.array(rules.prompt, dtype=np.int64), (rows, 1))
        self.filters = logit_filters(rules, vocab_size)
        self.no_speech: np.ndarray | None = None

    def log_probs(self, history: np.ndarray, step: int) -> np.ndarray:
        log_probs, self.cache = self.step(self.tokens, self.cache, self.cross_k, self.cross_v, self.mem_lengths)
        if step == 0 and self.rules.no_speech_id is not None:
            self.no_speech = np.exp(log_probs[::self.beams, self.rules.sot_index, self.rules.no_speech_id])
        scores = log_probs[:, -1].astype(np.float32)
        for f in self.filters:
            scores = f.apply(scores, history, step)
        return log_softmax(scores)

    def select(self, parents: np.ndarray | None, tokens: np.ndarray) -> None:
        if parents is not None:
            self.cache = (self.cache[0][:, parents], self.cache[1][:, parents])
        self.tokens = tokens[:, None]

    def keep(self, rows: np.ndarray) -> None:
        utts = rows[::self.beams] // self.beams
        self.cache = (self.cache[0][:, rows], self.cache[1][:, rows])
        self.cross_k, self.cross_v = self.cross_k[:, utts], self.cross_v[:, utts]
        self.mem_lengths, self.tokens = self.mem_lengths[utts], self.tokens[rows]


class CTCPrefixScorer:
    """CTC prefix scores of the beam hypotheses (``decoding.CTCPrefixScorer``: the forward
    variables r^n, r^b of every hypothesis over all frames at once, in float64; the time
    recursions as running log-sums, :func:`numpy.logaddexp.accumulate`)."""

    def __init__(self, log_probs: np.ndarray, lengths: np.ndarray, blank: int, beams: int) -> None:
        self.log_probs = log_probs
        b, _, _ = log_probs.shape
        self.utt = np.repeat(np.arange(b), beams)
        self.lengths = np.repeat(lengths.astype(np.int64), beams)
        blank_lp = np.maximum(log_probs[..., blank].astype(np.float64), -1e5)
        self.blank_cum = np.concatenate([np.zeros((b, 1)), blank_lp.cumsum(1)], axis=1)  # [B, T+1]
        self.r_b = self.blank_cum[self.utt]
        self.r_n = np.full_like(self.r_b, NEG_INF)
        self.last = np.full(len(self.utt), -1, dtype=np.int64)
        self.psi = np.zeros(len(self.utt))
        self._cand: np.ndarray | None = None
        self._new: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def end_scores(self) -> np.ndarray:
        """log P(labelling = g) for every hypothesis g."""
        at = self.lengths[:, None]
        return np.logaddexp(np.take_along_axis(self.r_n, at, 1), np.take_along_axis(self.r_b, at, 1))[:, 0]

    def score(self, cand: np.ndarray) -> np.ndarray:
        """log ψ(g + c) for ``cand`` [N, P] token ids per hypothesis (kept for :meth:`select`)."""
        n, p = cand.shape
        t = self.log_probs.shape[1]
        a = self.log_probs[self.utt[:, None, None], np.arange(t)[None, None, :], cand[:, :, None]]
        a = np.maximum(a.astype(np.float64), -1e5)  # [N, P, T]
        cum = np.concatenate([np.zeros((n, p, 1)), a.cumsum(2)], axis=2)
        r_n_old = np.where((cand == self.last[:, None])[:, :, None], NEG_INF, self.r_n[:, None, :t])
        phi = np.logaddexp(self.r_b[:, None, :t], r_n_old)
        r_n = cum[:, :, 1:] + np.logaddexp.accumulate(phi - cum[:, :, :t], axis=2)
        inside = np.arange(t)[None, None, :] < self.lengths[:, None, None]
        psi = logsumexp(np.where(inside, phi + a, NEG_INF), axis=2)
        pad = np.full((n, p, 1), NEG_INF)
        r_n_prev = np.concatenate([pad, r_n[:, :, :-1]], axis=2)
        bcum = self.blank_cum[self.utt][:, None, :]
        r_b = bcum[:, :, 1:] + np.logaddexp.accumulate(r_n_prev - bcum[:, :, :t], axis=2)
        self._cand = cand
        self._new = (np.concatenate([pad, r_n], 2), np.concatenate([pad, r_b], 2), psi)
        return psi

    def select(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        assert self._cand is not None and self._new is not None, "score() first"
        slot = (self._cand[rows] == tokens[:, None]).argmax(1)
        r_n, r_b, psi = self._new
        self.r_n, self.r_b, self.psi = r_n[rows, slot], r_b[rows, slot], psi[rows, slot]
        self.last, self.utt, self.lengths = tokens, self.utt[rows], self.lengths[rows]
        self._cand = self._new = None

    def keep(self, rows: np.ndarray) -> None:
        self.r_n, self.r_b, self.psi, self.last = self.r_n[rows], self.r_b[rows], self.psi[rows], self.last[rows]
        self.utt, self.lengths = self.utt[rows], self.lengths[rows]


def _log_ratio(score: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """``score - prefix`` as float32, -inf where ``score`` is -inf."""
    with np.errstate(invalid="ignore"):
        return np.where(score == NEG_INF, NEG_INF, score - prefix).astype(np.float32)


class CTCScorer:
    """CTC prefix scores as a partial scorer (``decoding.CTCScorer``)."""

    partial, ranks = True, True

    def __init__(self, enc: dict[str, np.ndarray], blank: int, beams: int, weight: float) -> None:
        self.prefix = CTCPrefixScorer(enc["ctc_log_probs"], enc["mem_lengths"], blank, beams)
        self.weight = weight

    def candidate_log_probs(self, candidates: np.ndarray, history: np.ndarray, step: int) -> np.ndarray:
        return _log_ratio(self.prefix.score(candidates), self.prefix.psi[:, None])

    def end_log_probs(self, history: np.ndarray, step: int) -> np.ndarray:
        return _log_ratio(self.prefix.end_scores(), self.prefix.psi)

    def select(self, parents: np.ndarray | None, tokens: np.ndarray) -> None:
        self.prefix.select(np.arange(len(tokens)) if parents is None else parents, tokens)

    def keep(self, rows: np.ndarray) -> None:
        self.prefix.keep(rows)


Scorer = DecoderScorer | CTCScorer


def _weigh(total: np.ndarray | None, weight: float, scores: np.ndarray) -> np.ndarray:
    """``total + weight x scores``; a zero weight keeps only the scorer's vetoes (-inf)."""
    if weight == 0.0:
        term = np.where(scores == NEG_INF, NEG_INF, 0.0).astype(np.float32)
    else:
        term = scores if weight == 1.0 else np.float32(weight) * scores
    return term if total is None else total + term


def pre_beam_size(options: DecodeOptions, vocab_size: int, scorers: Sequence[Scorer]) -> int:
    """Tokens per hypothesis the partial scorers score (``decoding.pre_beam_size``)."""
    if all(s.weight == 0 for s in scorers if not s.partial and s.ranks):
        return vocab_size
    return min(vocab_size, options.ctc_candidates or max(2, int(1.5 * options.beam_size)))


def step_log_probs(scorers: Sequence[Scorer], history: np.ndarray, step: int, pre_beam: int, eos: int
                   ) -> np.ndarray:
    """The weighted next-token scores [N, V] (``decoding.step_log_probs``)."""
    total = None
    for s in scorers:
        if not s.partial:
            total = _weigh(total, s.weight, s.log_probs(history, step))  # type: ignore[union-attr]
    assert total is not None, "the search needs the decoder"
    partial = [s for s in scorers if s.partial]
    if not partial:
        return total
    vocab = total.shape[-1]
    if pre_beam >= vocab:
        ids = np.tile(np.delete(np.arange(vocab), eos), (len(total), 1))
    else:
        ids = topk(np.where(np.arange(vocab) == eos, NEG_INF, total), pre_beam)[1]
    cand = end = None
    for s in partial:
        cand = _weigh(cand, s.weight, s.candidate_log_probs(ids, history, step))  # type: ignore[union-attr]
        end = _weigh(end, s.weight, s.end_log_probs(history, step))  # type: ignore[union-attr]
    scores = np.full_like(total, NEG_INF)
    np.put_along_axis(scores, ids, cand, 1)
    scores[:, eos] = end
    return total + scores


# ---------------------------------------------------------------------------- selectors
class Greedy:
    """The beam of one (``decoding._Greedy``): the best next token, the end token included."""

    def __init__(self, b: int, eos: int, limits: np.ndarray, max_len: int) -> None:
        self.eos, self.limits = eos, limits
        self.out = np.full((b, max_len), eos, dtype=np.int64)
        self.logprob = np.zeros(b, dtype=np.float32)
        self.rows = np.arange(b)
        self.finished = np.zeros(b, dtype=bool)
        self.steps = self.n_done = 0

    @property
    def history(self) -> np.ndarray:
        return self.out[self.rows, :self.steps]

    def advance(self, scores: np.ndarray, step: int) -> tuple[np.ndarray | None, np.ndarray]:
        nxt = scores.argmax(-1)
        self.logprob[self.rows] += np.where(self.finished, 0.0, scores[np.arange(len(nxt)), nxt]).astype(np.float32)
        nxt = np.where(self.finished, self.eos, nxt)
        self.out[self.rows, step] = nxt
        self.finished |= (nxt == self.eos) | (step + 1 >= self.limits[self.rows])
        self.steps, self.n_done = step + 1, int(self.finished.sum())
        return None, nxt

    def all_done(self) -> bool:
        return self.n_done == len(self.rows)

    def compact(self) -> np.ndarray | None:
        """Finished rows leave the batch (with their caches) once they are a quarter of it."""
        if self.n_done * 4 < len(self.rows):
            return None
        keep = np.flatnonzero(~self.finished)
        self.rows, self.finished = self.rows[keep], self.finished[keep]
        return keep

    def results(self) -> list[tuple[list[int], float]]:
        return [(_strip(row, self.eos), float(lp)) for row, lp in zip(self.out.tolist(), self.logprob)]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


class Beam:
    """K hypotheses per utterance (``decoding._Beam``: the same closing, stopping and
    length-normalisation rules, in float32 as there)."""

    def __init__(self, b: int, k: int, eos: int, length_penalty: float, limits: np.ndarray) -> None:
        self.k, self.eos, self.length_penalty, self.limits = k, eos, length_penalty, limits
        self.scores = np.zeros((b, k), dtype=np.float32)
        self.scores[:, 1:] = NEG_INF
        self.history = np.zeros((b * k, 0), dtype=np.int64)
        self.best_score = np.full(b, NEG_INF, dtype=np.float32)
        self.best_raw = np.zeros(b, dtype=np.float32)
        self.n_finished = np.zeros(b, dtype=np.int64)
        self.done = np.zeros(b, dtype=bool)
        self.utts = list(range(b))
        self.best_tokens: dict[int, list[int]] = {}
        self.final: dict[int, tuple[list[int], float]] = {}
        self.n_done = 0

    def advance(self, scores: np.ndarray, step: int) -> tuple[np.ndarray | None, np.ndarray]:
        b, k = self.scores.shape
        norm = np.float32((step + 1) ** self.length_penalty)
        cand = self.scores[..., None] + scores.reshape(b, k, -1)
        self._close(cand[..., self.eos] / norm, norm)
        cand[..., self.eos] = NEG_INF
        top, idx = topk(cand.reshape(b, -1), k)
        vocab = cand.shape[-1]
        parents = (np.arange(b)[:, None] * k + idx // vocab).reshape(-1)
        tokens = (idx % vocab).reshape(-1)
        self.history = np.concatenate([self.history[parents], tokens[:, None]], axis=1)
        best_alive = top.max(-1) / norm
        was_done = self.done
        self.done = was_done | ((self.n_finished >= k) & (best_alive < self.best_score)) \
            | ~np.isfinite(top).any(-1) | (step + 1 >= self.limits)
        for i in np.flatnonzero(self.done & ~was_done & (self.n_finished == 0)).tolist():
            self.final[self.utts[i]] = (self.history[i * k].tolist(), float(top[i, 0]))
        self.scores = np.where(self.done[:, None], NEG_INF, top).astype(np.float32)
        self.n_done = int(self.done.sum())
        return parents, tokens

    def _close(self, eos_scores: np.ndarray, norm: np.float32) -> None:
        eos_scores = np.where(self.done[:, None], NEG_INF, eos_scores)
        self.n_finished += np.isfinite(eos_scores).sum(-1)
        top_beam = eos_scores.argmax(-1)
        top_eos = eos_scores[np.arange(len(top_beam)), top_beam]
        improved = top_eos > self.best_score
        hist = self.history.reshape(len(self.utts), self.k, -1)
        for i in np.flatnonzero(improved).tolist():
            self.best_tokens[self.utts[i]] = hist[i, top_beam[i]].tolist()
        self.best_score = np.where(improved, top_eos, self.best_score).astype(np.float32)
        self.best_raw = np.where(improved, top_eos * norm, self.best_raw).astype(np.float32)

    def all_done(self) -> bool:
        return self.n_done == len(self.utts)

    def compact(self) -> np.ndarray | None:
        """Done utterances leave (all their beams) once they are a quarter of those left."""
        if self.n_done * 4 < len(self.utts) or self.n_done == 0:
            return None
        self._flush(np.flatnonzero(self.done).tolist())
        keep = np.flatnonzero(~self.done)
        rows = (keep[:, None] * self.k + np.arange(self.k)).reshape(-1)
        self.utts = [self.utts[i] for i in keep.tolist()]
        self.scores, self.history = self.scores[keep], self.history[rows]
        self.best_score, self.best_raw = self.best_score[keep], self.best_raw[keep]
        self.n_finished, self.done, self.limits, self.n_done = self.n_finished[keep], self.done[keep], \
            self.limits[keep], 0
        return rows

    def _flush(self, idx: list[int]) -> None:
        for i in idx:
            u = self.utts[i]
            if u in self.best_tokens:
                self.final[u] = (self.best_tokens[u], float(self.best_raw[i]))
            elif u not in self.final:
                self.final[u] = (self.history[i * self.k].tolist(), float(self.scores[i, 0]))

    def results(self) -> list[tuple[list[int], float]]:
        self._flush(list(range(len(self.utts))))
        return [self.final[u] for u in range(len(self.final))]


# ---------------------------------------------------------------------------- the search
def decode_limits(mem_lengths: np.ndarray, options: DecodeOptions, prompt_len: int, positions: int) -> np.ndarray:
    """Tokens allowed per utterance (``decoding.decode_limits``: float32 as there)."""
    cap = positions - prompt_len
    if options.max_len > 0:
        cap = min(cap, options.max_len)
    allowed = (mem_lengths.astype(np.float32) * np.float32(options.max_len_ratio)).astype(np.int64) + 2
    return np.clip(allowed, 1, max(1, cap))


def search(step: Step, enc: dict[str, np.ndarray], options: DecodeOptions, rules: DecodeRules,
           cache_shape: tuple[int, int, int], vocab_size: int, positions: int, blank: int) -> list[Hypothesis]:
    """Beam search (greedy for beam 1) of the attention decoder, with CTC prefix scores for
    ``decoder="joint"`` (``decoding.search``)."""
    b, k = len(enc["mem_lengths"]), options.beam_size
    limits = decode_limits(enc["mem_lengths"], options, len(rules.prompt), positions)
    max_len = int(limits.max())
    w = options.ctc_weight if options.decoder == "joint" else 0.0
    scorers: list[Scorer] = [DecoderScorer(step, enc, rules, k, cache_shape, vocab_size, weight=1.0 - w)]
    if w > 0:
        scorers.append(CTCScorer(enc, blank, k, w))
    selector: Greedy | Beam = (Greedy(b, rules.eos_id, limits, max_len) if k == 1
                               else Beam(b, k, rules.eos_id, options.length_penalty, limits))
    pre_beam = pre_beam_size(options, vocab_size, scorers)
    for t in range(max_len):
        parents, tokens = selector.advance(step_log_probs(scorers, selector.history, t, pre_beam, rules.eos_id), t)
        if selector.all_done() or t == max_len - 1:
            break
        for s in scorers:
            s.select(parents, tokens)
        rows = selector.compact()
        if rows is not None:
            for s in scorers:
                s.keep(rows)
    no_speech = scorers[0].no_speech  # type: ignore[union-attr]
    ns = no_speech.tolist() if no_speech is not None else [None] * b
    return [Hypothesis(tokens, logprob, n) for (tokens, logprob), n in zip(selector.results(), ns)]


def ctc_greedy(log_probs: np.ndarray, lengths: np.ndarray, blank: int) -> list[Hypothesis]:
    """The CTC head alone (``decoding.ctc_greedy_decode``): the best label per frame, repeats
    collapsed, blanks dropped."""
    out = []
    for row, n in zip(log_probs, lengths.tolist()):
        ids = row[:n].argmax(-1)
        keep = np.ones(len(ids), dtype=bool)
        keep[1:] = ids[1:] != ids[:-1]
        keep &= ids != blank
        out.append(Hypothesis(ids[keep].tolist(), float(row[:n].max(-1).sum())))
    return out
