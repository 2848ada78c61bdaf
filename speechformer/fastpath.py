"""CPU inference fast path: linear layers with their weights prepacked for oneDNN.

``torch.ops.mkldnn._linear_pointwise`` with a weight reordered once by
``_reorder_linear_weight`` (the path inductor's CPU freezing uses) against PyTorch's default
fp32 ``addmm`` (MKL), on speechformer's inference shapes (benchmarks/cpu_matmul.py, 2-core
Xeon): 1.26x on a decoder step (16 rows), 1.38x on a 16-row de-embedding, but 0.80-1.12x on
encoder shapes (thousands of rows), results equal to ~1e-6. So the Transcriber prepacks the
*decoder's* linear layers (float32 inference on CPU only) and leaves the encoder on the default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight lives in oneDNN's blocked layout."""

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
