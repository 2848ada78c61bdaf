"""Turning encoder memory into token sequences: one batched search over *scorers*, and CTC
greedy decoding.

The search (:func:`search`) advances every hypothesis of every utterance of a batch together,
one token per step, with each decoder layer's keys/values in preallocated caches (so step t
costs one token, not t), and never loops forever: the number of steps is capped by a maximum
tied to the input length (a transcript cannot have more tokens than the encoder has frames) and
by the model's position table. It is made of three kinds of parts:

* **scorers** (:class:`Scorer`) give, for every live hypothesis, the log-probabilities of its
  next token, each with a weight. *Full* scorers score the whole vocabulary: the attention
  decoder (:class:`DecoderScorer`), a language model (:class:`LMScorer`). *Partial* scorers
  score only the pre-beam candidates, the best ``ctc_candidates`` tokens of the full scorers,
  and the end token: CTC prefix scores (:class:`CTCScorer`), too costly for every token. A
  hypothesis's score is the weighted sum of its scorers' log-probabilities.
* **logit filters** (:class:`LogitFilter`) change the decoder's logits before they become
  log-probabilities: the tokens a model must never emit, or not first (:class:`SuppressTokens`),
  and Whisper's timestamp grammar (:class:`TimestampRules`). :func:`logit_filters` builds them
  from the tokenizer's :class:`~speechformer.tokenizer.DecodeRules` (speechformer's own models:
  ``<s>`` then anything but ``<blank>``/``<s>``; Whisper: its start-of-transcript prompt,
  suppressed non-speech tokens, no blank first token, and the no-speech probability).
* a **selector** keeps the hypotheses: the beam of one (greedy: the best next token, the end
  token included, so a hypothesis ends when ending is its best move) or a beam of K (every
  beam's end extension closes a finished hypothesis scored ``score / length ** length_penalty``,
  the best K other extensions stay alive).

Three decoders (``DecodeOptions.decoder``), all but CTC the same search with other scorers:

* ``attention``: the decoder alone (greedy for beam 1, beam search otherwise);
* ``ctc``: the CTC head alone, greedy (best label per frame, repeats collapsed, blanks dropped):
  no decoder pass at all, the fastest;
* ``joint``: the decoder with weight ``1 - w`` plus CTC prefix scores with weight ``w =
  ctc_weight``: a hypothesis h scores ``(1 - w) log p_att(h) + w log p_ctc(h...)``, where the CTC
  part is the *prefix* probability of h (:class:`CTCPrefixScorer`, Watanabe et al. 2017). CTC's
  monotonic alignment vetoes hypotheses the audio cannot support (dropped or repeated words,
  loops, early ends) that the decoder alone may like.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from .model import SpeechTransformer
from .options import DecodeOptions
from .tokenizer import DecodeRules
from .windows import Hypothesis

NEG_INF = float("-inf")


def default_rules(model: SpeechTransformer) -> DecodeRules:
    """speechformer's own layout: start with ``<s>``, never emit ``<blank>`` or ``<s>``."""
    c = model.config
    return DecodeRules(prompt=[c.bos_id], eos_id=c.eos_id, suppress=[c.blank_id, c.bos_id])


# ---------------------------------------------------------------------------- logit filters
class LogitFilter:
    """A rule on the decoder's next-token logits, applied before they become log-probabilities
    (openai-whisper's ``LogitFilter``): :meth:`apply` gets ``logits`` [N, V] (float32) of N
    hypotheses, ``history`` [N, step] the tokens each has emitted (no prompt), and returns the
    logits with the forbidden tokens at -inf."""

    def apply(self, logits: Tensor, history: Tensor, step: int) -> Tensor:
        raise NotImplementedError


class SuppressTokens(LogitFilter):
    """Tokens never emitted (``always``: speechformer's ``<blank>`` and ``<s>``, Whisper's
    non-speech tokens) and more that are not emitted first (``at_start``: Whisper's bare space
    and end-of-text). Precomputed masks: one op per step."""

    def __init__(self, always: Sequence[int], vocab_size: int, device: torch.device | str = "cpu",
                 at_start: Sequence[int] = ()) -> None:
        self.always = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.always[[i for i in always if i < vocab_size]] = True
        self.first = self.always.clone()
        self.first[[i for i in at_start if i < vocab_size]] = True

    def apply(self, logits: Tensor, history: Tensor, step: int) -> Tensor:
        return logits.masked_fill(self.first if step == 0 else self.always, NEG_INF)


