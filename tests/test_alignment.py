"""Whisper word times (speechformer/alignment.py) without a model: dynamic time warping against a
plain dynamic program, the attention normalisation on synthetic heads whose path is known, the
grouping of byte-level BPE tokens into words, and the config that carries the alignment heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechformer.alignment import alignment_heads, alignment_matrix, dtw_path, token_start_frames, words_from_starts
from speechformer.model import ModelConfig


def plain_dtw(cost: np.ndarray) -> tuple[list[int], list[int]]:
    """The textbook recurrence, a cell at a time: the oracle for the row-vectorised dtw_path."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    i, j, path = n, m, []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        d, u, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        if d < u and d < left:
            i, j = i - 1, j - 1
        elif u < d and u < left:
            i -= 1
        else:
            j -= 1
    tokens, frames = zip(*path[::-1])
    return list(tokens), list(frames)


def test_dtw_finds_the_known_path_and_equals_the_plain_recurrence():
    # 4 tokens over 20 frames: token k owns frames bounds[k]..bounds[k+1]-1 (score 1 there, -1 elsewhere)
    bounds = [0, 3, 9, 10, 20]
    score = -np.ones((4, 20))
    for k in range(4):
        score[k, bounds[k]:bounds[k + 1]] = 1.0
    tokens, frames = dtw_path(-score)
    assert list(frames) == list(range(20))  # every frame once: the path is one token per frame here
    assert list(tokens) == [k for k in range(4) for _ in range(bounds[k + 1] - bounds[k])]
    assert list(token_start_frames(-score)) == bounds[:-1]
    # more tokens than frames: the path still visits every token, in order
    tall = np.random.default_rng(1).random((7, 3))
    t, f = dtw_path(tall)
    assert sorted(set(t)) == list(range(7)) and list(f) == sorted(f) and f[-1] == 2
    # random costs: the same path as the cell-by-cell recurrence
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 9), (9, 1), (5, 40), (12, 30), (30, 200)]:
        cost = rng.normal(size=shape)
        ours = dtw_path(cost)
        assert (list(ours[0]), list(ours[1])) == plain_dtw(cost), shape


def diagonal_heads(bounds: list[int], frames: int, total: int, heads: int = 3) -> torch.Tensor:
    """Cross-attention ``[heads, positions, total frames]`` of positions that each look at their
    token's frames (``bounds``), plus an attention sink: frame 0 takes most of every position's
    weight, and the padding past ``frames`` takes much of the rest."""
    n = len(bounds) - 1
    w = torch.full((heads, n, total), 0.01)
    for k in range(n):
        w[:, k, bounds[k]:bounds[k + 1]] = 1.0
    w[:, :, 0] = 40.0  # the sink: every token, every head
    w[:, :, frames:] = 5.0  # padding of the 30 s window
    w[1] *= 3.0  # heads of another scale
    return w / w.sum(-1, keepdim=True)


def test_normalised_attention_aligns_past_an_attention_sink_and_the_padding():
    bounds = [1, 6, 14, 20, 30]
    w = diagonal_heads(bounds, frames=30, total=60)
    raw = w.mean(0)[:, :30]
    assert (raw.argmax(-1) == 0).all()  # raw weights: every token looks at the sink
    matrix = alignment_matrix(w, frames=30)
    assert matrix.shape == (4, 30)
    assert list(token_start_frames(-matrix.double().numpy())) == [0] + bounds[1:-1]  # the path starts at frame 0


@pytest.mark.parametrize("layers,heads,stored,expected", [
    (4, 6, [[1, 0], [3, 4]], [(1, 0), (3, 4)]),
    (4, 2, [], [(2, 0), (2, 1), (3, 0), (3, 1)]),  # none stored: the last half of the decoder layers
])
def test_alignment_heads_stored_or_the_last_half(layers, heads, stored, expected):
    config = ModelConfig(n_decoder_layers=layers, n_heads=heads, d_model=heads * 16, alignment_heads=stored)
    assert alignment_heads(config) == expected
    assert ModelConfig.from_dict(config.to_dict()).alignment_heads == stored


@pytest.mark.parametrize("value", [[[4, 0]], [[0, 6]], [[1]], [[1, "2"]], "1,0"])
def test_alignment_heads_outside_the_model_are_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="alignment_heads"):
        ModelConfig.from_dict({"n_decoder_layers": 4, "n_heads": 6, "d_model": 96, "alignment_heads": value})


class PieceTokenizer:
    """Byte-level BPE's interface over a made-up vocabulary: ``Ġ`` marks a leading space; the last
    two ids are the halves of one accented letter (each alone decodes to the replacement character)."""

    VOCAB = ["Ġ\"", "Hello", ",", "Ġdon", "'t", "Ġ-", "Ġyes", "Ġ3", ".", "5", "Ġcaf", "\xc3", "\xa9", "Ġ(", "ok", ")."]

    def pieces(self, ids):
        return [self.VOCAB[i] for i in ids]

    def decode(self, ids):
        raw = "".join(self.VOCAB[i] for i in ids).replace("Ġ", " ")
        data = bytes(ord(c) if ord(c) < 256 else 32 for c in raw)
        return data.decode("utf-8", errors="replace").strip()


def test_tokens_group_into_the_transcripts_words_with_punctuation_on_its_neighbour():
    tok = PieceTokenizer()
    #        "  Hello  ,  don 't  -  yes  3  .  5  caf  é(2 tokens)  (  ok  ).
    tokens = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    starts = [float(i) for i in range(len(tokens) + 1)]  # token i starts at i s; the end token at 16 s
    probs = [0.5] * len(tokens)
    words = words_from_starts(tokens, starts, tok, probs)
    assert [w.word for w in words] == ['"Hello,', "don't", "- yes", "3.5", "café", "(ok)."]
    # a word runs from its first spoken token to the token after its last spoken one: the opening
    # quote and the comma do not stretch "Hello"; "3.5" spans its three tokens; the two halves of
    # "é" are one character; ")." closes "ok"
    assert [(w.start, w.end) for w in words] == [(1, 2), (3, 5), (6, 7), (7, 10), (10, 13), (14, 15)]
    assert all(w.score == 0.5 for w in words)
    assert [(w.start, w.end) for w in words_from_starts(tokens, starts, tok, duration=12.5)][-2:] == [
        (10, 12.5), (12.5, 12.5)]  # clamped to the window's audio
