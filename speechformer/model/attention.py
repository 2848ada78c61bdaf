"""Attention: a differentiable lookup.

Each query vector is compared with every key vector by a dot product (``Q K^T``); a
softmax turns the scores into weights that sum to one, and the output is the weighted
sum of the value rows. When a query matches one key exactly and the scores are sharp,
the weights are one-hot and attention *is* a table lookup of that key's value row;
when they are soft, it blends rows, and gradients flow through the blend.

A mask removes keys from the lookup: the causal mask hides the future from the decoder
(position t may only read positions <= t), the padding mask hides padded frames.

The arithmetic runs in :func:`torch.nn.functional.scaled_dot_product_attention`, which
picks a fused kernel (flash / memory-efficient on GPU, a fused CPU kernel otherwise) and
never writes the weights out. :func:`attention` below is that same formula written out:
:func:`capture_attention` makes chosen modules use it, and keep its weights, while the
context is open (``explain``, the tests' reference); a module's kernel can be swapped for a
faster one on some hardware (:mod:`speechformer.fastpath`), the model never does it itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """Boolean ``[length, length]`` mask, True where query t may attend key s (s <= t)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d)) V, written out. ``mask`` is boolean, True = may attend.

    Returns (output, weights). Shapes: q [..., Tq, d], k/v [..., Tk, d], mask broadcastable
    to [..., Tq, Tk].
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                    dropout_p: float = 0.0) -> Tensor:
    """The default kernel of :class:`MultiHeadAttention`: PyTorch's fused
    ``scaled_dot_product_attention`` (``mask`` boolean, True = may attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


#: an attention kernel: (q, k, v, mask, is_causal, dropout_p) -> output, as :func:`fused_attention`
Kernel = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool, float], Tensor]


class RotaryEmbedding(nn.Module):
    """Rotary positions (RoPE, Su et al. 2021): rotate each query and key by its position.

    Channel pairs (i, i + d/2) of a head are rotated by the angle ``p * w_i``, with
    frequencies w_i spaced geometrically from 1 to 1/base. A rotation by ``p * w`` of the query
    and by ``s * w`` of the key leaves their dot product a function of ``p - s`` only, so
    attention scores see *relative* positions, while the lookup itself is still
    ``softmax(Q K^T) V`` and runs in the fused kernel. Nothing is added to the stream.
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {head_dim}")
        half = head_dim // 2
        self.register_buffer("inv_freq", base ** (-torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` [..., T, head_dim] by positions ``offset .. offset + T - 1``."""
        t = x.shape[-2]
        angles = torch.arange(offset, offset + t, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class KVCache:
    """Preallocated keys and values of one attention layer for incremental decoding.

    ``k``/``v`` are [batch, heads, max_len, head_dim]; ``length`` positions are filled.
    Self-attention appends one step at a time; cross-attention fills it once with the
    projected encoder memory. ``reorder`` follows beam search's choice of parents.
    """

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.k = torch.empty(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            raise RuntimeError(f"KV cache full ({self.k.shape[2]} positions)")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reorder(self, index: Tensor) -> None:
        """Row i becomes row ``index[i]``; the batch may shrink (finished rows dropped)."""
        if index.shape[0] == self.k.shape[0]:  # beam search: permute the filled part in place
            n = self.length
            self.k[:, :, :n] = self.k[:, :, :n].index_select(0, index)
            self.v[:, :, :n] = self.v[:, :, :n].index_select(0, index)
        else:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


def _zero_key_grad(start: int, end: int, grad: Tensor) -> Tensor:
    """The fused bias's key slice gets no gradient: a model without a key bias keeps it at zero."""
    grad = grad.clone()
    grad[start:end] = 0
    return grad


def _after_load(module: "MultiHeadAttention", _incompatible: object) -> None:
    """``load_state_dict(assign=True)`` replaces the bias parameter: hold the new one's key rows too."""
    module._hold_key_bias_at_zero()


def _fuse_separate_projections(module: "MultiHeadAttention", state_dict: dict, prefix: str, *_: object) -> None:
    """Load-time conversion: state dicts written before the projections were fused (``.ckpt`` files,
    exported ``model.safetensors``, Whisper imports) hold ``query``/``key``/``value``; they become the
    fused ``qkv`` (self-attention) or ``kv`` (cross-attention) rows, a missing key bias as zeros."""
    fused, parts = ("kv", ("key", "value")) if module.cross else ("qkv", ("query", "key", "value"))
    if not all(f"{prefix}{name}.weight" in state_dict for name in parts):
        return  # the fused layout already, or incomplete (load_state_dict reports what is missing)
    weights, biases = [], []
    for name in parts:
        w = state_dict.pop(f"{prefix}{name}.weight")
        b = state_dict.pop(f"{prefix}{name}.bias", None)
        weights.append(w)
        biases.append(w.new_zeros(w.shape[0]) if b is None else b)
    state_dict[f"{prefix}{fused}.weight"] = torch.cat(weights)
    state_dict[f"{prefix}{fused}.bias"] = torch.cat(biases)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: several lookups in parallel, each in its own subspace.

    ``d_model`` is split into ``n_heads`` heads of ``d_model // n_heads`` dimensions; each
    head attends independently and the heads' outputs are concatenated and projected.
    Used for encoder self-attention, causal decoder self-attention and cross-attention
    (queries from the decoder, keys/values from the encoder memory). ``rotary=True``
    rotates queries and keys by their positions (:class:`RotaryEmbedding`) before the lookup.

    The projections are fused: self-attention computes queries, keys and values in one
    ``qkv`` matmul (``[3 d_model, d_model]``, rows q | k | v), cross-attention (``cross=True``)
    its keys and values from the memory in one ``kv`` matmul next to its ``query``: one
    activation cast and one kernel instead of three. ``key_bias=False`` (Whisper) keeps the
    key rows' bias at zero (a key bias shifts all of a query's scores equally, so softmax
    ignores it). State dicts with separate ``query``/``key``/``value`` load unchanged (converted
    by :func:`_fuse_separate_projections`).

    The lookup runs in ``kernel`` (:func:`fused_attention` unless :mod:`speechformer.fastpath`
    swapped it); while :func:`capture_attention` holds the module, ``recorder`` is a list and the
    written-out :func:`attention` runs instead, appending its weights there.
    """

    #: the attention kernel; an instance may be given another one with the same arguments
    kernel: Kernel = staticmethod(fused_attention)

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, key_bias: bool = True,
                 rotary: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.d_model = d_model
        self.dropout = dropout
        self.cross = cross
        if cross:
            self.query = nn.Linear(d_model, d_model)
            self.kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        self.key_bias = key_bias
        if not key_bias:
            with torch.no_grad():
                self._key_rows(self._fused().bias).zero_()
            self._hold_key_bias_at_zero()
        self.out = nn.Linear(d_model, d_model)
        # rotary positions (self-attention over a full sequence: the encoder)
        self.rotary = RotaryEmbedding(self.head_dim) if rotary else None
        self.register_load_state_dict_pre_hook(_fuse_separate_projections)
        self.register_load_state_dict_post_hook(_after_load)
        #: where the weights of each call go while :func:`capture_attention` holds the module (else None)
        self.recorder: list[Tensor] | None = None

    def _fused(self) -> nn.Linear:
        return self.kv if self.cross else self.qkv

    def _key_rows(self, x: Tensor) -> Tensor:
        start = 0 if self.cross else self.d_model
        return x[start:start + self.d_model]

    def _hold_key_bias_at_zero(self) -> None:
        """Without a key bias (Whisper), the fused bias's key rows never get a gradient (once per parameter)."""
        bias = self._fused().bias
        if self.key_bias or not isinstance(bias, nn.Parameter) or getattr(bias, "_key_rows_held", False):
            return
        start = 0 if self.cross else self.d_model
        bias.register_hook(partial(_zero_key_grad, start, start + self.d_model))
        bias._key_rows_held = True

    def _split(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, Dh]
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _heads(self, x: Tensor, n: int) -> tuple[Tensor, ...]:
        """[B, T, n * D] (n fused projections) -> n views [B, H, T, Dh]."""
        b, t, _ = x.shape
        return x.view(b, t, n, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``source`` split into heads (cached once for cross-attention)."""
        if self.cross:
            return self._heads(self.kv(source), 2)
        d = self.d_model  # a self-attention module asked for another sequence's keys: its k | v rows
        return self._heads(F.linear(source, self.qkv.weight[d:], self.qkv.bias[d:]), 2)

    def _query(self, x: Tensor) -> Tensor:
        if self.cross:
            return self._split(self.query(x))
        return self._split(F.linear(x, self.qkv.weight[:self.d_model], self.qkv.bias[:self.d_model]))

    def forward(
        self,
        x: Tensor,
        source: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        static_kv: bool = False,
    ) -> Tensor:
        """Attend from ``x`` [B, Tq, D] to ``source`` [B, Tk, D] (``x`` itself if None).

        mask: boolean, broadcastable to [B, H, Tq, Tk], True = may attend.
        is_causal: apply the causal mask (self-attention over a full sequence).
        cache: for incremental decoding. With ``static_kv`` the cache already holds the
            source's keys/values (cross-attention; it may hold one row per group of
            consecutive query rows, the beams of one utterance); otherwise the new
            keys/values are appended and the query attends to everything cached so far.
        """
        if cache is not None and static_kv:
            q = self._query(x)
            k, v = cache.k[:, :, :cache.length], cache.v[:, :, :cache.length]
        else:
            if source is None and not self.cross:
                q, k, v = self._heads(self.qkv(x), 3)  # one matmul for all three
            else:
                q, (k, v) = self._query(x), self.project_kv(x if source is None else source)
            if cache is not None:
                k, v = cache.append(k, v)
        if self.rotary is not None:
            if cache is not None or source is not None:
                raise ValueError("rotary positions are for self-attention over a whole sequence")
            q, k = self.rotary(q), self.rotary(k)
        group = q.shape[0] // k.shape[0]
        if group > 1:
            # beams share their utterance's memory: its keys/values are cached once, and the
            # `group` beams' queries attend to them together (as extra query positions),
            # instead of each beam reading its own copy
            b, h, t, dh = q.shape
            q = q.view(b // group, group, h, t, dh).transpose(1, 2).reshape(b // group, h, group * t, dh)
        tq, tk = q.shape[2], k.shape[2]
        if is_causal and tq != tk:  # new queries continue a cached past: they sit at the end
            if tq == 1:
                is_causal = False  # one new token may read the whole past
            else:
                pos = torch.arange(tk - tq, tk, device=q.device)[:, None]
                step_mask = torch.arange(tk, device=q.device)[None, :] <= pos
                mask, is_causal = (step_mask if mask is None else mask & step_mask), False
        if is_causal and mask is not None:  # fold the causal mask into the given one
            mask, is_causal = mask & causal_mask(q.shape[2], q.device), False
        if self.recorder is not None:  # asked for the weights: the formula they are the weights of
            y, weights = attention(q, k, v, causal_mask(q.shape[2], q.device) if is_causal else mask)
            if group > 1:  # one row of weights per beam
                weights = weights.view(weights.shape[0], h, group, t, tk).transpose(1, 2).reshape(b, h, t, tk)
            self.recorder.append(weights.detach().float())
        else:
            y = self.kernel(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)
        if group > 1:  # back to one row per beam
            y = y.view(y.shape[0], h, group, t, dh).transpose(1, 2).reshape(b, h, t, dh)
        b, h, t, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * dh))


@contextmanager
def capture_attention(modules: Iterable[MultiHeadAttention]) -> Iterator[list[list[Tensor]]]:
    """Record the attention weights of ``modules`` while the context is open.

    Yields one list per module; every call of that module appends its weights
    ``[batch, heads, queries, keys]`` (softmax(QK^T / sqrt(d) + mask), detached, float32; one
    row per beam when beams share their utterance's memory). The module computes its output
    from exactly these weights (the written-out formula instead of its kernel), so they are the
    weights behind its output, not a re-computation that could drift from it. Attention dropout
    is not applied to them (``explain`` runs in eval mode). Outside the context nothing
    changes: the kernel runs and no weights are computed.
    """
    modules = list(modules)
    for module in modules:
        if not isinstance(module, MultiHeadAttention):
            raise TypeError(f"capture_attention: {type(module).__name__} is not a MultiHeadAttention")
    if len({id(m) for m in modules}) != len(modules):
        raise ValueError("capture_attention: a module is listed twice")
    captured: list[list[Tensor]] = [[] for _ in modules]
    previous = [m.recorder for m in modules]
    for module, store in zip(modules, captured):
        module.recorder = store
    try:
        yield captured
    finally:
        for module, recorder in zip(modules, previous):
            module.recorder = recorder


def fused_layout(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``state`` with every attention module's separate ``query``/``key``/``value`` in the
    fused layout, for code that compares a state dict's names with ``model``'s before loading it
    (``transcribe.load_weights``); ``load_state_dict`` converts by itself."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            _fuse_separate_projections(module, state, f"{name}." if name else "")
    return state
