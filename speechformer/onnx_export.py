"""ONNX export: an encoder graph and a one-step decoder graph, for deploying without PyTorch.

``speechformer export --format onnx --model M --out DIR [--quantize int8]`` writes

* ``encoder.onnx``: ``wav`` [B, T] float32 + ``wav_lengths`` [B] int64 (samples) ->
  ``mem_lengths`` [B], ``ctc_log_probs`` [B, S, V] (models with a CTC head), and every decoder
  layer's cross-attention keys and values ``cross_k`` / ``cross_v`` [layers, B, heads, S, head_dim],
  computed once per utterance (the layout of sherpa-onnx's Whisper export). The log-mel frontend
  is inside the graph (:mod:`speechformer.frontend`'s own modules, exported as they are), so a
  deployment carries no feature code.
* ``decoder.onnx``: one step for a batch of N hypotheses: ``tokens`` [N, L] (the prompt at the
  first step, one token after), the self-attention caches ``self_k`` / ``self_v``
  [layers, N, heads, P, head_dim] of the P tokens already read (P = 0 at the first step), the
  encoder's ``cross_k`` / ``cross_v`` and ``mem_lengths`` for B utterances (N = B x beams: the
  beams of an utterance are consecutive rows and share its keys and values, as in PyTorch) ->
  ``log_probs`` [N, L, V] and the caches grown to P + L positions. The offset of the new tokens
  is P, read off the cache's shape, so the two cannot disagree.
* ``config.json`` (``"format": "speechformer-onnx"``): the model family, the model config, the
  decoding rules (prompt, end and suppressed token ids, Whisper's no-speech and time tokens),
  the frame rates, the graphs' input and output names; and the tokenizer's files beside it.

Why these choices (docs/deploy.md has the measurements):

* **The dynamo exporter** (``torch.onnx.export(..., dynamo=True)``), opset 18: the frontend's
  STFT is complex-valued, which the legacy TorchScript exporter cannot export at all; dynamo
  exports it to ONNX's STFT op, and its shapes stay symbolic (checked at several batch sizes and
  lengths by ``tests/test_onnx.py``).
* **The encoder is the model's own code** (frontend, subsampling, encoder layers with
  ``scaled_dot_product_attention``); only the memory mask's "nothing is padded, skip the mask"
  shortcut, a data-dependent branch, is off while exporting (``SpeechTransformer.memory_mask``).
* **The decoder step is written here** from the model's modules (its projections, norms,
  feed-forwards and :func:`~speechformer.model.attention.attention`, the written-out formula):
  ``MultiHeadAttention.forward`` branches in Python on shapes (one new token or several, beams
  sharing memory or not) and keeps its cache in Python objects, which an exporter would freeze
  to the example's case. The math is the same, and the parity test holds it to PyTorch's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .atomic import atomic_write, atomic_write_text
from .model import SpeechTransformer
from .model.attention import attention
from .transcribe import ModelBundle

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ONNX_FORMAT = "speechformer-onnx"
OPSET = 18
ENCODER_INPUTS = ["wav", "wav_lengths"]
DECODER_INPUTS = ["tokens", "self_k", "self_v", "cross_k", "cross_v", "mem_lengths"]
DECODER_OUTPUTS = ["log_probs", "new_self_k", "new_self_v"]


def encoder_outputs(model: SpeechTransformer) -> list[str]:
    """The encoder graph's outputs, in order (``ctc_log_probs`` only where there is a CTC head)."""
    return ["mem_lengths", *(["ctc_log_probs"] if model.ctc is not None else []), "cross_k", "cross_v"]


def family(model: SpeechTransformer) -> str:
    """``whisper``, ``conformer`` or ``transformer``: what a runtime must know to treat the model right."""
    c = model.config
    return "whisper" if c.frontend == "whisper" else c.encoder


