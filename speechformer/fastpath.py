"""Hardware tuning, switched on at the entry points: the model's own code never does it.

The model computes with PyTorch's plain kernels (``nn.Dropout``, fused
``scaled_dot_product_attention``, ``nn.Linear``). What is here is faster on some hardware and
gives the same numbers within rounding; each piece is applied by a call, by ``fit``
(:meth:`~speechformer.lightning.SpeechModule.on_fit_start`), by ``transcribe``/``evaluate``
(``cli``, :class:`~speechformer.transcribe.Transcriber`) and by the benchmarks:

* :func:`flush_denormals`: subnormal floats read as zero, process-wide (x86 CPUs compute on
  them far slower, and Adam's second moments and tiny gradients produce them); a Python
  program that builds a ``Transcriber`` itself calls it if it wants it;
* :func:`keep_freed_memory`: memory the process frees stays with it for the next allocation
  (glibc ``malloc``), instead of going back to the kernel and being faulted in again, page by
  page, at the next step; switched on by ``fit`` only (a training step allocates the same
  tensors every step);
* :func:`keep_compiled_kernels`: oneDNN keeps the CPU kernels it generates for many more tensor
  shapes, so a training run's hundreds of batch shapes are each compiled once, not every step;
  switched on by ``fit`` only;
* :func:`tune_for_training`: on CPU, dropout masks drawn one random byte per element
  (:class:`ByteMaskDropout`: ``bernoulli_`` dominated CPU dropout) and attention written out
  as plain matmuls (:func:`cpu_training_attention`: its backward beats the fused CPU kernel's),
  and the Conformer's depthwise convolution with a backward of its own
  (:func:`cpu_training_depthwise_conv`: the CPU kernel's weight and bias gradients were 97% of it);
* :func:`tune_for_inference`: on CPU in float32, the decoder's linear layers with their
  weights prepacked for oneDNN (:class:`PackedLinear`: faster at decoding's few rows, not at
  the encoder's thousands).

The measurements behind each choice are in benchmarks/README.md ("Hardware tuning").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model.attention import MultiHeadAttention, causal_mask, fused_attention
from .model.layers import ConvolutionModule, depthwise_conv


def flush_denormals() -> None:
    """Treat subnormal floats as zero in this process (and its threads), on CPUs that can."""
    torch.set_flush_denormal(True)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(largest: int = 1 << 30) -> bool:
    """Keep freed memory in this process for its next allocation (glibc ``malloc``); True if set.

    By default glibc serves an allocation of over 128 KiB-32 MiB (its threshold adapts) with a
    fresh ``mmap`` and gives it back to the kernel when it is freed, and it trims the heap's
    free top the same way. A training step allocates the same large activations every step
    (the stem's outputs alone are 10-80 MB), so every step then pays the kernel to fault those
    pages in again and zero them: 17,000 minor faults a step at the synthetic recipe's shape and
    180,000 (700 MB) at s2t-small's, measured, for 7-20% of the step. With allocations up to
    ``largest`` bytes served from the heap and the heap never trimmed, the pages are faulted
    in once. The process's resident memory then stays at its peak (a training step returns to
    it every step anyway). Elsewhere than glibc it does nothing and returns False.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    served_from_heap = mallopt(_M_MMAP_THRESHOLD, largest)
    never_trimmed = mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return bool(served_from_heap and never_trimmed)


#: The environment variables oneDNN reads its kernel cache's capacity from (the second is its old name).
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def keep_compiled_kernels(capacity: int = 65536) -> bool:
    """Let oneDNN keep the CPU kernels it generates for up to ``capacity`` of them; True if set here.

    oneDNN, the library behind PyTorch's CPU convolutions and bfloat16 matmuls, generates machine
    code for each new tensor shape and caches it, 1,024 kernels by default. A new batch shape of
    the synthetic recipe's bf16 step needs 61 of them (49 matmuls, at about 1.3 ms each on the AMX
    Xeon: 70 ms, half again the step), and training batches come in hundreds of shapes (their
    lengths and utterance counts vary; speed perturbation multiplies the lengths by three), so
    with the default cache every step compiled its kernels again. With room for 65,536 each shape
    is compiled once per run (the recipe's epochs 1.27x faster), at a price in memory: the recipe's
    training process held 5.2 GB instead of 2.6 (measured side by side). Where memory is short, set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (1024 is oneDNN's default) before training.

    oneDNN reads the setting from the environment once, when it generates its first kernel in the
    process: called after that, the call changes nothing. A capacity the user set in the
    environment is left as it is (and False returned).
    """
    if any(name in os.environ for name in ONEDNN_CACHE_VARIABLES):
        return False
    os.environ[ONEDNN_CACHE_VARIABLES[0]] = str(capacity)
    return True


# ---------------------------------------------------------------------------- training
class _ByteMaskFunction(torch.autograd.Function):
    """Dropout whose keep-mask comes from one random byte per element."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: int) -> Tensor:  # type: ignore[override]
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= threshold
        ctx.scale = 256.0 / (256 - threshold)
        ctx.save_for_backward(keep)
        return torch.where(keep, x * ctx.scale, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None


class ByteMaskDropout(nn.Module):
    """``nn.Dropout`` whose CPU mask is one random byte per element (``torch.randint`` over int64
    words viewed as bytes), a fraction of the cost of ``bernoulli_``; ``p`` is then rounded to a
    multiple of 1/256. Off the CPU, it is ``F.dropout``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 256)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.threshold == 0:
            return nn.functional.dropout(x, self.p, training=True)
        return _ByteMaskFunction.apply(x, self.threshold)

    def extra_repr(self) -> str:
        return f"p={self.p}, byte mask on CPU"


