"""Model FLOPs of a training step, from the config and the batch shape (for MFU, as nanoGPT does).

Counts the matrix multiplies (2 FLOPs per multiply-add) of the forward pass: the conv
subsampling, every linear layer, the attention score and mixing products, the
de-embedding and the CTC head. A training step is 3x the forward (backward ~ 2x).
Element-wise work (norms, softmax, activations) is ignored, as is usual for MFU.
"""

from __future__ import annotations

from .model.config import ModelConfig


def stem_flops(config: ModelConfig, frames: int) -> tuple[int, int]:
    """FLOPs of the subsampling stem over one utterance of ``frames`` mel frames, and the encoder
    frames it makes."""
    c = config
    d = c.d_model
    if c.subsampling == "conv2d":
        ch = c.subsampling_channels or d
        t, f = (frames - 3) // 2 + 1, (c.n_mels - 3) // 2 + 1  # the first convolution: one input channel
        stem = 2 * ch * 9 * t * f
        for _ in range(c.subsampling_layers - 1):
            t, f = (t - 3) // 2 + 1, (f - 3) // 2 + 1
            stem += 2 * ch * ch * 9 * t * f
        stem += 2 * ch * f * d * t  # the linear to d_model
        t_enc = t
    elif c.subsampling == "conv1d_glu":  # 5-wide stride-2 convolutions to twice the channels (GLU halves them)
        widths = [c.n_mels] + [c.subsampling_channels or d] * (c.subsampling_layers - 1) + [d]
        t, stem = frames, 0
        for c_in, c_out in zip(widths, widths[1:]):
            t = (t - 3) // 2
            stem += 2 * c_in * 5 * 2 * c_out * t
        t_enc = t
    else:
        t_enc = (frames - 1) // 2 + 1
        stem = 2 * c.n_mels * d * 3 * frames + 2 * d * d * 3 * t_enc
    return stem, t_enc


def forward_flops(config: ModelConfig, batch: int, frames: int, tokens: int) -> float:
    """FLOPs of one forward pass over ``batch`` utterances of ``frames`` mel frames and
    ``tokens`` decoder tokens each (padded sizes: that is what the hardware computes)."""
    c = config
    d, ff = c.d_model, c.d_ff
    stem, t_enc = stem_flops(c, frames)
    enc_layer = t_enc * (8 * d * d + 4 * d * ff) + 4 * t_enc * t_enc * d
    if c.encoder == "conformer":  # a second feed-forward, and the convolution module (pointwise d->2d, depthwise, d->d)
        enc_layer += t_enc * (4 * d * ff + 6 * d * d + 2 * c.conv_kernel_size * d)
    dec_layer = (tokens * (8 * d * d + 4 * d * ff + 4 * tokens * d)  # self-attention + feed-forward
                 + tokens * (4 * d * d + 4 * t_enc * d) + t_enc * 4 * d * d)  # cross-attention
    heads = 2 * d * c.vocab_size * tokens + (2 * d * c.vocab_size * t_enc if c.ctc_head else 0)
    per_utt = stem + c.n_encoder_layers * enc_layer + c.n_decoder_layers * dec_layer + heads
    return float(batch * per_utt)


def training_flops(config: ModelConfig, batch: int, frames: int, tokens: int) -> float:
    """FLOPs of forward + backward (3x forward)."""
    return 3.0 * forward_flops(config, batch, frames, tokens)


def measure_peak_tflops(device: str = "cpu", dtype: str = "float32", seconds: float = 0.5) -> float:
    """Dense matmul TFLOP/s this device reaches in ``dtype``: the denominator of MFU when the
    user gives none (a measured peak, not the datasheet's, so MFU reads as a fraction of what
    this machine can really do)."""
    import time

    import torch

    dt = getattr(torch, dtype)
    n = 8192 if str(device).startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    a @ b  # warm-up (kernel selection, allocation)

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        a @ b
        count += 1
    sync()
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e12
