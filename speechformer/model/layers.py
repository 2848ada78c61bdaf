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
import torch.nn.functional as F
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


def pad_to_receptive_field(x: Tensor, min_frames: int) -> Tensor:
    """``x`` [B, T, F] with zero frames appended up to ``min_frames`` (unchanged if T is enough).

    A subsampler's convolutions need ``min_frames`` input frames for one output frame; a
    shorter clip (a 50 ms file is 6 frames), or a batch of only such clips, would stop the
    whole run with a convolution error. Zero is what padding inside a batch already is (the
    normalised mean), so a short clip alone reads the same input as in a batch, and the
    model's length mask (``output_lengths``, at least 1) keeps only the real output frame.
    """
    short = min_frames - x.shape[1]
    return nn.functional.pad(x, (0, 0, 0, short)) if short > 0 else x


class _UnpaddedStem(nn.Module):
    """What the trainable stems share: ``layers`` unpadded stride-2 convolutions ``kernel_size``
    frames wide, so an output frame reads only frames of its own clip."""

    kernel_size: int

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = layers
        #: input frames one output frame needs (the receptive field of the convolutions)
        self.min_frames = self.kernel_size
        for _ in range(layers - 1):
            self.min_frames = 2 * (self.min_frames - 1) + self.kernel_size

    @classmethod
    def lengths_after(cls, lengths: Tensor, layers: int = 2) -> Tensor:
        """Output frames of ``layers`` of the convolutions (at least 1: clips under ``min_frames``
        are padded to one)."""
        for _ in range(layers):
            lengths = (lengths - cls.kernel_size) // 2 + 1
        return lengths.clamp(min=1)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return self.lengths_after(lengths, self.layers)

    @property
    def centre_offset(self) -> int:
        """Output frame k is centred on input frame ``2^layers * k + centre_offset``: each layer
        centres its output j on input frame 2j + (kernel_size - 1) / 2."""
        return (self.kernel_size - 1) // 2 * (2 ** self.layers - 1)