class TimestampRules(LogitFilter):
    """Whisper's timestamp grammar (:func:`apply_timestamp_rules`; ``<|notimestamps|>`` banned)."""

    def __init__(self, rules: DecodeRules) -> None:
        if rules.timestamp_begin is None:
            raise ValueError("timestamp rules need rules with time tokens (tokenizer.rules(timestamps=True))")
        self.rules = rules

    def apply(self, logits: Tensor, history: Tensor, step: int) -> Tensor:
        return apply_timestamp_rules(logits, history, self.rules)


def logit_filters(rules: DecodeRules, vocab_size: int, device: torch.device | str = "cpu") -> list[LogitFilter]:
    """The filters ``rules`` ask for: the suppressed tokens, and the timestamp rules when the rules
    have time tokens. :mod:`speechformer.explain` shows the probabilities through the same ones."""
    filters: list[LogitFilter] = [SuppressTokens(rules.suppress, vocab_size, device, rules.suppress_at_start)]
    if rules.timestamp_begin is not None:
        filters.append(TimestampRules(rules))
    return filters


def apply_filters(filters: Sequence[LogitFilter], logits: Tensor, history: Tensor, step: int) -> Tensor:
    """``logits`` [N, V] in float32 through every filter, in order."""
    logits = logits.float()
    for f in filters:
        logits = f.apply(logits, history, step)
    return logits


def apply_timestamp_rules(logits: Tensor, history: Tensor, rules: DecodeRules) -> Tensor:
    """Whisper's timestamp grammar on next-token ``logits`` [N, V], given each row's emitted
    tokens ``history`` [N, t] (no prompt). A transcript then reads
    ``<|t0|> text <|t1|><|t2|> text <|t3|>``: each segment of text between its start and end time.

    * ``<|notimestamps|>`` is never emitted;
    * the first token is a time, at most ``max_initial_timestamp`` steps in;
    * after a start time (a lone time, or the second of a pair) comes text (or the end); after an
      end time (a time after text) comes the next start time or the end, not text;
    * times never go back, and a segment's end is later than its start;
    * where the time tokens together are more likely than the most likely other token, a time
      is emitted (their probability is spread over many neighbouring times, and greedy
      decoding would otherwise never pick one).

    The rules of openai-whisper's ``ApplyTimestampRules``, for the whole batch at once.
    """
    begin = rules.timestamp_begin
    assert begin is not None, "rules without timestamp_begin"
    ids = torch.arange(logits.shape[-1], device=logits.device)
    is_time = ids >= begin  # [V]
    no_timestamps = -1 if rules.no_timestamps_id is None else rules.no_timestamps_id
    banned = (ids == no_timestamps)[None].expand_as(logits)
    if history.shape[1] == 0:
        first = ~is_time | (ids > begin + rules.max_initial_timestamp)
        return logits.masked_fill(banned | first, float("-inf"))
    was_time = history >= begin
    last = was_time[:, -1]
    before_last = was_time[:, -2] if history.shape[1] > 1 else torch.ones_like(last)
    ended = last & ~before_last  # a time right after text: that segment's end
    banned = banned | ((last & before_last)[:, None] & is_time)  # a start time: text comes next
    banned = banned | (ended[:, None] & (ids < rules.eos_id))  # an end time: a start time or the end
    # never back in time; a segment's end strictly after its start (no empty loops)
    latest = torch.where(was_time, history, -1).amax(1)
    floor = latest + (~ended).long()
    banned = banned | (is_time & (ids < floor[:, None]))
    logits = logits.masked_fill(banned, float("-inf"))
    logp = logits.float().log_softmax(-1)
    times_win = logp[:, begin:].logsumexp(-1) > logp[:, :begin].max(-1).values
    return logits.masked_fill(times_win[:, None] & ~is_time, float("-inf"))


def decode_limits(model: SpeechTransformer, mem_lengths: Tensor, options: DecodeOptions,
                  prompt_len: int = 1) -> Tensor:
    """Tokens allowed per utterance: tied to its input length, bounded by the position table
    (so an utterance decodes the same alone or in any batch)."""
    cap = model.config.max_target_positions - prompt_len
    if options.max_len > 0:
        cap = min(cap, options.max_len)
    return (mem_lengths * options.max_len_ratio).long().add(2).clamp(1, max(1, cap))


def _no_speech(logits: Tensor, rules: DecodeRules) -> Tensor | None:
    if rules.no_speech_id is None:
        return None
    return logits[:, rules.sot_index].float().softmax(-1)[:, rules.no_speech_id]