class EncoderGraph(nn.Module):
    """Waveforms -> memory lengths, CTC log-probabilities, each decoder layer's cross K/V."""

    def __init__(self, model: SpeechTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, wav: Tensor, wav_lengths: Tensor) -> tuple[Tensor, ...]:
        memory, lengths = self.model.encode(wav, wav_lengths)
        keys, values = zip(*(layer.cross_attn.project_kv(memory) for layer in self.model.decoder_layers))
        ctc = (self.model.ctc_log_probs(memory),) if self.model.ctc is not None else ()
        return (lengths, *ctc, torch.stack(keys), torch.stack(values))


def _merge(y: Tensor) -> Tensor:
    """[N, H, L, Dh] -> [N, L, H * Dh]."""
    n, h, length, dh = y.shape
    return y.transpose(1, 2).reshape(n, length, h * dh)


def _shared_memory_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Queries of N = B x G rows (G consecutive beams per utterance) into B utterances' keys/values.

    The G beams' queries become extra query positions of their utterance (as
    ``MultiHeadAttention.forward`` does with ``group > 1``), written with -1 sizes so that G
    stays a computed size in the graph instead of the example's."""
    n, h, length, dh = q.shape
    b = k.shape[0]
    grouped = q.reshape(b, -1, h, length, dh).transpose(1, 2).reshape(b, h, -1, dh)
    y, _ = attention(grouped, k, v, mask)
    return y.reshape(b, h, -1, length, dh).transpose(1, 2).reshape(n, h, length, dh)