class Conv2dSubsampling(_UnpaddedStem):
    """3x3 stride-2 convolutions over (time, mel), each halving the frame rate, then a linear to d_model.

    Speech frames come every 10 ms; attention over them is quadratic in length, and
    neighbouring frames are highly redundant, so the encoder works at 40 ms steps (two
    convolutions) or 80 ms (three: half the encoder's work again, for short-token vocabularies).
    """

    kernel_size = 3

    def __init__(self, n_mels: int, d_model: int, channels: int, layers: int = 2) -> None:
        super().__init__(layers)
        convs: list[nn.Module] = []
        for i in range(layers):  # ReLU in place: conv outputs are not kept for the backward
            convs += [nn.Conv2d(1 if i == 0 else channels, channels, 3, stride=2), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*convs)
        freq = n_mels
        for _ in range(layers):
            freq = (freq - 1) // 2
        self.proj = nn.Linear(channels * freq, d_model)
        # Normalised output: the residual stream starts at unit scale, the size of the positions
        # added next. Without it the projection was seen to grow to ~20x that size in training,
        # drowning every layer's update (and the positions) and slowing learning.
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, F] -> [B, T', D]
        # Channels-last: x [B, T, F] viewed as [B, 1, T, F] with the channel stride last (no copy),
        # so the convolutions compute and write [B, T', F', C] in memory, the layout oneDNN's CPU
        # kernels are fast in (bf16: 1.8x the stem's forward + backward against [B, C, T', F']).
        y = self.conv(pad_to_receptive_field(x, self.min_frames).unsqueeze(3).permute(0, 3, 1, 2))
        b, c, t, f = y.shape
        # Each output frame's C x F' values go to the projection. The weight's columns are in
        # (C, F') order (the checkpoints' layout); the frames lie in memory as [B, T', F', C], so
        # the weight (small) is reordered to (F', C) and the activations (large) are read as a
        # view: no copy of them forward, none of their gradient backward.
        if type(self.proj) is nn.Linear:
            weight = self.proj.weight.view(-1, c, f).transpose(1, 2).reshape(-1, f * c)
            frames = y.permute(0, 2, 3, 1).reshape(b, t, f * c)
            return self.norm(nn.functional.linear(frames, weight, self.proj.bias))
        # a projection that is not a plain Linear (fastpath.prepack_linears' inference kernel, or one
        # a user wrapped) is called as it is, on the frames copied into (C, F') order
        return self.norm(self.proj(y.transpose(1, 2).reshape(b, t, c * f)))


class Conv1dGLUSubsampling(_UnpaddedStem):
    """5-wide stride-2 convolutions over time, each followed by a GLU (Speech2Text's stem).

    Each mel frame vector is one input channel vector: a convolution mixes 5 neighbouring frames
    and halves the frame rate (2 layers: 40 ms, 3: 80 ms); its output has twice the channels, and
    the GLU lets one half gate the other. The last layer's GLU gives ``d_model``. Unlike
    Speech2Text's, the convolutions are unpadded, as the conv2d stem's: an output frame reads only
    frames of its own clip, so a clip's encoding does not depend on the padding of its batch.
    Every convolution is matmul-shaped (all mel bins at once), so it trains at the matmul rate:
    at s2t-small's shape its forward + backward is 0.34x (fp32) and 0.48x (bf16) the time of a
    128-channel conv2d stem (benchmarks/README.md). (As one matmul over ``Tensor.unfold``-ed
    windows of time-major frames it measured the same: PyTorch's convolution is kept.)
    """

    kernel_size = 5

    def __init__(self, n_mels: int, d_model: int, channels: int, layers: int = 2) -> None:
        super().__init__(layers)  # 13 input frames for one output frame with two layers, 29 with three
        widths = [n_mels] + [channels] * (layers - 1) + [d_model]
        self.convs = nn.ModuleList(nn.Conv1d(widths[i], 2 * widths[i + 1], self.kernel_size, stride=2)
                                   for i in range(layers))
        self.norm = nn.LayerNorm(d_model)  # unit-scale residual stream, as Conv2dSubsampling's

    def forward(self, x: Tensor) -> Tensor:  # [B, T, F] -> [B, T', D]
        x = pad_to_receptive_field(x, self.min_frames).transpose(1, 2)  # channels (mel bins) first
        for conv in self.convs:
            x = nn.functional.glu(conv(x), dim=1)
        return self.norm(x.transpose(1, 2))


#: the stems a model can be trained with, by ``ModelConfig.subsampling`` (Whisper's ``conv1d`` aside)
UNPADDED_STEMS: dict[str, type[_UnpaddedStem]] = {"conv2d": Conv2dSubsampling, "conv1d_glu": Conv1dGLUSubsampling}


class Conv1dSubsampling(nn.Module):
    """Whisper's stem: conv1d(k3) + GELU, conv1d(k3, stride 2) + GELU: 2x fewer frames."""

    #: input frames one output frame needs: both convolutions pad by one, so a single frame does
    min_frames = 1
    #: output frame k is centred on input frame 2k (stride 2, padded by one)
    centre_offset = 0

    def __init__(self, n_mels: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)
        self.act = nn.GELU()

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        return (lengths - 1) // 2 + 1

    def forward(self, x: Tensor) -> Tensor:  # [B, T, F] -> [B, T', D]
        x = self.act(self.conv1(pad_to_receptive_field(x, self.min_frames).transpose(1, 2)))
        return self.act(self.conv2(x)).transpose(1, 2)


class Dropout(nn.Dropout):
    """``nn.Dropout``, not called at all where it does nothing (evaluation, ``p = 0``): decoding
    passes a dozen of them per token. :func:`speechformer.fastpath.tune_for_training` swaps in
    a CPU-friendlier mask."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if self.training and self.p > 0 else x


class FeedForward(nn.Module):
    """Position-wise two-layer MLP: widen to d_ff, non-linearity, project back."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        # Not in place: fc1's output is a view (of the [B*T, d_ff] matmul), and an in-place op on a
        # view makes autograd rebuild the base in backward (CopySlices: three copies of the widest
        # activation and a zero fill per layer)
        self.act = {"gelu": nn.GELU, "silu": nn.SiLU}.get(activation, nn.ReLU)()
        self.dropout = Dropout(dropout)  # on the wide activations (config: activation_dropout)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Self-attention over all frames, then feed-forward; each with skip + pre-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str, key_bias: bool, eps: float, activation_dropout: float = 0.0,
                 rotary: bool = False) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.attn = MultiHeadAttention(d_model, n_heads, attention_dropout, key_bias, rotary=rotary)
        self.ff_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff = FeedForward(d_model, d_ff, activation_dropout, activation)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask=mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Each channel of ``x`` [B, T, D] convolved over time with its own kernel (``weight`` [D, 1, K]
    of an ``nn.Conv1d(D, D, K, padding=K // 2, groups=D)``, whose output it equals); [B, T, D].

    The frames stay time-major: the convolution reads them as a channels-last [B, D, 1, T] view
    (no copy) and writes its output the same way, where a ``Conv1d`` over [B, D, T] would copy
    them into channel-major order and back (the CPU kernels are also 10x faster channels-last).
    """
    k = weight.shape[-1]
    y = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias, padding=(0, k // 2), groups=x.shape[-1])
    return y.squeeze(2).transpose(1, 2)


class ConvolutionModule(nn.Module):
    """The Conformer's convolution module: local patterns that attention models poorly.

    pointwise conv (d -> 2d) -> GLU (a learnt gate halves it back to d) -> depthwise conv
    (each channel over ``kernel_size`` neighbouring frames) -> norm -> SiLU -> pointwise conv.
    Padded frames are zeroed before the depthwise convolution, so an utterance's frames
    read the same zeros past its end whether it is alone or padded inside a batch.

    The frames stay [B, T, D] throughout: a pointwise (kernel 1) convolution is a linear layer
    applied to every frame, so it runs as one (``F.linear`` on the ``Conv1d``'s own weight: the
    parameters, and so checkpoints, are a ``Conv1d``'s), and the depthwise convolution runs in
    ``depthwise_kernel`` (:func:`depthwise_conv` unless :mod:`speechformer.fastpath` swapped it).

    ``norm="layer"`` (the default) normalises each frame on its own: the output does not
    depend on the rest of the batch in training either, and nothing changes between
    training and inference. ``norm="batch"`` is the paper's BatchNorm (statistics over the
    batch's frames, padding excluded only at inference through the running averages).
    """

    #: the depthwise convolution's kernel; an instance may be given another one with the same arguments
    depthwise_kernel = staticmethod(depthwise_conv)

    def __init__(self, d_model: int, kernel_size: int, norm: str = "layer", eps: float = 1e-5) -> None:
        super().__init__()
        self.pointwise1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.norm: nn.Module = nn.BatchNorm1d(d_model) if norm == "batch" else nn.LayerNorm(d_model, eps=eps)
        self.act = nn.SiLU()
        self.pointwise2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        """x [B, T, D]; ``pad`` [B, T] True at padded frames."""
        y = F.glu(F.linear(x, self.pointwise1.weight[..., 0], self.pointwise1.bias), dim=-1)  # [B, T, D]
        if pad is not None:
            y = y.masked_fill(pad[..., None], 0.0)
        y = self.depthwise_kernel(y, self.depthwise.weight, self.depthwise.bias)
        if isinstance(self.norm, nn.LayerNorm):
            y = self.norm(y)
        else:  # BatchNorm1d: channels second
            y = self.norm(y.transpose(1, 2)).transpose(1, 2)
        return F.linear(self.act(y), self.pointwise2.weight[..., 0], self.pointwise2.bias)


class ConformerLayer(nn.Module):
    """A Conformer block (Gulati et al. 2020): a macaron of two half-step feed-forwards
    around self-attention and convolution, then a LayerNorm.

    ``x + ½ FF(x)  ->  + MHSA  ->  + Conv  ->  + ½ FF  ->  LayerNorm`` (the last one optional), each sub-block
    pre-LayerNorm with a skip connection. Attention relates any two frames; the
    convolution module sees a fixed neighbourhood, which is where most of the acoustic
    detail is. The feed-forwards use SiLU (Swish), as the paper.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 key_bias: bool, eps: float, activation_dropout: float = 0.0, rotary: bool = True,
                 kernel_size: int = 15, conv_norm: str = "layer", final_norm: bool = True) -> None:
        super().__init__()
        self.ff1_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff1 = FeedForward(d_model, d_ff, activation_dropout, "silu")
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.attn = MultiHeadAttention(d_model, n_heads, attention_dropout, key_bias, rotary=rotary)
        self.conv_norm = nn.LayerNorm(d_model, eps=eps)
        self.conv = ConvolutionModule(d_model, kernel_size, conv_norm, eps)
        self.ff2_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff2 = FeedForward(d_model, d_ff, activation_dropout, "silu")
        # final_norm=False keeps the stream a pre-LN residual path from block to block (see config)
        self.out_norm: nn.Module = nn.LayerNorm(d_model, eps=eps) if final_norm else nn.Identity()
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` is the encoder's [B, 1, 1, T] key mask (True = real frame) or None."""
        x = x + 0.5 * self.dropout(self.ff1(self.ff1_norm(x)))
        x = x + self.dropout(self.attn(self.attn_norm(x), mask=mask))
        pad = ~mask[:, 0, 0, :] if mask is not None else None
        x = x + self.dropout(self.conv(self.conv_norm(x), pad))
        x = x + 0.5 * self.dropout(self.ff2(self.ff2_norm(x)))
        return self.out_norm(x)


class DecoderLayer(nn.Module):
    """Masked self-attention over the tokens so far, cross-attention into the encoder
    memory, then feed-forward; each with skip + pre-LayerNorm.

    ``cross_attention=False`` leaves the middle block out: the layer of a language model
    (:mod:`speechformer.lm`), the decoder stack alone, which reads no memory."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str, key_bias: bool, eps: float, activation_dropout: float = 0.0,
                 cross_attention: bool = True) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, key_bias)
        self.cross_norm = nn.LayerNorm(d_model, eps=eps) if cross_attention else None
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, key_bias,
                                             cross=True) if cross_attention else None
        self.ff_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff = FeedForward(d_model, d_ff, activation_dropout, activation)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        # Causal: position t reads positions <= t (with a cache, the past is in the cache).
        x = x + self.dropout(self.self_attn(self.self_norm(x), is_causal=True, cache=self_cache))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(
                self.cross_norm(x), source=memory, mask=memory_mask,
                cache=cross_cache, static_kv=cross_cache is not None and cross_cache.length > 0,
            ))
        return x + self.dropout(self.ff(self.ff_norm(x)))