# ---------------------------------------------------------------------------- scorers
class Scorer:
    """One source of next-token scores in :func:`search` (ESPnet's scorer interface, batched).

    The search's rows are its live hypotheses, ``beams`` consecutive rows per utterance. At each
    step it asks a *full* scorer for :meth:`log_probs` over the whole vocabulary, a *partial*
    scorer (``partial = True``) for :meth:`candidate_log_probs` of the pre-beam candidates and
    :meth:`end_log_probs` of ending; then it calls :meth:`select` with the hypotheses it keeps,
    and :meth:`keep` when it drops the rows of finished utterances. The values are
    log-probabilities of the *next* token given each hypothesis (-inf: forbidden); the search
    sums them over steps and scorers, each scorer's multiplied by its ``weight``.
    """

    weight: float = 1.0
    partial: bool = False
    ranks: bool = True  # full scorers: its scores tell tokens apart (a length bonus does not)

    def log_probs(self, history: Tensor, step: int) -> Tensor:
        """Full scorers: [N, V] for the N live hypotheses (``history`` [N, step] their tokens)."""
        raise NotImplementedError

    def candidate_log_probs(self, candidates: Tensor, history: Tensor, step: int) -> Tensor:
        """Partial scorers: [N, P] for ``candidates`` [N, P] token ids (never the end token)."""
        raise NotImplementedError

    def end_log_probs(self, history: Tensor, step: int) -> Tensor:
        """Partial scorers: [N], the log-probability that each hypothesis ends here."""
        raise NotImplementedError

    def select(self, parents: Tensor | None, tokens: Tensor) -> None:
        """Row i now extends old row ``parents[i]`` (a row of the same utterance; ``None``: row i
        itself) by ``tokens[i]``."""
        raise NotImplementedError

    def keep(self, rows: Tensor) -> None:
        """Only ``rows`` (every beam of the utterances still searched, in order) go on."""
        raise NotImplementedError


class DecoderScorer(Scorer):
    """The attention decoder: the prompt, then each chosen token, through the model's cached
    decoder; its logits through the :class:`LogitFilter` s, then log-softmax. The memory's
    keys/values are projected and stored once per utterance, shared by its ``beams`` rows; each
    row has its own self-attention cache, reordered to follow its parent."""

    def __init__(self, model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor, rules: DecodeRules,
                 beams: int, max_len: int, weight: float = 1.0) -> None:
        self.model, self.memory, self.rules, self.beams, self.weight = model, memory, rules, beams, weight
        self.mask = model.memory_mask(mem_lengths, memory.shape[1])  # one row per utterance, as the memory
        self.state = model.init_state(memory, len(rules.prompt) + max_len, repeat=beams)
        self.filters = logit_filters(rules, model.config.vocab_size, memory.device)
        prompt = torch.tensor(rules.prompt, dtype=torch.long, device=memory.device)
        self.tokens = prompt.expand(memory.shape[0] * beams, -1)  # what the next decoder call reads
        self.no_speech: Tensor | None = None  # Whisper: P(<|nospeech|>) per utterance, from the first step

    def log_probs(self, history: Tensor, step: int) -> Tensor:
        logits = self.model.decode(self.tokens, self.memory, self.mask, self.state)
        if step == 0:
            self.no_speech = _no_speech(logits[::self.beams], self.rules)
        return apply_filters(self.filters, logits[:, -1], history, step).log_softmax(-1)

    def select(self, parents: Tensor | None, tokens: Tensor) -> None:
        if parents is not None:
            self.state.reorder(parents, cross=False)  # parents are beams of the same utterance
        self.tokens = tokens[:, None]

    def keep(self, rows: Tensor) -> None:
        utts = rows[::self.beams] // self.beams
        for cache in self.state.self_caches:
            cache.reorder(rows)
        for cache in self.state.cross_caches:
            cache.reorder(utts)
        self.memory, self.tokens = self.memory[utts], self.tokens[rows]
        self.mask = self.mask[utts] if self.mask is not None else None


class CTCScorer(Scorer):
    """CTC prefix scores as a partial scorer: extending h by c has log-probability
    log ψ(h + c) - log ψ(h), ending h log P(labelling = h) - log ψ(h) (:class:`CTCPrefixScorer`;
    the differences in float64, so the sums over steps give the prefix scores back)."""

    partial = True

    def __init__(self, model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor, beams: int,
                 weight: float) -> None:
        self.prefix = CTCPrefixScorer(model.ctc_log_probs(memory), mem_lengths, model.config.blank_id, beams)
        self.weight = weight

    def candidate_log_probs(self, candidates: Tensor, history: Tensor, step: int) -> Tensor:
        return _log_ratio(self.prefix.score(candidates), self.prefix.psi[:, None])

    def end_log_probs(self, history: Tensor, step: int) -> Tensor:
        return _log_ratio(self.prefix.end_scores(), self.prefix.psi)

    def select(self, parents: Tensor | None, tokens: Tensor) -> None:
        self.prefix.select(torch.arange(len(tokens), device=tokens.device) if parents is None else parents, tokens)

    def keep(self, rows: Tensor) -> None:
        self.prefix.keep(rows)