def cpu_training_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                           dropout_p: float = 0.0) -> Tensor:
    """An attention kernel (:data:`~speechformer.model.attention.Kernel`) for training on CPU.

    With gradients on a CPU, in bf16 (autocast) and no attention dropout: softmax(Q K^T / sqrt(d)) V
    as plain matmuls, the scale and the mask applied in place to the scores (two fewer
    ``[..., Tq, Tk]`` tensors per layer; autograd allows it: the score matmul's backward needs
    its inputs, not its output). Otherwise (float32, inference, a GPU, attention dropout) the fused
    kernel: in float32 its forward + backward is the faster one (1.2-1.8x at the recipe's and
    s2t-small's shapes on the 2-core Xeon), in bf16 the written-out formula (1.5-3.5x).
    """
    if q.device.type != "cpu" or not torch.is_grad_enabled() or dropout_p or q.dtype == torch.float32:
        return fused_attention(q, k, v, mask, is_causal, dropout_p)
    if is_causal:
        mask = causal_mask(q.shape[2], q.device)
    scores = q @ k.transpose(-2, -1)
    scores.mul_(1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class _DepthwiseConvFunction(torch.autograd.Function):
    """:func:`~speechformer.model.layers.depthwise_conv` with its weight and bias gradients computed
    as what they are, a correlation of the input with the output gradient and a sum.

    oneDNN's CPU backward of a depthwise convolution takes 2.6 ms for the weight gradient and
    2.0 ms for the bias gradient at the synthetic recipe's shape (30 x 32 frames x 192 channels,
    kernel 15, bf16), against 0.15 ms for the input gradient. The weight gradient
    ``dW[d, k] = sum_{b,t} dY[b, t, d] X[b, t + k - K//2, d]`` is itself a depthwise
    convolution, of the padded input with the output gradient as the kernel: 0.24 ms.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return depthwise_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        d, k = weight.shape[0], weight.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the convolution's own input gradient: fast
            g4, x4 = grad.transpose(1, 2).unsqueeze(2), x.transpose(1, 2).unsqueeze(2)
            grad_x = torch.ops.aten.convolution_backward(
                g4, x4, weight.unsqueeze(2), None, [1, 1], [0, k // 2], [1, 1], False, [0, 0], d,
                [True, False, False])[0].squeeze(2).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            padded = F.pad(x, (0, 0, k // 2, k // 2))  # [B, T + K - 1, D]
            # as [1, D, B, T + K - 1] (channels-last: no copy), against the kernel dY [D, 1, B, T]
            kernel = grad.permute(2, 0, 1).unsqueeze(1).contiguous(memory_format=torch.channels_last)
            grad_w = F.conv2d(padded.unsqueeze(0).permute(0, 3, 1, 2), kernel, groups=d).view(d, 1, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 1))
        return grad_x, grad_w, grad_b


def cpu_training_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A depthwise-convolution kernel (:attr:`~speechformer.model.layers.ConvolutionModule.depthwise_kernel`)
    for training on CPU: :func:`~speechformer.model.layers.depthwise_conv`, with the backward of
    :class:`_DepthwiseConvFunction`. Under autocast it computes in autocast's dtype, as the
    convolution would. Otherwise (a GPU, no gradients) the plain kernel."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return depthwise_conv(x, weight, bias)
    if torch.is_autocast_enabled("cpu"):  # the casts autocast would make, as autograd ops of their own
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast("cpu", enabled=False):
        return _DepthwiseConvFunction.apply(x, weight, bias)


def tune_for_training(model: nn.Module) -> nn.Module:
    """``model`` (in place) with the CPU training kernels: every dropout module becomes a
    :class:`ByteMaskDropout`, every attention module runs :func:`cpu_training_attention`, every
    Conformer convolution module's depthwise convolution :func:`cpu_training_depthwise_conv`.

    Both fall back to the plain kernels off the CPU, so the model may still move to a GPU, and
    neither holds state: the state dict and checkpoints are unchanged. Returns ``model``.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, name, ByteMaskDropout(child.p).train(child.training))
        if isinstance(parent, MultiHeadAttention):
            parent.kernel = cpu_training_attention
        if isinstance(parent, ConvolutionModule):
            parent.depthwise_kernel = cpu_training_depthwise_conv
    return model


# ---------------------------------------------------------------------------- inference
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight lives in oneDNN's blocked layout.

    ``torch.ops.mkldnn._linear_pointwise`` with a weight reordered once by
    ``_reorder_linear_weight`` (the path inductor's CPU freezing uses), instead of PyTorch's
    default fp32 ``addmm`` (MKL); results equal to ~1e-6.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().float().contiguous(), 64)
        self.bias = linear.bias.detach().float() if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.float(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"


def prepack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` (on CPU, float32) by a :class:`PackedLinear`.

    The model becomes inference-only (no gradients, no state-dict weights for those layers);
    returns the number of layers replaced, 0 when oneDNN is not available.
    """
    if not onednn_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def tune_for_inference(model: nn.Module, device: str | torch.device, precision: str = "fp32") -> int:
    """Prepack the decoder's linear layers of a :class:`~speechformer.model.SpeechTransformer` for
    float32 inference on CPU (the decoder is inference-only from then on); the encoder keeps the
    default, which is as fast at its shapes. Returns the number of layers prepacked (0 elsewhere)."""
    if torch.device(device).type != "cpu" or precision != "fp32":
        return 0
    return prepack_linears(model.decoder_layers)
