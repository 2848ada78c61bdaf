"""The search over scorers: a language model joins the decoder as one more full scorer (shallow
fusion), Whisper's and speechformer's decoding rules are public logit filters, and joint decoding
is the decoder plus a weighted partial scorer."""

from __future__ import annotations

import torch

from speechformer.decoding import (DecodeOptions, LengthBonus, LMScorer, SuppressTokens, apply_filters, beam_search,
                                   decode, default_rules, logit_filters, pre_beam_size, search)
from speechformer.model import ModelConfig, SpeechTransformer
from speechformer.tokenizer import DecodeRules

V = 24


def tiny_model() -> SpeechTransformer:
    torch.manual_seed(0)
    return SpeechTransformer(ModelConfig(vocab_size=V, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                                         n_decoder_layers=2, dropout=0.0)).eval()


def memory_of(model: SpeechTransformer):
    torch.manual_seed(3)
    return model.encode(torch.randn(3, 9000), torch.tensor([9000, 5000, 7000]))[:2]


class TrigramLM:
    """A stand-in language model with the ``step`` interface: next-token log-probabilities from the
    last token and, kept in its cache, the one before (so a cache that does not follow the beams
    gives other scores)."""

    class Cache:
        def __init__(self, last: torch.Tensor) -> None:
            self.last = last

        def reorder(self, index: torch.Tensor) -> None:
            self.last = self.last[index]

    def __init__(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        self.a, self.b = a, torch.zeros_like(a) if b is None else b  # [V, V]: row = last / the one before

    def step(self, tokens: torch.Tensor, cache: "TrigramLM.Cache | None"):
        last = tokens[:, -1] if tokens.dim() == 2 else tokens  # the prompt [N, L], then one token per row [N]
        before = last if cache is None else cache.last
        log_probs = (self.a[last] + self.b[before]).log_softmax(-1)
        return log_probs, TrigramLM.Cache(last)

    def score(self, tokens: list[int], bos: int) -> float:
        seq = [bos, bos] + tokens
        return float(sum((self.a[seq[i - 1]] + self.b[seq[i - 2]]).log_softmax(-1)[seq[i]]
                         for i in range(2, len(seq))))


def random_lm() -> TrigramLM:
    torch.manual_seed(5)
    return TrigramLM(torch.randn(V, V) * 3, torch.randn(V, V) * 3)


def lm_scorer(lm: TrigramLM, model: SpeechTransformer, utterances: int, beams: int, weight: float) -> LMScorer:
    return LMScorer(lm, utterances * beams, [model.config.bos_id], weight)


def test_lm_with_weight_0_gives_the_decoders_result_exactly():
    model = tiny_model()
    memory, lengths = memory_of(model)
    lm = random_lm()
    for options in (DecodeOptions(max_len=10), DecodeOptions(beam_size=3, max_len=10),
                    DecodeOptions(beam_size=3, max_len=10, decoder="joint", ctc_weight=0.3)):
        plain = decode(model, memory, lengths, options)
        fused = decode(model, memory, lengths, options, scorers=[lm_scorer(lm, model, 3, options.beam_size, 0.0)])
        assert [(h.tokens, h.logprob) for h in fused] == [(h.tokens, h.logprob) for h in plain]


@torch.no_grad()
def test_lm_fusion_scores_each_hypothesis_by_decoder_plus_weighted_lm():
    """Beam search with an LM: each result's score is the decoder's teacher-forced log-probability
    plus the weight times the LM's (its cache followed the beams), and a strong LM changes the result."""
    model = tiny_model()
    memory, lengths = memory_of(model)
    c = model.config
    lm = random_lm()
    plain = beam_search(model, memory, lengths, DecodeOptions(beam_size=3, max_len=8))
    fused = search(model, memory, lengths, DecodeOptions(beam_size=3, max_len=8),
                   scorers=[lm_scorer(lm, model, 3, 3, 0.5)])
    mask = model.memory_mask(lengths, memory.shape[1])
    for row, h in enumerate(fused):
        logits = model.decode(torch.tensor([[c.bos_id] + h.tokens]), memory[row:row + 1],
                                 None if mask is None else mask[row:row + 1])
        logits[..., [c.blank_id, c.bos_id]] = float("-inf")
        target = h.tokens + ([c.eos_id] if len(h.tokens) < 8 else [])
        att = float(logits[0, :len(target)].log_softmax(-1).gather(1, torch.tensor([target]).T).sum())
        assert abs(h.logprob - (att + 0.5 * lm.score(target, c.bos_id))) < 1e-3
    assert [h.tokens for h in fused] != [h.tokens for h in plain]
    # an LM that all but insists on token 7 makes greedy decoding write it
    table = torch.full((V, V), -10.0)
    table[:, 7] = 10.0
    insist = search(model, memory, lengths, DecodeOptions(max_len=6),
                    scorers=[lm_scorer(TrigramLM(table), model, 3, 1, 1.0)])
    assert all(h.tokens == [7] * 6 for h in insist)
    assert all(h.tokens != [7] * 6 for h in decode(model, memory, lengths, DecodeOptions(max_len=6)))


@torch.no_grad()
def test_length_bonus_adds_its_weight_per_token_and_nothing_for_the_end():
    """``LengthBonus`` (``--lm-bonus``): each result scores the decoder's log-probability plus the
    bonus per emitted token, the end token not counted; a large bonus keeps every hypothesis going
    to its limit."""
    model = tiny_model()
    memory, lengths = memory_of(model)
    c = model.config
    mask = model.memory_mask(lengths, memory.shape[1])
    for bonus, options in ((0.5, DecodeOptions(beam_size=3, max_len=8)), (100.0, DecodeOptions(max_len=6))):
        hyps = search(model, memory, lengths, options, scorers=[LengthBonus(V, c.eos_id, bonus)])
        for row, h in enumerate(hyps):
            logits = model.decode(torch.tensor([[c.bos_id] + h.tokens]), memory[row:row + 1],
                                  None if mask is None else mask[row:row + 1])
            logits[..., [c.blank_id, c.bos_id]] = float("-inf")
            target = h.tokens + ([c.eos_id] if len(h.tokens) < options.max_len else [])
            att = float(logits[0, :len(target)].log_softmax(-1).gather(1, torch.tensor([target]).T).sum())
            assert abs(h.logprob - (att + bonus * len(h.tokens))) < 1e-3
    assert all(len(h.tokens) == 6 for h in hyps)
    # CTC alone (--ctc-weight 1) with a bonus: the bonus ranks nothing, so CTC still scores every token
    joint = DecodeOptions(beam_size=3, decoder="joint", ctc_weight=1.0)
    bonus = LengthBonus(V, c.eos_id, 1.0)
    assert pre_beam_size(joint, V, [lm_scorer(random_lm(), model, 3, 3, 0.0), bonus]) == V
    assert pre_beam_size(joint, V, [lm_scorer(random_lm(), model, 3, 3, 0.5), bonus]) < V


def test_logit_filters_are_the_rules_of_the_tokenizer():
    rules = DecodeRules(prompt=[2], eos_id=3, suppress=[0, 2], suppress_at_start=[3, 5])
    filters = logit_filters(rules, V)
    assert len(filters) == 1 and isinstance(filters[0], SuppressTokens)
    logits = torch.zeros(2, V)
    first = apply_filters(filters, logits, torch.zeros(2, 0, dtype=torch.long), 0)
    later = apply_filters(filters, logits, torch.ones(2, 1, dtype=torch.long), 1)
    assert (first[0] == float("-inf")).nonzero().flatten().tolist() == [0, 2, 3, 5]
    assert (later[0] == float("-inf")).nonzero().flatten().tolist() == [0, 2]
    timed = DecodeRules(prompt=[2], eos_id=3, suppress=[0], timestamp_begin=20, no_timestamps_id=19)
    assert len(logit_filters(timed, V)) == 2  # and the timestamp rules
    model = tiny_model()
    assert logit_filters(default_rules(model), V)[0].always.nonzero().flatten().tolist() == [0, 2]