def _log_ratio(score: Tensor, prefix: Tensor) -> Tensor:
    """``score - prefix`` as float32, -inf where ``score`` is -inf (no NaN from -inf - -inf)."""
    return torch.where(score == NEG_INF, NEG_INF, score - prefix).float()


class LanguageModel(Protocol):
    """What :class:`LMScorer` needs of a language model over the decoder's token ids: ``step``
    reads tokens (the prompt [N, L] first, then the new token of each row [N]) with its cache
    (``None`` at first) and returns next-token log-probabilities [N, V] and the cache, whose ``reorder(index)``
    makes row i old row ``index[i]`` (fewer rows when finished utterances are dropped)."""

    def step(self, tokens: Tensor, cache: Any) -> tuple[Tensor, Any]: ...


class LMScorer(Scorer):
    """A language model as a full scorer (shallow fusion): ``weight x log p_lm`` joins the
    decoder's score. ``rows`` is the search's utterances x beams; ``prompt`` the LM's first tokens."""

    def __init__(self, lm: LanguageModel, rows: int, prompt: Sequence[int], weight: float,
                 device: torch.device | str = "cpu") -> None:
        self.lm, self.weight, self.cache = lm, weight, None
        self.tokens = torch.tensor(list(prompt), dtype=torch.long, device=device).expand(rows, -1)

    def log_probs(self, history: Tensor, step: int) -> Tensor:
        log_probs, self.cache = self.lm.step(self.tokens, self.cache)
        return log_probs.float()

    def select(self, parents: Tensor | None, tokens: Tensor) -> None:
        if parents is not None:
            self.cache.reorder(parents)
        self.tokens = tokens  # [N]: one new token per row (speechformer.lm.LanguageModel.step)

    def keep(self, rows: Tensor) -> None:
        self.cache.reorder(rows)
        self.tokens = self.tokens[rows]


class LengthBonus(Scorer):
    """A score of 1 for every token but the end, weighted by the bonus: shallow fusion's length
    reward, which offsets a language model's preference for short transcripts. It does not rank
    the pre-beam candidates (:func:`pre_beam_size`): all its tokens but the end score alike."""

    ranks = False

    def __init__(self, vocab_size: int, eos_id: int, bonus: float, device: torch.device | str = "cpu") -> None:
        self.weight = bonus
        self.row = torch.ones(vocab_size, device=device)
        self.row[eos_id] = 0.0

    def log_probs(self, history: Tensor, step: int) -> Tensor:
        return self.row.expand(history.shape[0], -1)

    def select(self, parents: Tensor | None, tokens: Tensor) -> None:
        pass

    def keep(self, rows: Tensor) -> None:
        pass


def default_scorers(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor, options: DecodeOptions,
                    rules: DecodeRules, max_len: int) -> list[Scorer]:
    """The scorers of ``options.decoder``: ``attention``, the decoder alone; ``joint``, the decoder
    with weight ``1 - ctc_weight`` and CTC prefix scores with weight ``ctc_weight`` (left out at 0)."""
    if options.decoder not in ("attention", "joint"):
        raise ValueError(f"the search decodes with the attention decoder, not {options.decoder!r}")
    k = options.beam_size
    w = options.ctc_weight if options.decoder == "joint" else 0.0
    ctc = CTCScorer(model, memory, mem_lengths, k, w) if options.decoder == "joint" else None  # needs a CTC head
    decoder = DecoderScorer(model, memory, mem_lengths, rules, k, max_len, weight=1.0 - w)
    return [decoder] + ([ctc] if ctc is not None and w > 0 else [])


def _weigh(total: Tensor | None, weight: float, scores: Tensor) -> Tensor:
    """``total + weight x scores``; a zero weight keeps only the scorer's vetoes (-inf)."""
    if weight == 0.0:
        term = torch.where(scores == NEG_INF, NEG_INF, 0.0)
    else:
        term = scores if weight == 1.0 else weight * scores
    return term if total is None else total + term


def pre_beam_size(options: DecodeOptions, vocab_size: int, scorers: Sequence[Scorer]) -> int:
    """How many tokens per hypothesis the partial scorers score: ``ctc_candidates`` (0: 1.5 x the
    beam, at least 2), or every token when the full scorers have no weight to rank them by."""
    if all(s.weight == 0 for s in scorers if not s.partial and s.ranks):
        return vocab_size
    return min(vocab_size, options.ctc_candidates or max(2, int(1.5 * options.beam_size)))


