"""Turning encoder memory into token sequences: batched greedy and beam search with the
attention decoder, CTC greedy decoding, and joint CTC/attention beam search.

Both run the encoder once per batch, keep each decoder layer's keys/values in
preallocated caches (so step t costs one token, not t), and never loop forever: the
number of steps is capped by a maximum tied to the input length (a transcript cannot
have more tokens than the encoder has frames) and by the model's position table.

What to feed first, when to stop and which tokens never to emit come from the
tokenizer as :class:`~speechformer.tokenizer.DecodeRules` (speechformer's own models:
``<s>`` then anything but ``<blank>``/``<s>``; Whisper: its start-of-transcript prompt,
suppressed non-speech tokens, no blank first token, and the no-speech probability; with
timestamps, its timestamp rules: :func:`apply_timestamp_rules`).

Three decoders (``DecodeOptions.decoder``):

* ``attention``: the decoder alone (greedy for beam 1, beam search otherwise);
* ``ctc``: the CTC head alone, greedy (best label per frame, repeats collapsed, blanks dropped):
  no decoder pass at all, the fastest;
* ``joint``: beam search whose score is ``(1 - w) log p_att(h) + w log p_ctc(h...)``, where the
  CTC part is the *prefix* probability of h (:class:`CTCPrefixScorer`, Watanabe et al. 2017)
  and ``w = ctc_weight``. CTC's monotonic alignment vetoes hypotheses the audio cannot
  support (dropped or repeated words, loops, early ends) that the decoder alone may like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .model import SpeechTransformer
from .tokenizer import DecodeRules


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode: the decoder and its settings. Checked, and filled in for a model family,
    by :class:`~speechformer.options.TranscribeOptions` (``check``) and
    ``ModelBundle.default_options`` (Whisper: ``max_len`` half the decoder's positions)."""

    beam_size: int = 1
    length_penalty: float = 1.0  # beam score = log p / length ** length_penalty
    max_len_ratio: float = 1.0  # at most this many tokens per encoder frame
    max_len: int = 0  # hard cap (0: the model's position table)
    decoder: Literal["attention", "joint", "ctc"] = "attention"
    ctc_weight: float = 0.3  # joint: weight of the CTC prefix score (0 = attention only, 1 = CTC only)
    ctc_candidates: int = 0  # joint: tokens per beam given a CTC prefix score (0: 1.5 x beam, all if ctc_weight 1)


@dataclass
class Hypothesis:
    """One decoded transcript: token ids (no prompt, no end token) and how sure the model was."""

    tokens: list[int]
    logprob: float = 0.0  # sum of the emitted tokens' log-probabilities, the end token included
    no_speech_prob: float | None = None  # Whisper: P(<|nospeech|>) at the start-of-transcript position

    @property
    def avg_logprob(self) -> float:
        return self.logprob / (len(self.tokens) + 1)


def default_rules(model: SpeechTransformer) -> DecodeRules:
    """speechformer's own layout: start with ``<s>``, never emit ``<blank>`` or ``<s>``."""
    c = model.config
    return DecodeRules(prompt=[c.bos_id], eos_id=c.eos_id, suppress=[c.blank_id, c.bos_id])


class _Suppressor:
    """Sets the logits of forbidden tokens to -inf (a precomputed mask, one op per step)."""

    def __init__(self, rules: DecodeRules, vocab_size: int, device: torch.device) -> None:
        self.always = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.always[[i for i in rules.suppress if i < vocab_size]] = True
        self.first = self.always.clone()
        self.first[[i for i in rules.suppress_at_start if i < vocab_size]] = True

    def __call__(self, logits: Tensor, step: int) -> Tensor:
        return logits.masked_fill(self.first if step == 0 else self.always, float("-inf"))


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


def _constrain(logits: Tensor, step: int, history: Tensor, suppress: _Suppressor, rules: DecodeRules) -> Tensor:
    """Next-token log-probabilities [N, V] after the suppressed tokens and, when the rules
    have time tokens, the timestamp rules."""
    logits = suppress(logits.float(), step)
    if rules.timestamp_begin is not None:
        logits = apply_timestamp_rules(logits, history, rules)
    return logits.log_softmax(-1)


def _no_speech(logits: Tensor, rules: DecodeRules) -> Tensor | None:
    if rules.no_speech_id is None:
        return None
    return logits[:, rules.sot_index].float().softmax(-1)[:, rules.no_speech_id]


def decode_limits(model: SpeechTransformer, mem_lengths: Tensor, options: DecodeOptions,
                  prompt_len: int = 1) -> Tensor:
    """Tokens allowed per utterance: tied to its input length, bounded by the position table
    (so an utterance decodes the same alone or in any batch)."""
    cap = model.config.max_target_positions - prompt_len
    if options.max_len > 0:
        cap = min(cap, options.max_len)
    return (mem_lengths * options.max_len_ratio).long().add(2).clamp(1, max(1, cap))


