"""CTC greedy decoding, CTC prefix scores and joint CTC/attention beam search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from speechformer.decoding import CTCPrefixScorer, DecodeOptions, beam_search, ctc_greedy_decode, decode
from speechformer.model import ModelConfig, SpeechTransformer
from speechformer.options import TranscribeOptions


def tiny_model(**kw) -> SpeechTransformer:
    torch.manual_seed(0)
    base = dict(vocab_size=24, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0)
    base.update(kw)
    return SpeechTransformer(ModelConfig(**base)).eval()


def extend(scorer: CTCPrefixScorer, tokens: list[int]) -> list[float]:
    """Feed one hypothesis (one row) token by token; the prefix score after each token."""
    psis = []
    for tok in tokens:
        psis.append(float(scorer.score(torch.tensor([[tok]]))[0, 0]))
        scorer.select(torch.tensor([0]), torch.tensor([tok]))
    return psis


def test_prefix_score_of_a_whole_sequence_equals_minus_ctc_loss():
    torch.manual_seed(0)
    t, v = 30, 7
    log_probs = torch.randn(3, t, v).log_softmax(-1)
    lengths = torch.tensor([30, 21, 9])
    targets = [[1, 1, 2, 5], [3, 4, 3, 3], [6, 2, 2, 1]]  # repeats need a blank between them
    scorer = CTCPrefixScorer(log_probs, lengths, blank=0, beams=1)
    for step in range(4):
        tok = torch.tensor([row[step] for row in targets])
        scorer.score(tok[:, None])
        scorer.select(torch.arange(3), tok)
    loss = F.ctc_loss(log_probs.transpose(0, 1), torch.tensor(targets), lengths, torch.tensor([4, 4, 4]),
                      blank=0, reduction="none", zero_infinity=False)
    torch.testing.assert_close(scorer.end_scores().float(), -loss, atol=1e-4, rtol=1e-5)


def test_prefix_score_is_the_probability_of_all_labellings_that_start_with_the_prefix():
    """Brute force over every frame path of a short input: ψ(h) = Σ P(path) over the paths
    whose collapsed labelling starts with h, and the end score = Σ over labelling == h."""
    torch.manual_seed(1)
    t, v = 6, 3
    log_probs = torch.randn(1, t, v, dtype=torch.float64).log_softmax(-1)
    prob = log_probs[0].exp()
    starts: dict[tuple[int, ...], float] = {}
    exact: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(v), repeat=t):
        p = math.prod(float(prob[i, s]) for i, s in enumerate(path))
        label = tuple(s for i, s in enumerate(path) if s != 0 and (i == 0 or s != path[i - 1]))
        exact[label] = exact.get(label, 0.0) + p
        for n in range(1, len(label) + 1):
            starts[label[:n]] = starts.get(label[:n], 0.0) + p
    for h in [(1,), (2,), (1, 1), (1, 2), (2, 2, 1), (1, 2, 1, 2)]:
        scorer = CTCPrefixScorer(log_probs, torch.tensor([t]), blank=0)
        psis = extend(scorer, list(h))
        assert math.isclose(math.exp(psis[-1]), starts[h], rel_tol=1e-9)
        assert math.isclose(math.exp(float(scorer.end_scores()[0])), exact[h], rel_tol=1e-9)
        assert all(a >= b for a, b in zip(psis, psis[1:]))  # a longer prefix is never more likely


def test_prefix_scores_of_many_candidates_at_once_equal_one_at_a_time():
    torch.manual_seed(2)
    log_probs = torch.randn(2, 15, 9).log_softmax(-1)
    lengths = torch.tensor([15, 11])
    batched = CTCPrefixScorer(log_probs, lengths, blank=0, beams=2, max_elements=40)  # forces chunks
    prefix = torch.tensor([3, 3, 5, 5])
    batched.score(prefix[:, None])
    batched.select(torch.arange(4), prefix)
    cand = torch.tensor([[1, 3, 5, 8]] * 4)
    together = batched.score(cand)
    for row in range(4):
        for j in range(4):
            one = CTCPrefixScorer(log_probs[row // 2:row // 2 + 1], lengths[row // 2:row // 2 + 1], blank=0)
            extend(one, [int(prefix[row])])
            torch.testing.assert_close(one.score(cand[row:row + 1, j:j + 1])[0, 0], together[row, j])


def test_ctc_greedy_collapses_repeats_and_drops_blanks_within_the_length():
    model = tiny_model()
    paths = torch.tensor([[0, 5, 5, 0, 5, 7, 7, 0, 9, 9], [4, 4, 0, 0, 4, 6, 6, 6, 8, 8]])

    class Fixed(torch.nn.Module):
        def forward(self, memory):
            return F.one_hot(paths, 24).float() * 10

    model.ctc = Fixed()
    hyps = ctc_greedy_decode(model, torch.zeros(2, 10, 32), torch.tensor([8, 10]))
    assert [h.tokens for h in hyps] == [[5, 5, 7], [4, 4, 6, 8]]
    assert decode(model, torch.zeros(2, 10, 32), torch.tensor([8, 10]), DecodeOptions(decoder="ctc"))[0].tokens == [5, 5, 7]


def _memory(model: SpeechTransformer):
    torch.manual_seed(3)
    lengths = torch.tensor([9000, 5000, 7000])
    return model.encode(torch.randn(3, 9000), lengths)[:2]


def test_joint_search_with_ctc_weight_0_is_the_attention_beam_search():
    model = tiny_model()
    memory, mem_lengths = _memory(model)
    for beam in (2, 4):
        att = beam_search(model, memory, mem_lengths, DecodeOptions(beam_size=beam, max_len=15))
        joint = beam_search(model, memory, mem_lengths,
                            DecodeOptions(beam_size=beam, max_len=15, decoder="joint", ctc_weight=0.0))
        assert [h.tokens for h in joint] == [h.tokens for h in att]
        assert [h.logprob for h in joint] == [h.logprob for h in att]


@torch.no_grad()
def test_joint_score_is_the_weighted_sum_of_attention_and_ctc_log_probabilities():
    model = tiny_model()
    memory, mem_lengths = _memory(model)
    c = model.config
    mask = model.memory_mask(mem_lengths, memory.shape[1])
    log_probs = model.ctc_log_probs(memory)
    for w in (0.3, 1.0):
        hyps = beam_search(model, memory, mem_lengths,
                           DecodeOptions(beam_size=3, max_len=12, decoder="joint", ctc_weight=w))
        for row, h in enumerate(hyps):
            assert c.blank_id not in h.tokens and c.bos_id not in h.tokens
            n = int(mem_lengths[row])
            ctc = -F.ctc_loss(log_probs[row:row + 1, :n].transpose(0, 1), torch.tensor([h.tokens]),
                              torch.tensor([n]), torch.tensor([len(h.tokens)]), blank=c.blank_id, reduction="sum")
            logits = model.decode(torch.tensor([[c.bos_id] + h.tokens]), memory[row:row + 1],
                                     None if mask is None else mask[row:row + 1])
            logits[..., [c.blank_id, c.bos_id]] = float("-inf")
            att = float(logits[0].log_softmax(-1).gather(1, torch.tensor([h.tokens + [c.eos_id]]).T).sum())
            assert h.logprob == pytest.approx((1 - w) * att + w * float(ctc), abs=2e-3)


def test_ctc_decoders_need_a_ctc_head_and_sane_options():
    model = tiny_model(ctc_head=False, ctc_weight=0.0)
    memory, mem_lengths = _memory(model)
    with pytest.raises(ValueError, match="no CTC head"):
        decode(model, memory, mem_lengths, DecodeOptions(decoder="joint", beam_size=2))
    with pytest.raises(ValueError, match="greedy"):
        TranscribeOptions(DecodeOptions(decoder="ctc", beam_size=4)).check()
    with pytest.raises(ValueError, match="ctc-weight"):
        TranscribeOptions(DecodeOptions(decoder="joint", ctc_weight=1.5)).check()