class DecoderStepGraph(nn.Module):
    """One decoder step over cached past tokens (see the module docstring for the shapes)."""

    def __init__(self, model: SpeechTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, self_k: Tensor, self_v: Tensor, cross_k: Tensor, cross_v: Tensor,
                mem_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        past, new = self_k.shape[3], tokens.shape[1]
        x = m.decoder_positions(m.embedding(tokens), offset=past)
        # new token i sits at position past + i and reads positions 0 .. past + i
        causal = torch.arange(past + new, device=tokens.device)[None, :] <= (
            torch.arange(new, device=tokens.device)[:, None] + past)
        frames = torch.arange(cross_k.shape[3], device=tokens.device)
        memory_mask = (frames[None, :] < mem_lengths[:, None])[:, None, None, :]
        keys, values = [], []
        for i, layer in enumerate(m.decoder_layers):
            sa, ca = layer.self_attn, layer.cross_attn
            q, k, v = sa._heads(sa.qkv(layer.self_norm(x)), 3)
            k, v = torch.cat([self_k[i], k], dim=2), torch.cat([self_v[i], v], dim=2)
            keys.append(k)
            values.append(v)
            x = x + sa.out(_merge(attention(q, k, v, causal)[0]))
            q = ca._query(layer.cross_norm(x))
            x = x + ca.out(_merge(_shared_memory_attention(q, cross_k[i], cross_v[i], memory_mask)))
            x = x + layer.ff(layer.ff_norm(x))
        logits = m.embedding.logits(m.decoder_norm(x))
        return logits.float().log_softmax(-1), torch.stack(keys), torch.stack(values)


def example_inputs(model: SpeechTransformer, batch: int = 2, seconds: float = 1.0, beams: int = 2,
                   past: int = 3, new: int = 2) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Inputs to trace both graphs with: a padded batch (so the masks are in the graph), sizes
    above 1 everywhere (torch.export specialises sizes 0 and 1)."""
    c = model.config
    n = int(seconds * c.sample_rate)
    wav = torch.randn(batch, n) * 0.1
    wav_lengths = torch.tensor([n] + [n * 3 // 4] * (batch - 1))
    with torch.no_grad():
        enc = EncoderGraph(model)(wav, wav_lengths)
    mem_lengths, cross_k, cross_v = enc[0], enc[-2], enc[-1]
    head_dim = c.d_model // c.n_heads
    rows = batch * beams
    cache = torch.randn(c.n_decoder_layers, rows, c.n_heads, past, head_dim)
    tokens = torch.randint(4, c.vocab_size, (rows, new))
    return (wav, wav_lengths), (tokens, cache, cache.clone(), cross_k, cross_v, mem_lengths)


def _dynamic_shapes(model: SpeechTransformer) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    dim = torch.export.Dim
    batch, samples, rows = dim("batch"), dim("samples"), dim("hypotheses")
    past, new, frames = dim("past"), dim("tokens"), dim("frames")
    encoder = ({0: batch, 1: samples}, {0: batch})
    decoder = ({0: rows, 1: new}, {1: rows, 3: past}, {1: rows, 3: past}, {1: batch, 3: frames},
               {1: batch, 3: frames}, {0: batch})
    return encoder, decoder


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic_shapes: tuple[Any, ...]) -> None:
    """``torch.onnx.export`` (dynamo, :data:`OPSET`) to a temporary file, then put in place."""
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=inputs,
                                        output_names=outputs, dynamic_shapes=dynamic_shapes, verbose=False,
                                        optimize=True)
        program.save(str(tmp), external_data=False)

    atomic_write(path, write)


def onnx_config(bundle: ModelBundle, quantize: str | None) -> dict[str, Any]:
    """What a runtime needs beside the graphs: ids, rules, frame rates, the graphs' names."""
    model, tokenizer = bundle.model, bundle.tokenizer
    c = model.config
    rules = tokenizer.rules() if tokenizer is not None else None
    timestamp_rules = tokenizer.rules(timestamps=True) if tokenizer is not None and c.frontend == "whisper" else None
    hop = model.frontend.hop_length
    return {
        "format": ONNX_FORMAT,
        "family": family(model),
        "model": c.to_dict(),
        "max_input_seconds": bundle.max_input_seconds,
        "sample_rate": c.sample_rate,
        "feature_frame_seconds": hop / c.sample_rate,
        "memory_frame_seconds": hop * c.subsampling_factor / c.sample_rate,
        # the subsampler's receptive field: PyTorch pads shorter feature sequences, a branch the
        # graph does not keep, so a runtime pads the samples (masked by wav_lengths) to this width
        "min_samples": (model.subsampling.min_frames - 1) * hop,
        "token_ids": {"vocab_size": c.vocab_size, "blank": c.blank_id, "bos": c.bos_id, "eos": c.eos_id},
        "rules": vars(rules) if rules is not None else None,
        "timestamp_rules": vars(timestamp_rules) if timestamp_rules is not None else None,
        "encoder": {"file": ENCODER_FILE, "inputs": ENCODER_INPUTS, "outputs": encoder_outputs(model)},
        "decoder": {"file": DECODER_FILE, "inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS},
        "onnx": {"exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET, "torch": torch.__version__,
                 "quantize": quantize},
        "val_wer": bundle.meta.get("val_wer"), "source": bundle.meta.get("source"),
    }


def quantize_int8(path: Path) -> None:
    """onnxruntime's dynamic int8 quantisation of the graph's matrix products, in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    atomic_write(path, lambda tmp: quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8,
                                                    op_types_to_quantize=["MatMul", "Gemm"]))


@torch.no_grad()
def export_onnx(bundle: ModelBundle, out_dir: str | Path, quantize: str | None = None) -> Path:
    """Write ``encoder.onnx``, ``decoder.onnx``, ``config.json`` and the tokenizer to ``out_dir``."""
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8, got {quantize!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = bundle.model.cpu().float().eval()
    enc_args, dec_args = example_inputs(model)
    enc_shapes, dec_shapes = _dynamic_shapes(model)
    _export(EncoderGraph(model), enc_args, out / ENCODER_FILE, ENCODER_INPUTS, encoder_outputs(model), enc_shapes)
    _export(DecoderStepGraph(model), dec_args, out / DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS, dec_shapes)
    if quantize == "int8":
        quantize_int8(out / ENCODER_FILE)
        quantize_int8(out / DECODER_FILE)
    if bundle.tokenizer is not None:
        bundle.tokenizer.save(out)
    atomic_write_text(out / "config.json", json.dumps(onnx_config(bundle, quantize), indent=2) + "\n")
    return out
