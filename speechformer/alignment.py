"""Word times for Whisper models from the cross-attention of their alignment heads.

Whisper has no CTC head to force-align, but a few of its decoder's cross-attention heads look
at the audio a token stands for while they write it: the *alignment heads* (a per-model list
that openai-whisper found, which CTranslate2 and Hugging Face store with the converted model,
and :mod:`speechformer.whisper` carries into ``ModelConfig.alignment_heads``). The method is the
one openai-whisper's and faster-whisper's ``word_timestamps`` use:

1. After decoding, the decoder runs once more, teacher-forced over ``prompt + text tokens +
   end`` (the prompt with ``<|notimestamps|>``; time tokens are left out), and the weights of
   the alignment heads are captured (:func:`~speechformer.model.capture_attention`, the hooks
   ``speechformer explain`` uses).
2. :func:`alignment_matrix`: each head's weights are renormalised over the audio's frames (a
   window is padded to 30 s), standardised per frame over the positions, smoothed along time by
   a median filter (7 frames), and averaged over the heads: one ``[tokens, frames]`` score.
3. :func:`dtw_path`: dynamic time warping finds the monotone path from the first token and frame
   to the last that collects the most score; a token starts at the first frame the path gives it.
4. :func:`words_from_starts`: tokens become words (a word starts at a piece with a leading space;
   punctuation joins its neighbour), a word running from its first spoken token's start to the
   start of the token after its last spoken one, in 20 ms encoder frames.

The word times are of the window's audio; ``transcribe`` shifts them by the window's start.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import SpeechTransformer, capture_attention
from .timestamps import Word

#: seconds per Whisper encoder frame (two 10 ms mel frames: the conv stem's stride 2)
FRAME_SECONDS = 0.02
#: median filter width along time, in encoder frames (the references' ``medfilt_width``)
MEDIAN_WIDTH = 7


def alignment_heads(config: Any) -> list[tuple[int, int]]:
    """The ``(decoder layer, head)`` pairs to align with: the model's stored list, or, when it
    has none (an openai-whisper ``.pt`` file carries none), every head of the last half of the
    decoder layers (openai-whisper's own fallback; less sharp than the chosen heads)."""
    if config.alignment_heads:
        return [(int(layer), int(head)) for layer, head in config.alignment_heads]
    return [(layer, head) for layer in range(config.n_decoder_layers // 2, config.n_decoder_layers)
            for head in range(config.n_heads)]


# ---------------------------------------------------------------------------- the matrix
def median_filter(x: Tensor, width: int = MEDIAN_WIDTH) -> Tensor:
    """The median of each ``width`` frames along the last axis (edges mirrored): removes the
    one-frame spikes a head puts on a frame unrelated to its token. Too few frames: unchanged."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    padded = F.pad(x.reshape(1, -1, shape[-1]), (pad, pad), mode="reflect")
    return padded.unfold(-1, width, 1).median(-1).values.reshape(shape)


def alignment_matrix(weights: Tensor, frames: int, width: int = MEDIAN_WIDTH) -> Tensor:
    """One score per (position, frame), ``[positions, frames]``, from the alignment heads'
    cross-attention ``weights`` ``[heads, positions, all frames]``.

    * Only the first ``frames`` frames hold audio; each position's weights are renormalised over
      them (what a softmax over those frames alone gives), so padding takes no share.
    * Each head's column of a frame is standardised over the positions: a frame every position
      looks at (an attention sink) scores nothing, and the heads' scales become comparable.
    * A median filter along time (:func:`median_filter`); the mean over the heads.
    """
    w = weights[..., :frames].float()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = (w - mean) / std.clamp_min(1e-12)
    return median_filter(w, width).mean(0)


# ---------------------------------------------------------------------------- DTW
def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest path through ``cost`` ``[tokens, frames]`` from ``(0, 0)`` to the last cell,
    each step moving to the next frame, the next token, or both: ``(token, frame)`` index arrays
    along the path. Every token and every frame is on it, in order (monotone).

    The accumulated cost is computed a row (token) at a time: within a row a cell comes from the
    cell to its left or from the row above (``min`` of the two above it), and that recurrence is a
    running minimum over prefix sums, so each row is three numpy calls, not a loop over frames.
    Ties on the way back prefer the next frame, then the next token (the references' order).
    """
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        above = np.minimum(acc[i - 1, :-1], acc[i - 1, 1:])  # best way into column j from row i-1
        sums = np.cumsum(cost[i - 1], dtype=np.float64)
        before = np.concatenate(([0.0], sums[:-1]))
        acc[i, 1:] = sums + np.minimum.accumulate(above - before)
    return _backtrack(acc)


def _backtrack(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The path into the last cell of the accumulated costs ``acc`` ``[tokens + 1, frames + 1]``."""
    i, j = acc.shape[0] - 1, acc.shape[1] - 1
    tokens, frames = [], []
    while i > 0 and j > 0:
        tokens.append(i - 1)
        frames.append(j - 1)
        diagonal, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        if diagonal < up and diagonal < left:
            i, j = i - 1, j - 1
        elif up < diagonal and up < left:
            i -= 1
        else:
            j -= 1
    return np.array(tokens[::-1], dtype=np.int64), np.array(frames[::-1], dtype=np.int64)


def token_start_frames(cost: np.ndarray) -> np.ndarray:
    """The frame at which each token (row of ``cost``) starts on the cheapest path."""
    tokens, frames = dtw_path(cost)
    starts = np.zeros(cost.shape[0], dtype=np.int64)
    first = np.flatnonzero(np.diff(tokens, prepend=-1))  # where the path reaches a new token
    starts[tokens[first]] = frames[first]
    return starts


# ---------------------------------------------------------------------------- words
OPENING = set("\"'“‘¿¡([{«-")  # marks that belong to the word after them


def is_spoken(text: str) -> bool:
    """Whether a piece of text has a letter or a digit: marks (``.``, ``"``, ``-``) make no sound."""
    return any(ch.isalnum() for ch in text)


def token_units(tokens: Sequence[int], tokenizer: Any) -> list[tuple[str, int]]:
    """``(text, first token)`` per run of tokens that decodes to whole characters, the text with
    its leading space (a byte-level piece starting with ``Ġ``). Byte-level BPE may split one
    character (an accent, a CJK letter) across tokens, which alone decode to ``\ufffd``."""
    units: list[tuple[str, int]] = []
    start = 0
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(list(tokens[start:end]))
        if "\ufffd" not in text or end == len(tokens):
            space = " " if tokenizer.pieces([tokens[start]])[0].startswith(("\u0120", " ")) else ""
            units.append((space + text, start))
            start = end
    return units


def group_words(texts: Sequence[str]) -> list[list[int]]:
    """Units (runs of whole characters, with their leading space) grouped into words: the indices
    of each word's units.

    A unit with a leading space starts a word, any other continues the one before ("don" + "'t",
    "world" + "."), so the words are the transcript's words split at its spaces. A word of marks
    alone joins a neighbour: opening marks (`` "``, `` (``, `` -``) the word after them, any other
    the word before; with no such neighbour it stays a word.
    """
    words: list[list[int]] = []
    for k, text in enumerate(texts):
        if not words or text.startswith(" "):
            words.append([k])
        else:
            words[-1].append(k)
    merged: list[list[int]] = []
    pending: list[int] = []  # opening marks waiting for their word
    for units in words:
        text = "".join(texts[k] for k in units).strip()
        if is_spoken(text):
            merged.append(pending + units)
            pending = []
        elif set(text) <= OPENING:
            pending += units
        elif merged and not pending:
            merged[-1] += units
        else:
            pending += units
    if pending and merged:
        merged[-1] += pending  # marks at the very end: the last word's
    elif pending:
        merged.append(pending)  # nothing but marks: one word
    return merged


def words_from_starts(tokens: Sequence[int], starts: Sequence[float], tokenizer: Any,
                      probs: Sequence[float] | None = None, duration: float | None = None) -> list[Word]:
    """Words of the text ``tokens`` with times, from each token's start time ``starts`` (one more
    than the tokens: the last is the end token's, where the last word ends).

    A word starts where its first spoken unit (one with a letter or digit) starts and ends where
    the unit after its last spoken one starts: the marks it took in do not stretch it. ``score``
    is the mean probability of its tokens (``probs``). Times are clamped to ``duration``.
    """
    units = token_units(tokens, tokenizer)
    texts = [text for text, _ in units]
    firsts = [first for _, first in units] + [len(tokens)]
    words = []
    for group in group_words(texts):
        spoken = [k for k in group if is_spoken(texts[k])] or group
        first, after = firsts[spoken[0]], firsts[spoken[-1] + 1]
        start, end = float(starts[first]), float(starts[after])
        if duration is not None:
            start, end = min(start, duration), min(end, duration)
        score = float(np.mean(probs[firsts[group[0]]:firsts[group[-1] + 1]])) if probs is not None else 0.0
        words.append(Word("".join(texts[k] for k in group).strip(), start, max(start, end), score))
    return words


# ---------------------------------------------------------------------------- the model pass
@torch.inference_mode()
def whisper_word_times(model: SpeechTransformer, memory: Tensor, texts: Sequence[Sequence[int]],
                       audio_samples: Sequence[int], tokenizer: Any) -> list[list[Word]]:
    """Word times (seconds from each window's start) for the text tokens ``texts[b]`` that were
    decoded from ``memory[b]``, a window of ``audio_samples[b]`` samples.

    One teacher-forced decoder pass per window (its logits are ``[tokens, vocab]``: a batch of
    them would hold a lot of memory for little gain; the encoder, which dominates, is not rerun).
    """
    heads = alignment_heads(model.config)
    layers = sorted({layer for layer, _ in heads})
    prompt = list(tokenizer.prompt)  # with <|notimestamps|>, as the references align
    eot = tokenizer.eot
    hop = model.frontend.hop_length
    out: list[list[Word]] = []
    for row, (text, samples) in enumerate(zip(texts, audio_samples)):
        text = [t for t in text if t < eot]
        if not text:
            out.append([])
            continue
        tokens = torch.tensor([prompt + text + [eot]], device=memory.device)
        with capture_attention([model.decoder_layers[layer].cross_attn for layer in layers]) as maps:
            logits = model.decode(tokens, memory[row:row + 1], None)
        by_layer = dict(zip(layers, maps))
        weights = torch.stack([by_layer[layer][0][0, head] for layer, head in heads])  # [heads, positions, frames]
        frames = max(1, min(weights.shape[-1], samples // hop // 2))
        rows = slice(len(prompt) - 1, len(prompt) + len(text))  # the positions that predict text + end
        matrix = alignment_matrix(weights, frames)[rows]
        starts = token_start_frames(-matrix.double().cpu().numpy()) * FRAME_SECONDS
        probs = logits[0, rows][:-1, :eot].float().softmax(-1)
        chosen = probs.gather(1, torch.tensor(text, device=probs.device)[:, None])[:, 0].cpu().tolist()
        out.append(words_from_starts(text, starts, tokenizer, chosen, samples / model.config.sample_rate))
    return out
