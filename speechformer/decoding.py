"""Turning encoder memory into token sequences: batched greedy and beam search.

Both run the encoder once per batch, keep each decoder layer's keys/values in
preallocated caches (so step t costs one token, not t), and never loop forever: the
number of steps is capped by a maximum tied to the input length (a transcript cannot
have more tokens than the encoder has frames) and by the model's position table.

What to feed first, when to stop and which tokens never to emit come from the
tokenizer as :class:`~speechformer.tokenizer.DecodeRules` (speechformer's own models:
``<s>`` then anything but ``<blank>``/``<s>``; Whisper: its start-of-transcript prompt,
suppressed non-speech tokens, no blank first token, and the no-speech probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import SpeechTransformer
from .tokenizer import DecodeRules


@dataclass
class DecodeOptions:
    beam_size: int = 1
    length_penalty: float = 1.0  # beam score = log p / length ** length_penalty
    max_len_ratio: float = 1.0  # at most this many tokens per encoder frame
    max_len: int = 0  # hard cap (0: the model's position table)

    @classmethod
    def for_model(cls, model: SpeechTransformer, beam_size: int = 1) -> "DecodeOptions":
        """Defaults for a model: Whisper windows get at most half the decoder's positions
        (openai-whisper's ``sample_len``), so a repetition loop cannot run to 446 tokens."""
        whisper = model.config.frontend == "whisper"
        return cls(beam_size=beam_size, max_len=model.config.max_target_positions // 2 if whisper else 0)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"--beam-size must be at least 1, got {self.beam_size}")
        if self.max_len_ratio <= 0:
            raise ValueError(f"max_len_ratio must be positive, got {self.max_len_ratio}")


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
        logits, _ = model.decode(tokens, memory, mask, state)
        if step == 0:
            no_speech = _no_speech(logits, rules)
        logp = suppress(logits[:, -1].float(), step).log_softmax(-1)
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
def beam_search(model: SpeechTransformer, memory: Tensor, mem_lengths: Tensor,
                options: DecodeOptions, rules: DecodeRules | None = None) -> list[Hypothesis]:
    """Batched beam search with length normalisation.

    All B x K hypotheses advance together as one batch of B*K rows. At each step every
    alive beam proposes its extensions; an extension by ``</s>`` closes a hypothesis
    (scored ``log p / length ** length_penalty``), the best K other extensions stay
    alive, and the caches are reordered to follow their parents. An utterance is done
    when it has K finished hypotheses and no alive beam can still beat its best one.
    """
    rules = rules or default_rules(model)
    eos = rules.eos_id
    k = options.beam_size
    if k == 1:
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
        logits, _ = model.decode(last, memory, mask, state)
        if step == 0:
            no_speech = _no_speech(logits[::k], rules)
        logp = suppress(logits[:, -1].float(), step).log_softmax(-1).view(b, k, -1)
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
        # stop when no alive beam can beat the best finished one (scores only fall)
        best_alive = scores.max(-1).values / length ** options.length_penalty
        done |= (n_finished >= k) & (best_alive < best_score)
        done |= ~torch.isfinite(scores).any(-1)
        done |= length >= limits  # this utterance's longest transcript
        if bool(done.all()) or step == max_len - 1:
            break
        scores = scores.masked_fill(done[:, None], float("-inf"))
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
    """Greedy for beam 1, beam search otherwise."""
    options = options or DecodeOptions()
    if options.beam_size == 1:
        return greedy_decode(model, memory, mem_lengths, options, rules)
    return beam_search(model, memory, mem_lengths, options, rules)