def step_log_probs(scorers: Sequence[Scorer], history: Tensor, step: int, pre_beam: int, eos: int) -> Tensor:
    """The weighted next-token scores [N, V] of every live hypothesis: the full scorers' on every
    token; the partial scorers' on the ``pre_beam`` best other tokens by the full scorers, and on
    the end token; the tokens the partial scorers did not score are -inf."""
    total = None
    for s in scorers:
        if not s.partial:
            total = _weigh(total, s.weight, s.log_probs(history, step))
    assert total is not None, "the search needs a full scorer (the decoder)"
    partial = [s for s in scorers if s.partial]
    if not partial:
        return total
    vocab = torch.arange(total.shape[-1], device=total.device)
    if pre_beam >= total.shape[-1]:
        ids = vocab[vocab != eos].expand(total.shape[0], -1)
    else:
        ids = total.masked_fill(vocab == eos, NEG_INF).topk(pre_beam, -1)[1]
    cand = end = None
    for s in partial:
        cand = _weigh(cand, s.weight, s.candidate_log_probs(ids, history, step))
        end = _weigh(end, s.weight, s.end_log_probs(history, step))
    scores = torch.full_like(total, NEG_INF).scatter_(1, ids, cand)
    scores[:, eos] = end
    return total + scores


class CTCPrefixScorer:
    """CTC prefix scores of beam hypotheses, vectorised over beams, candidates and time.

    The prefix score of h is log ψ(h) = log P(the CTC labelling starts with h | audio); the
    score of a *finished* h is log P(labelling = h). For every hypothesis g the scorer keeps
    the forward variables r^n_t(g), r^b_t(g): the probability that frames 0..t emit g and end
    in a label (n) or a blank (b). Extending g by c (Watanabe et al. 2017, Algorithm 2; ESPnet's
    ``CTCPrefixScore``)::

        φ_t      = r^b_{t-1}(g) + (r^n_{t-1}(g) if c != last(g) else 0)
        r^n_t(h) = (r^n_{t-1}(h) + φ_t) x_t(c)
        r^b_t(h) = (r^b_{t-1}(h) + r^n_{t-1}(h)) x_t(blank)
        ψ(h)     = Σ_t φ_t x_t(c)

    The time loop is not written out: both recursions are first-order linear, so in log
    space ``log r^n_t(h) = C_t + logcumsumexp_{s<=t}(log φ_s - C_{s-1})`` with C the running
    sum of log x(c), and likewise for r^b with the blank's running sum. Every frame of every
    candidate is computed at once (float64, so the differences of running sums keep their
    precision). Time index 0 of the state is "before the first frame", where the empty
    prefix has probability 1.
    """

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank: int, beams: int = 1,
                 max_elements: int = 1 << 24) -> None:
        """``log_probs`` [B, T, V] and ``lengths`` [B] of B utterances, each with ``beams``
        consecutive hypotheses (rows), all starting empty."""
        self.log_probs = log_probs  # kept as is: only the candidates' columns are read
        b, t, _ = log_probs.shape
        self.utt = torch.arange(b, device=log_probs.device).repeat_interleave(beams)  # utterance of each row
        self.lengths = lengths.to(log_probs.device).repeat_interleave(beams)  # [N]
        blank_lp = log_probs[..., blank].double().clamp(min=-1e5)
        # running sum of the blank's log-probabilities, with 0 for "before the first frame"
        blank_cum = torch.cat([blank_lp.new_zeros(b, 1), blank_lp.cumsum(1)], dim=1)  # [B, T+1]
        self.blank_cum = blank_cum
        self.r_b = blank_cum[self.utt]  # the empty prefix: blanks only
        self.r_n = torch.full_like(self.r_b, float("-inf"))
        self.last = torch.full((len(self.utt),), -1, dtype=torch.long, device=log_probs.device)
        self.psi = blank_cum.new_zeros(len(self.utt))  # log ψ of each hypothesis (the empty prefix: 0)
        self.max_elements = max_elements
        self._cand: Tensor | None = None
        self._new: tuple[Tensor, Tensor, Tensor] | None = None

    def end_scores(self) -> Tensor:
        """log P(labelling = g) for every hypothesis g: [N] (its score with the end token)."""
        at = self.lengths[:, None]
        return torch.logaddexp(self.r_n.gather(1, at), self.r_b.gather(1, at))[:, 0]

    def score(self, candidates: Tensor) -> Tensor:
        """log ψ(g + c) for ``candidates`` [N, P] token ids per hypothesis -> [N, P].
        The new forward variables are kept for :meth:`select`."""
        self._cand = candidates
        n, p = candidates.shape
        t = self.log_probs.shape[1]
        chunk = max(1, self.max_elements // max(1, n * t))
        psis, r_ns, r_bs = [], [], []
        for start in range(0, p, chunk):
            psi, r_n, r_b = self._score(candidates[:, start:start + chunk])
            psis.append(psi)
            r_ns.append(r_n)
            r_bs.append(r_b)
        psi = torch.cat(psis, 1)
        self._new = (torch.cat(r_ns, 1), torch.cat(r_bs, 1), psi)
        return psi

    def _score(self, cand: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, p = cand.shape
        t = self.log_probs.shape[1]
        frames = torch.arange(t, device=cand.device)
        a = self.log_probs[self.utt[:, None, None], frames[None, None, :], cand[:, :, None]]  # log x_t(c): [N, P, T]
        a = a.double().clamp(min=-1e5)  # float64: differences of long running sums stay exact
        zeros = a.new_zeros(n, p, 1)
        cum = torch.cat([zeros, a.cumsum(2)], dim=2)  # C_{t} at index t+1, C_{-1} = 0 at index 0
        same = (cand == self.last[:, None])[:, :, None]
        phi = torch.logaddexp(self.r_b[:, None, :t],
                              self.r_n[:, None, :t].expand(n, p, t).masked_fill(same, float("-inf")))
        r_n = cum[:, :, 1:] + torch.logcumsumexp(phi - cum[:, :, :t], dim=2)  # [N, P, T]
        inside = torch.arange(t, device=a.device)[None, None, :] < self.lengths[:, None, None]
        psi = torch.logsumexp((phi + a).masked_fill(~inside, float("-inf")), dim=2)
        # r^b_t(h) sums r^n_{s-1}(h) x_s..x_t(blank) over s <= t (r^n_{-1}(h) = 0)
        r_n_prev = torch.cat([zeros.fill_(float("-inf")), r_n[:, :, :-1]], dim=2)
        bcum = self.blank_cum[self.utt][:, None, :]
        r_b = bcum[:, :, 1:] + torch.logcumsumexp(r_n_prev - bcum[:, :, :t], dim=2)
        pad = zeros.fill_(float("-inf"))  # nothing non-empty has been emitted before the first frame
        return psi, torch.cat([pad, r_n], 2), torch.cat([pad, r_b], 2)

    def select(self, rows: Tensor, tokens: Tensor) -> None:
        """The new hypotheses: row i extends old row ``rows[i]`` by ``tokens[i]``, one of the
        candidates last scored for that row."""
        assert self._cand is not None and self._new is not None, "score() first"
        slot = (self._cand[rows] == tokens[:, None]).int().argmax(1)
        r_n, r_b, psi = self._new
        self.r_n, self.r_b, self.psi = r_n[rows, slot], r_b[rows, slot], psi[rows, slot]
        self.last = tokens
        self.utt, self.lengths = self.utt[rows], self.lengths[rows]
        self._cand = self._new = None

    def keep(self, rows: Tensor) -> None:
        """Only the hypotheses ``rows`` go on (the others' utterances are done)."""
        self.r_n, self.r_b, self.psi, self.last = self.r_n[rows], self.r_b[rows], self.psi[rows], self.last[rows]
        self.utt, self.lengths = self.utt[rows], self.lengths[rows]


@torch.inference_mode()
def ctc_greedy_decode(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor) -> list[Hypothesis]:
    """The CTC head alone: the most likely label of every frame, repeats collapsed, blanks
    dropped. ``logprob`` is that best path's log-probability (not the labelling's)."""
    log_probs = model.ctc_log_probs(memory)
    best, ids = log_probs.max(-1)  # [B, T]
    blank = model.config.blank_id
    out = []
    for row, n in enumerate(mem_lengths.tolist()):
        path = ids[row, :n]
        keep = torch.ones_like(path, dtype=torch.bool)
        keep[1:] = path[1:] != path[:-1]
        keep &= path != blank
        out.append(Hypothesis(path[keep].tolist(), float(best[row, :n].sum())))
    return out


# ---------------------------------------------------------------------------- selectors
class _Greedy:
    """The beam of one: each hypothesis takes its best next token, the end token included (so it
    ends when ending is its best move). Finished rows emit the end token until they are dropped."""

    def __init__(self, b: int, eos: int, limits: Tensor, max_len: int) -> None:
        device = limits.device
        self.eos, self.limits = eos, limits
        self.out = torch.full((b, max_len), eos, dtype=torch.long, device=device)
        self.logprob = torch.zeros(b, device=device)
        self.rows = torch.arange(b, device=device)  # the original utterance of each row still searched
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.steps = self.n_done = 0

    @property
    def history(self) -> Tensor:
        return self.out[self.rows, :self.steps]

    def advance(self, scores: Tensor, step: int) -> tuple[Tensor | None, Tensor]:
        nxt = scores.argmax(-1)
        self.logprob[self.rows] += torch.where(self.finished, 0.0, scores.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(self.finished, self.eos, nxt)
        self.out[self.rows, step] = nxt
        self.finished |= (nxt == self.eos) | (step + 1 >= self.limits[self.rows])
        self.steps = step + 1
        self.n_done = int(self.finished.sum())
        return None, nxt

    def all_done(self) -> bool:
        return self.n_done == len(self.rows)

    def compact(self) -> Tensor | None:
        """Finished rows stop costing compute: dropped (with their caches) once they are a quarter
        of the batch, so the copy is paid rarely. Returns the rows kept, or None."""
        if self.n_done * 4 < len(self.rows):
            return None
        keep = (~self.finished).nonzero()[:, 0]
        self.rows, self.finished = self.rows[keep], self.finished[keep]
        return keep

    def results(self) -> list[tuple[list[int], float]]:
        return [(_strip(row, self.eos), lp) for row, lp in zip(self.out.tolist(), self.logprob.tolist())]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


class _Beam:
    """K hypotheses per utterance (rows u*K ... u*K + K-1). Every beam's end extension closes a
    finished hypothesis scored ``score / length ** length_penalty``; the best K other extensions
    stay alive. An utterance is done when it has K finished hypotheses and no alive beam can still
    beat its best one (scores only fall), when no beam is alive, or at its length limit."""

    def __init__(self, b: int, k: int, eos: int, length_penalty: float, limits: Tensor) -> None:
        device = limits.device
        self.k, self.eos, self.length_penalty, self.limits = k, eos, length_penalty, limits
        self.scores = torch.zeros(b, k, device=device)
        self.scores[:, 1:] = NEG_INF  # all beams start identical: keep one alive
        self.history = torch.zeros((b * k, 0), dtype=torch.long, device=device)
        self.best_score = torch.full((b,), NEG_INF, device=device)  # the best finished, normalised
        self.best_raw = torch.zeros(b, device=device)
        self.n_finished = torch.zeros(b, dtype=torch.long, device=device)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.utts = list(range(b))  # the original utterance of each utterance still searched
        self.best_tokens: dict[int, list[int]] = {}
        self.final: dict[int, tuple[list[int], float]] = {}
        self.n_done = 0

    def advance(self, scores: Tensor, step: int) -> tuple[Tensor | None, Tensor]:
        b, k = self.scores.shape
        norm = (step + 1) ** self.length_penalty
        cand = self.scores[..., None] + scores.view(b, k, -1)  # [B, K, V]
        self._close(cand[..., self.eos] / norm, norm)
        cand[..., self.eos] = NEG_INF
        top, idx = cand.view(b, -1).topk(k, dim=-1)
        parents = (torch.arange(b, device=idx.device)[:, None] * k + idx // cand.shape[-1]).flatten()
        tokens = (idx % cand.shape[-1]).flatten()
        self.history = torch.cat([self.history.index_select(0, parents), tokens[:, None]], dim=1)
        best_alive = top.max(-1).values / norm
        was_done = self.done
        self.done = was_done | ((self.n_finished >= k) & (best_alive < self.best_score)) \
            | ~torch.isfinite(top).any(-1) | (step + 1 >= self.limits)
        lost = self.done & ~was_done & (self.n_finished == 0)
        if bool(lost.any()):  # nothing finished within the limit: the best alive hypothesis
            for i in lost.nonzero().flatten().tolist():
                self.final[self.utts[i]] = (self.history[i * k].tolist(), float(top[i, 0]))
        self.scores = top.masked_fill(self.done[:, None], NEG_INF)
        self.n_done = int(self.done.sum())
        return parents, tokens

    def _close(self, eos_scores: Tensor, norm: float) -> None:
        """The hypotheses that end here: the best one of each utterance, if better than before."""
        eos_scores = eos_scores.masked_fill(self.done[:, None], NEG_INF)
        self.n_finished += torch.isfinite(eos_scores).sum(-1)
        top_eos, top_beam = eos_scores.max(-1)
        improved = top_eos > self.best_score
        if bool(improved.any()):
            hist = self.history.view(len(self.utts), self.k, -1)
            for i in improved.nonzero().flatten().tolist():
                self.best_tokens[self.utts[i]] = hist[i, top_beam[i]].tolist()
            self.best_score = torch.where(improved, top_eos, self.best_score)
            self.best_raw = torch.where(improved, top_eos * norm, self.best_raw)

    def all_done(self) -> bool:
        return self.n_done == len(self.utts)

    def compact(self) -> Tensor | None:
        """Done utterances are dropped (all their beams) once they are a quarter of those left."""
        if self.n_done * 4 < len(self.utts) or self.n_done == 0:
            return None
        self._flush(self.done.nonzero().flatten().tolist())
        keep = (~self.done).nonzero()[:, 0]
        rows = (keep[:, None] * self.k + torch.arange(self.k, device=keep.device)).flatten()
        self.utts = [self.utts[i] for i in keep.tolist()]
        self.scores, self.history = self.scores[keep], self.history[rows]
        self.best_score, self.best_raw = self.best_score[keep], self.best_raw[keep]
        self.n_finished = self.n_finished[keep]
        self.done, self.limits, self.n_done = self.done[keep], self.limits[keep], 0
        return rows

    def _flush(self, idx: list[int]) -> None:
        """The results of utterances ``idx`` (positions among those left): their best finished
        hypothesis, else (when not already set) the best alive one."""
        raw = self.best_raw.tolist()
        for i in idx:
            u = self.utts[i]
            if u in self.best_tokens:
                self.final[u] = (self.best_tokens[u], raw[i])
            elif u not in self.final:
                self.final[u] = (self.history[i * self.k].tolist(), float(self.scores[i, 0]))

    def results(self) -> list[tuple[list[int], float]]:
        self._flush(list(range(len(self.utts))))
        return [self.final[u] for u in range(len(self.final))]


# ---------------------------------------------------------------------------- the search
@torch.inference_mode()
def search(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor, options: DecodeOptions | None = None,
           rules: DecodeRules | None = None, scorers: Sequence[Scorer] = ()) -> list[Hypothesis]:
    """Beam search (greedy for beam 1) over the scorers of ``options.decoder``
    (:func:`default_scorers`) and any more ``scorers`` (a language model: :class:`LMScorer`, its
    rows utterances x beams), for the whole batch at once."""
    options = options or DecodeOptions()
    rules = rules or default_rules(model)
    b, k = memory.shape[0], options.beam_size
    limits = decode_limits(model, mem_lengths, options, len(rules.prompt))
    max_len = int(limits.max())
    all_scorers = default_scorers(model, memory, mem_lengths, options, rules, max_len) + list(scorers)
    selector: _Greedy | _Beam = (_Greedy(b, rules.eos_id, limits, max_len) if k == 1
                                 else _Beam(b, k, rules.eos_id, options.length_penalty, limits))
    pre_beam = pre_beam_size(options, model.config.vocab_size, all_scorers)
    for step in range(max_len):
        scores = step_log_probs(all_scorers, selector.history, step, pre_beam, rules.eos_id)
        parents, tokens = selector.advance(scores, step)
        if selector.all_done() or step == max_len - 1:
            break
        for s in all_scorers:
            s.select(parents, tokens)
        rows = selector.compact()
        if rows is not None:
            for s in all_scorers:
                s.keep(rows)
    no_speech = all_scorers[0].no_speech  # type: ignore[attr-defined]  # the decoder's
    ns = no_speech.tolist() if no_speech is not None else [None] * b
    return [Hypothesis(tokens, logprob, n) for (tokens, logprob), n in zip(selector.results(), ns)]


def greedy_decode(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
                  options: DecodeOptions | None = None, rules: DecodeRules | None = None) -> list[Hypothesis]:
    """The attention decoder's most likely token at every step (the search with a beam of one)."""
    options = replace(options or DecodeOptions(), beam_size=1, decoder="attention")
    return search(model, memory, mem_lengths, options, rules)


def beam_search(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
                options: DecodeOptions, rules: DecodeRules | None = None) -> list[Hypothesis]:
    """The search of ``options`` (attention or joint; see :func:`search`)."""
    return search(model, memory, mem_lengths, options, rules)


def decode(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor, options: DecodeOptions | None = None,
           rules: DecodeRules | None = None, scorers: Sequence[Scorer] = ()) -> list[Hypothesis]:
    """The decoder ``options`` asks for: CTC greedy, or the search over the decoder's scorers
    (joint CTC/attention, or the attention decoder: greedy for beam 1, beam search otherwise)."""
    options = options or DecodeOptions()
    if options.decoder == "ctc":
        return ctc_greedy_decode(model, memory, mem_lengths)
    return search(model, memory, mem_lengths, options, rules, scorers)
