"""Turning encoder memory into token sequences: batched greedy and beam search.

Both run the encoder once per batch, keep each decoder layer's keys/values in
preallocated caches (so step t costs one token, not t), and never loop forever: the
number of steps is capped by a maximum tied to the input length (a transcript cannot
have more tokens than the encoder has frames) and by the model's position table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import SpeechTransformer


@dataclass
class DecodeOptions:
    beam_size: int = 1
    length_penalty: float = 1.0  # beam score = log p / length ** length_penalty
    max_len_ratio: float = 1.0  # at most this many tokens per encoder frame
    max_len: int = 0  # hard cap (0: the model's position table)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"--beam-size must be at least 1, got {self.beam_size}")
        if self.max_len_ratio <= 0:
            raise ValueError(f"max_len_ratio must be positive, got {self.max_len_ratio}")


def max_decode_length(model: SpeechTransformer, mem_lengths: Tensor, options: DecodeOptions) -> int:
    """Steps allowed for this batch: tied to the longest input, bounded by the position table."""
    cap = model.config.max_target_positions - 1
    if options.max_len > 0:
        cap = min(cap, options.max_len)
    return max(1, min(cap, int(mem_lengths.max().item() * options.max_len_ratio) + 2))


@torch.inference_mode()
def greedy_decode(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
                  options: DecodeOptions | None = None) -> list[list[int]]:
    """Most likely token at every step, for the whole batch at once. Returns token ids
    without bos/eos, one list per utterance."""
    options = options or DecodeOptions()
    c = model.config
    b = memory.shape[0]
    max_len = max_decode_length(model, mem_lengths, options)
    mask = model.memory_mask(mem_lengths, memory.shape[1])
    state = model.init_state(memory, max_len + 1)
    tokens = torch.full((b, 1), c.bos_id, dtype=torch.long, device=memory.device)
    out = torch.full((b, max_len), c.eos_id, dtype=torch.long, device=memory.device)
    finished = torch.zeros(b, dtype=torch.bool, device=memory.device)
    for step in range(max_len):
        logits, _ = model.decode(tokens, memory, mask, state)
        nxt = _suppress(logits[:, -1], model).argmax(-1)
        nxt = torch.where(finished, c.eos_id, nxt)
        out[:, step] = nxt
        finished |= nxt == c.eos_id
        if bool(finished.all()):
            break
        tokens = nxt[:, None]
    return [_strip(row, c.eos_id) for row in out.tolist()]


def _suppress(logits: Tensor, model: SpeechTransformer) -> Tensor:
    """Tokens that can never be emitted: the CTC blank and the start token."""
    logits[..., model.config.blank_id] = float("-inf")
    logits[..., model.config.bos_id] = float("-inf")
    return logits


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


@torch.inference_mode()
def beam_search(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
                options: DecodeOptions) -> list[list[int]]:
    """Batched beam search with length normalisation.

    All B x K hypotheses advance together as one batch of B*K rows. At each step every
    alive beam proposes its extensions; an extension by ``</s>`` closes a hypothesis
    (scored ``log p / length ** length_penalty``), the best K other extensions stay
    alive, and the caches are reordered to follow their parents. An utterance is done
    when it has K finished hypotheses and no alive beam can still beat its best one.
    """
    c = model.config
    k = options.beam_size
    if k == 1:
        return greedy_decode(model, memory, mem_lengths, options)
    b, device = memory.shape[0], memory.device
    max_len = max_decode_length(model, mem_lengths, options)
    memory = memory.repeat_interleave(k, dim=0)
    mem_lengths = mem_lengths.repeat_interleave(k, dim=0)
    mask = model.memory_mask(mem_lengths, memory.shape[1])
    state = model.init_state(memory, max_len + 1)

    scores = torch.zeros(b, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
    history = torch.full((b * k, 0), c.bos_id, dtype=torch.long, device=device)
    last = torch.full((b * k, 1), c.bos_id, dtype=torch.long, device=device)
    best_score = torch.full((b,), float("-inf"), device=device)
    best_tokens: list[list[int] | None] = [None] * b
    n_finished = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)

    for step in range(max_len):
        logits, _ = model.decode(last, memory, mask, state)
        logp = _suppress(logits[:, -1].float(), model).log_softmax(-1).view(b, k, -1)
        cand = scores[..., None] + logp  # [B, K, V]
        length = step + 1
        # hypotheses that end here
        eos_scores = cand[..., c.eos_id] / length ** options.length_penalty  # [B, K]
        eos_scores = eos_scores.masked_fill(done[:, None], float("-inf"))
        n_finished += torch.isfinite(eos_scores).sum(-1)
        top_eos, top_beam = eos_scores.max(-1)
        improved = top_eos > best_score
        if bool(improved.any()):
            hist = history.view(b, k, -1)
            for i in improved.nonzero().flatten().tolist():
                best_tokens[i] = hist[i, top_beam[i]].tolist()
            best_score = torch.where(improved, top_eos, best_score)
        # the rest stay alive
        cand[..., c.eos_id] = float("-inf")
        flat = cand.view(b, -1)
        scores, idx = flat.topk(k, dim=-1)
        parent = idx // cand.shape[-1]
        token = idx % cand.shape[-1]
        # stop when no alive beam can beat the best finished one (scores only fall)
        best_alive = scores.max(-1).values / length ** options.length_penalty
        done |= (n_finished >= k) & (best_alive < best_score)
        done |= ~torch.isfinite(scores).any(-1)
        if bool(done.all()) or step == max_len - 1:
            break
        scores = scores.masked_fill(done[:, None], float("-inf"))
        index = (rows[:, None] * k + parent).flatten()
        state.reorder(index)
        history = torch.cat([history.index_select(0, index), token.flatten()[:, None]], dim=1)
        last = token.flatten()[:, None]

    results = []
    hist = history.view(b, k, -1)
    for i in range(b):
        if best_tokens[i] is not None:
            results.append(best_tokens[i])
        else:  # nothing finished within max_len: take the best alive hypothesis
            results.append(hist[i, int(scores[i].argmax())].tolist() if torch.isfinite(scores[i]).any()
                           else hist[i, 0].tolist())
    return results


def decode(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
           options: DecodeOptions | None = None) -> list[list[int]]:
    """Greedy for beam 1, beam search otherwise."""
    options = options or DecodeOptions()
    if options.beam_size == 1:
        return greedy_decode(model, memory, mem_lengths, options)
    return beam_search(model, memory, mem_lengths, options)