@torch.inference_mode()
def greedy_decode(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
                  options: DecodeOptions | None = None, rules: DecodeRules | None = None) -> list[Hypothesis]:
    """Most likely token at every step, for the whole batch at once."""
    options = options or DecodeOptions()
    rules = rules or default_rules(model)
    b, device = memory.shape[0], memory.device
    prompt = torch.tensor(rules.prompt, dtype=torch.long, device=device)
    limits = decode_limits(model, mem_lengths, options, len(rules.prompt))
    max_len = int(limits.max())
    mask = model.memory_mask(mem_lengths, memory.shape[1])
    state = model.init_state(memory, len(rules.prompt) + max_len)
    suppress = _Suppressor(rules, model.config.vocab_size, device)
    tokens = prompt.expand(b, -1)
    out = torch.full((b, max_len), rules.eos_id, dtype=torch.long, device=device)
    logprob = torch.zeros(b, device=device)
    rows = torch.arange(b, device=device)  # the original row of each row still decoded
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    no_speech = None
    for step in range(max_len):
        logits = model.decode(tokens, memory, mask, state)
        if step == 0:
            no_speech = _no_speech(logits, rules)
        logp = _constrain(logits[:, -1], step, out[rows, :step], suppress, rules)
        nxt = logp.argmax(-1)
        logprob[rows] += torch.where(finished, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(finished, rules.eos_id, nxt)
        out[rows, step] = nxt
        finished |= (nxt == rules.eos_id) | (step + 1 >= limits[rows])
        n_done = int(finished.sum())
        if n_done == len(rows):
            break
        if n_done * 4 >= len(rows):
            # finished rows stop costing compute: drop them (and their caches) once they are
            # a quarter of the batch, so the copy is paid rarely
            keep = (~finished).nonzero()[:, 0]
            state.reorder(keep)
            memory, rows, nxt = memory[keep], rows[keep], nxt[keep]
            mask = mask[keep] if mask is not None else None
            finished = finished[keep]
        tokens = nxt[:, None]
    ns = no_speech.tolist() if no_speech is not None else [None] * b
    return [Hypothesis(_strip(row, rules.eos_id), lp, n) for row, lp, n in zip(out.tolist(), logprob.tolist(), ns)]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


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
        self.max_elements = max_elements
        self._cand: Tensor | None = None
        self._new: tuple[Tensor, Tensor] | None = None

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
        self._new = (torch.cat(r_ns, 1), torch.cat(r_bs, 1))
        return torch.cat(psis, 1)

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
        r_n, r_b = self._new
        self.r_n, self.r_b = r_n[rows, slot], r_b[rows, slot]
        self.last = tokens
        self.utt, self.lengths = self.utt[rows], self.lengths[rows]
        self._cand = self._new = None


def _weighted(att: Tensor, ctc: Tensor, w: float) -> Tensor:
    """(1 - w) att + w ctc, with -inf (forbidden) kept -inf and a zero weight ignoring its side."""
    if w == 0.0:
        return att
    if w == 1.0:
        return ctc.masked_fill(att == float("-inf"), float("-inf"))
    return (1.0 - w) * att + w * ctc


@torch.inference_mode()
def beam_search(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
                options: DecodeOptions, rules: DecodeRules | None = None) -> list[Hypothesis]:
    """Batched beam search with length normalisation.

    All B x K hypotheses advance together as one batch of B*K rows. At each step every
    alive beam proposes its extensions; an extension by ``</s>`` closes a hypothesis
    (scored ``log p / length ** length_penalty``), the best K other extensions stay
    alive, and the caches are reordered to follow their parents. An utterance is done
    when it has K finished hypotheses and no alive beam can still beat its best one.

    ``options.decoder == "joint"`` adds CTC prefix scores: each beam's ``ctc_candidates``
    best tokens by the decoder (or every token when ``ctc_weight`` is 1) are scored by
    :class:`CTCPrefixScorer`, a hypothesis scores ``(1 - w) log p_att + w log ψ_ctc``, and
    the end token's CTC score is the probability that the labelling is exactly the
    hypothesis. With ``ctc_weight`` 0 the result is the attention beam search's.
    """
    rules = rules or default_rules(model)
    eos = rules.eos_id
    k = options.beam_size
    joint = options.decoder == "joint"
    if k == 1 and not joint:
        return greedy_decode(model, memory, mem_lengths, options, rules)
    b, device = memory.shape[0], memory.device
    limits = decode_limits(model, mem_lengths, options, len(rules.prompt))
    max_len = int(limits.max())
    # the memory's keys/values are projected and stored once per utterance, shared by its k beams
    state = model.init_state(memory, len(rules.prompt) + max_len, repeat=k)
    mask = model.memory_mask(mem_lengths, memory.shape[1])  # one row per utterance, as the memory
    suppress = _Suppressor(rules, model.config.vocab_size, device)

    scores = torch.zeros(b, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
    vocab = model.config.vocab_size
    if joint:
        w = options.ctc_weight
        ctc = CTCPrefixScorer(model.ctc_log_probs(memory), mem_lengths, model.config.blank_id, k)
        att_scores = scores.clone()  # the decoder's part of each beam's score
        n_cand = vocab if w == 1.0 else min(vocab, options.ctc_candidates or max(2, int(1.5 * k)))
    history = torch.zeros((b * k, 0), dtype=torch.long, device=device)
    last = torch.tensor(rules.prompt, dtype=torch.long, device=device).expand(b * k, -1)
    best_score = torch.full((b,), float("-inf"), device=device)
    best_raw = torch.zeros(b, device=device)
    best_tokens: list[list[int] | None] = [None] * b
    no_speech = None
    n_finished = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)

    for step in range(max_len):
        logits = model.decode(last, memory, mask, state)
        if step == 0:
            no_speech = _no_speech(logits[::k], rules)
        logp = _constrain(logits[:, -1], step, history, suppress, rules).view(b, k, -1)
        if joint:
            att_cand = att_scores[..., None] + logp  # [B, K, V]
            if n_cand < vocab:
                ids = logp.masked_fill(torch.arange(vocab, device=device) == eos, float("-inf")).topk(n_cand, -1)[1]
            else:
                ids = torch.arange(vocab, device=device).expand(b, k, vocab)
            ids = ids.reshape(b * k, -1)
            psi = torch.full((b * k, vocab), float("-inf"), device=device)
            psi.scatter_(1, ids, ctc.score(ids).float())
            psi[:, eos] = ctc.end_scores().float()
            cand = _weighted(att_cand, psi.view(b, k, vocab), w)
            if w > 0:  # tokens without a CTC score are not candidates
                cand = cand.masked_fill(psi.view(b, k, vocab) == float("-inf"), float("-inf"))
        else:
            cand = scores[..., None] + logp  # [B, K, V]
        length = step + 1
        # hypotheses that end here
        eos_scores = cand[..., eos] / length ** options.length_penalty  # [B, K]
        eos_scores = eos_scores.masked_fill(done[:, None], float("-inf"))
        n_finished += torch.isfinite(eos_scores).sum(-1)
        top_eos, top_beam = eos_scores.max(-1)
        improved = top_eos > best_score
        if bool(improved.any()):
            hist = history.view(b, k, -1)
            for i in improved.nonzero().flatten().tolist():
                best_tokens[i] = hist[i, top_beam[i]].tolist()
            best_score = torch.where(improved, top_eos, best_score)
            best_raw = torch.where(improved, top_eos * length ** options.length_penalty, best_raw)
        # the rest stay alive
        cand[..., eos] = float("-inf")
        flat = cand.view(b, -1)
        scores, idx = flat.topk(k, dim=-1)
        parent = idx // cand.shape[-1]
        token = idx % cand.shape[-1]
        if joint:
            att_scores = att_cand.view(b, -1).gather(1, idx)
            ctc.select((rows[:, None] * k + parent).flatten(), token.flatten())
        # stop when no alive beam can beat the best finished one (scores only fall)
        best_alive = scores.max(-1).values / length ** options.length_penalty
        done |= (n_finished >= k) & (best_alive < best_score)
        done |= ~torch.isfinite(scores).any(-1)
        done |= length >= limits  # this utterance's longest transcript
        if bool(done.all()) or step == max_len - 1:
            break
        scores = scores.masked_fill(done[:, None], float("-inf"))
        if joint:
            att_scores = att_scores.masked_fill(done[:, None], float("-inf"))
        index = (rows[:, None] * k + parent).flatten()
        state.reorder(index, cross=False)  # parents are beams of the same utterance
        history = torch.cat([history.index_select(0, index), token.flatten()[:, None]], dim=1)
        last = token.flatten()[:, None]

    results = []
    hist = history.view(b, k, -1)
    ns = no_speech.tolist() if no_speech is not None else [None] * b
    for i in range(b):
        if best_tokens[i] is not None:
            results.append(Hypothesis(best_tokens[i], float(best_raw[i]), ns[i]))
        else:  # nothing finished within max_len: take the best alive hypothesis
            j = int(scores[i].argmax()) if torch.isfinite(scores[i]).any() else 0
            results.append(Hypothesis(hist[i, j].tolist(), float(scores[i, j]), ns[i]))
    return results


def decode(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
           options: DecodeOptions | None = None, rules: DecodeRules | None = None) -> list[Hypothesis]:
    """The decoder ``options`` asks for: CTC greedy, joint CTC/attention beam search, or the
    attention decoder (greedy for beam 1, beam search otherwise)."""
    options = options or DecodeOptions()
    if options.decoder == "ctc":
        return ctc_greedy_decode(model, memory, mem_lengths)
    if options.decoder == "joint":
        return beam_search(model, memory, mem_lengths, options, rules)
    if options.beam_size == 1:
        return greedy_decode(model, memory, mem_lengths, options, rules)
    return beam_search(model, memory, mem_lengths, options, rules)
