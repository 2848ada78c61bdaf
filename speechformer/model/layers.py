"""The building blocks: positions, subsampling, feed-forward, encoder and decoder layers.

Every layer is *pre-LayerNorm*: each sub-block reads a normalised copy of the stream
and adds its result back (``x = x + block(norm(x))``). The skip connection keeps an
unobstructed path for the signal and the gradient through a deep stack; layer
normalisation keeps each position's vector at zero mean and unit variance so the
blocks see inputs of a stable scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Sinusoidal positional encoding, ``[length, channels]``.

    Position p gets ``sin(p * w_i)`` in the first half of the channels and
    ``cos(p * w_i)`` in the second, with frequencies w_i spaced geometrically from 1 to
    1/max_timescale: fast wiggles tell neighbours apart, slow ones tell far positions
    apart, every value stays in [-1, 1]. This is the layout OpenAI Whisper uses (the
    halves concatenated rather than interleaved), so its encoder positions are ours.
    """
    if channels % 2:
        raise ValueError(f"sinusoids need an even number of channels, got {channels}")
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class _Positions(nn.Module):
    """Adds row ``offset + t`` of a position table to the t-th vector of a sequence."""

    table: Tensor

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        length = x.shape[1]
        if offset + length > self.table.shape[0]:
            raise ValueError(f"sequence of {offset + length} positions exceeds the maximum {self.table.shape[0]}")
        return x + self.table[offset:offset + length].to(x.dtype)


class SinusoidalPositions(_Positions):
    """Fixed sinusoidal positions (a buffer, not learned).

    ``stored=True`` keeps the table in the checkpoint: Whisper checkpoints ship their
    sinusoids rounded to float16, and the reference engines add those rounded values.
    """

    def __init__(self, max_len: int, d_model: int, stored: bool = False) -> None:
        super().__init__()
        self.register_buffer("table", sinusoids(max_len, d_model), persistent=stored)


class LearnedPositions(_Positions):
    """A learned vector per position (Whisper's decoder)."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.empty(max_len, d_model).normal_(std=0.01))


class Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions over (time, mel): 4x fewer frames, then a linear to d_model.

    Speech frames come every 10 ms; attention over them is quadratic in length, and
    neighbouring frames are highly redundant, so the encoder works at 40 ms steps.
    """

    def __init__(self, n_mels: int, d_model: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(),
        )
        freq = ((n_mels - 1) // 2 - 1) // 2
        self.proj = nn.Linear(channels * freq, d_model)
        # Normalised output: the residual stream starts at unit scale, the size of the positions
        # added next. Without it the projection was seen to grow to ~20x that size in training,
        # drowning every layer's update (and the positions) and slowing learning.
        self.norm = nn.LayerNorm(d_model)

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        return ((lengths - 1) // 2 - 1) // 2

    def forward(self, x: Tensor) -> Tensor:  # [B, T, F] -> [B, T', D]
        y = self.conv(x.unsqueeze(1))  # [B, C, T', F']
        b, c, t, f = y.shape
        return self.norm(self.proj(y.transpose(1, 2).reshape(b, t, c * f)))


class Conv1dSubsampling(nn.Module):
    """Whisper's stem: conv1d(k3) + GELU, conv1d(k3, stride 2) + GELU: 2x fewer frames."""

    def __init__(self, n_mels: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)
        self.act = nn.GELU()

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        return (lengths - 1) // 2 + 1

    def forward(self, x: Tensor) -> Tensor:  # [B, T, F] -> [B, T', D]
        x = self.act(self.conv1(x.transpose(1, 2)))
        return self.act(self.conv2(x)).transpose(1, 2)


class FeedForward(nn.Module):
    """Position-wise two-layer MLP: widen to d_ff, non-linearity, project back."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Self-attention over all frames, then feed-forward; each with skip + pre-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str, key_bias: bool, eps: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.attn = MultiHeadAttention(d_model, n_heads, attention_dropout, key_bias)
        self.ff_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, need_weights: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        y, weights = self.attn(self.attn_norm(x), mask=mask, need_weights=need_weights)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ff(self.ff_norm(x)))
        return x, weights


class DecoderLayer(nn.Module):
    """Masked self-attention over the tokens so far, cross-attention into the encoder
    memory, then feed-forward; each with skip + pre-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str, key_bias: bool, eps: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, key_bias)
        self.cross_norm = nn.LayerNorm(d_model, eps=eps)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, key_bias)
        self.ff_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        # Causal: position t reads positions <= t (with a cache, the past is in the cache).
        y, _ = self.self_attn(self.self_norm(x), is_causal=True, cache=self_cache)
        x = x + self.dropout(y)
        y, cross_weights = self.cross_attn(
            self.cross_norm(x), source=memory, mask=memory_mask,
            cache=cross_cache, static_kv=cross_cache is not None and cross_cache.length > 0,
            need_weights=need_weights,
        )
        x = x + self.dropout(y)
        x = x + self.dropout(self.ff(self.ff_norm(x)))
        return x, cross_weights
