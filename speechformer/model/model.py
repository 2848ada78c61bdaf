"""SpeechTransformer: waveform -> log-mel frames -> encoder memory -> decoder -> next-token logits.

Reading order: :meth:`SpeechTransformer.encode` (frontend, subsampling, positions,
encoder stack), :meth:`SpeechTransformer.decode` (token embedding, positions, decoder
stack with cross-attention, de-embedding), :meth:`SpeechTransformer.forward` (the
training losses).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..frontend import LogMelFrontend, SpecAugment, WhisperFrontend
from .attention import KVCache
from .config import ModelConfig
from .layers import (UNPADDED_STEMS, ConformerLayer, Conv1dSubsampling, DecoderLayer, Dropout, EncoderLayer,
                     LearnedPositions, SinusoidalPositions)


class TokenEmbedding(nn.Module):
    """Token ids -> vectors (a lookup: a one-hot row times the table), and back.

    The same table de-embeds: the decoder's output vector is compared (dot product) with
    every token's embedding, giving one logit per vocabulary entry; softmax turns the
    logits into next-token probabilities. Tying the two halves the parameters and makes
    "close to the embedding of token w" mean "likely to be w".
    """

    def __init__(self, vocab_size: int, d_model: int, scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model).normal_(std=d_model ** -0.5))
        self.scale = math.sqrt(d_model) if scale else 1.0
        self._cast: tuple[tuple, Tensor] | None = None  # the table in another dtype, for inference

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight) * self.scale

    def logits(self, x: Tensor) -> Tensor:
        """De-embedding: [..., D] -> [..., vocab]."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # the table cast once, not by autocast at every call (F.linear: x @ W.t() copied W.t() in bf16)
        return F.linear(x, self.weight_as(dtype))

    def weight_as(self, dtype: torch.dtype) -> Tensor:
        """The table in ``dtype`` (bf16 decoding). Without gradients the cast is kept until the
        table changes (its version counter: an optimiser step, a state-dict load), so decoding
        casts the vocabulary-sized table once, not at every token (Whisper's: 20M values)."""
        if dtype == self.weight.dtype:
            return self.weight
        if torch.is_grad_enabled():
            return self.weight.to(dtype)  # training: the gradient flows through the cast
        key = (dtype, self.weight.device, self.weight.data_ptr(), self.weight._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, self.weight.detach().to(dtype))
        return self._cast[1]


class DecoderState:
    """Per-layer KV caches for incremental decoding, plus the number of tokens consumed."""

    def __init__(self, self_caches: list[KVCache], cross_caches: list[KVCache]) -> None:
        self.self_caches = self_caches
        self.cross_caches = cross_caches

    @property
    def offset(self) -> int:
        return self.self_caches[0].length

    def reorder(self, index: Tensor, cross: bool = True) -> None:
        """Follow beam search: row i of the new state is row index[i] of the old.

        ``cross=False`` leaves the cross-attention caches alone: right when rows only move
        among the beams of one utterance, which all hold that utterance's memory."""
        for cache in self.self_caches:
            cache.reorder(index)
        if cross:
            for cache in self.cross_caches:
                cache.reorder(index)


class SpeechTransformer(nn.Module):
    """An encoder-decoder transformer for speech recognition (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("model config: vocab_size must be set (from the tokenizer) before building the model")
        self.config = c = config
        if c.is_whisper:
            self.frontend: nn.Module = WhisperFrontend(c.n_mels, c.sample_rate)
        else:
            self.frontend = LogMelFrontend(c.sample_rate, c.n_mels)
        self.specaug = SpecAugment(c.specaug_freq_masks, c.specaug_freq_width, c.specaug_time_masks,
                                   c.specaug_time_width_ratio)
        if c.subsampling in UNPADDED_STEMS:
            self.subsampling: nn.Module = UNPADDED_STEMS[c.subsampling](
                c.n_mels, c.d_model, c.subsampling_channels or c.d_model, c.subsampling_layers)
        else:
            self.subsampling = Conv1dSubsampling(c.n_mels, c.d_model)
        rotary = c.rotary
        # rotary positions live inside the attention layers: alone, nothing is added to the stream
        self.encoder_positions: nn.Module = nn.Identity() if c.encoder_positions == "rotary" else SinusoidalPositions(
            c.max_source_positions, c.d_model, stored=c.encoder_positions == "stored")
        layer_args = (c.d_model, c.n_heads, c.d_ff, c.dropout, c.attention_dropout, c.activation, c.key_bias,
                      c.layer_norm_eps, c.activation_dropout)
        self.encoder_layers = nn.ModuleList(
            ConformerLayer(c.d_model, c.n_heads, c.d_ff, c.dropout, c.attention_dropout, c.key_bias,
                           c.layer_norm_eps, c.activation_dropout, rotary, c.conv_kernel_size, c.conv_norm,
                           c.conformer_final_norm)
            if c.encoder == "conformer" else EncoderLayer(*layer_args, rotary=rotary)
            for _ in range(c.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)

        self.embedding = TokenEmbedding(c.vocab_size, c.d_model, c.embed_scale)
        if c.decoder_positions == "learned":
            self.decoder_positions: nn.Module = LearnedPositions(c.max_target_positions, c.d_model)
        else:
            self.decoder_positions = SinusoidalPositions(c.max_target_positions, c.d_model)
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(c.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.dropout)
        self.ctc = nn.Linear(c.d_model, c.vocab_size) if c.ctc_head else None

    # ------------------------------------------------------------------ encoder
    def encode(self, wav: Tensor, wav_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Waveforms [B, samples] -> memory [B, T', D], memory lengths [B].

        The attention maps are not returned: :func:`~speechformer.model.capture_attention`
        records them from the layers that are asked."""
        feats, frames = self.frontend(wav, wav_lengths)
        return self.encode_features(feats, frames)

    def encode_features(self, feats: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Frames [B, T, n_mels] -> memory [B, T', D], lengths [B] (the part after the frontend)."""
        feats = self.specaug(feats, frames)
        x = self.subsampling(feats)
        if self.config.encoder_input_scale:
            x = x * math.sqrt(self.config.d_model)
        lengths = self.subsampling.output_lengths(frames).clamp(min=1, max=x.shape[1])
        x = self.dropout(self.encoder_positions(x))
        mask = self.memory_mask(lengths, x.shape[1])
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), lengths

    @staticmethod
    def memory_mask(lengths: Tensor, max_len: int) -> Tensor | None:
        """[B, 1, 1, T] boolean key mask (True = real frame), or None if nothing is padded.

        While exporting to ONNX the mask is always made: the shortcut is a data-dependent branch,
        which the graph would otherwise freeze to the example batch's case."""
        if not torch.onnx.is_in_onnx_export() and bool((lengths >= max_len).all()):
            return None
        return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]

    # ------------------------------------------------------------------ decoder
    def decode(self, tokens: Tensor, memory: Tensor, memory_mask: Tensor | None,
               state: DecoderState | None = None) -> Tensor:
        """Tokens [B, L] (all of them, or only the new ones when ``state`` caches the past)
        -> logits [B, L, vocab] (cross-attention maps: :func:`~speechformer.model.capture_attention`)."""
        offset = state.offset if state is not None else 0
        x = self.dropout(self.decoder_positions(self.embedding(tokens), offset=offset))
        for i, layer in enumerate(self.decoder_layers):
            x = layer(
                x, memory, memory_mask,
                self_cache=state.self_caches[i] if state is not None else None,
                cross_cache=state.cross_caches[i] if state is not None else None,
            )
        return self.embedding.logits(self.decoder_norm(x))

    def init_state(self, memory: Tensor, max_len: int, repeat: int = 1) -> DecoderState:
        """Empty self-attention caches for ``max_len`` tokens and cross-attention caches
        holding the memory's keys/values, computed once per utterance. ``repeat`` gives
        each utterance that many consecutive rows (beams): their self-attention caches are
        their own, the memory's keys/values are stored once and shared (see
        :class:`~speechformer.model.attention.MultiHeadAttention`)."""
        c = self.config
        b = memory.shape[0] * repeat
        head_dim = c.d_model // c.n_heads
        self_caches, cross_caches = [], []
        for layer in self.decoder_layers:
            self_caches.append(KVCache(b, c.n_heads, max_len, head_dim, memory.device, memory.dtype))
            k, v = layer.cross_attn.project_kv(memory)
            cross = KVCache(memory.shape[0], c.n_heads, k.shape[2], head_dim, memory.device, k.dtype)
            cross.append(k, v)
            cross_caches.append(cross)
        return DecoderState(self_caches, cross_caches)

    def compile_layers(self, dynamic: bool = True) -> "SpeechTransformer":
        """``torch.compile`` each encoder and decoder layer in place (state-dict keys unchanged).

        Layers, not the whole model: the frontend, masks and decoding loops have data-dependent
        Python control flow that would break the graph anyway, and a layer is where the time
        goes (fused layer norm + attention + feed-forward). ``dynamic``: one graph for all
        batch shapes instead of a recompile per utterance length.
        """
        for layer in [*self.encoder_layers, *self.decoder_layers]:
            layer.compile(dynamic=dynamic)
        return self

    # ------------------------------------------------------------------ training
    def forward(self, wav: Tensor, wav_lengths: Tensor, tokens: Tensor, token_lengths: Tensor,
                prompt: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Losses for a batch. ``tokens`` [B, L] are transcripts without bos/eos, padded
        anywhere past ``token_lengths``. Returns loss, att_loss, ctc_loss, accuracy."""
        memory, mem_lengths = self.encode(wav, wav_lengths)
        return self.losses(memory, mem_lengths, tokens, token_lengths, prompt)

    def losses(self, memory: Tensor, mem_lengths: Tensor, tokens: Tensor, token_lengths: Tensor,
               prompt: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The losses given the encoder memory (validation reuses the memory for decoding).

        The decoder reads ``prompt`` (default ``[bos]``; Whisper: its start-of-transcript
        tokens) then the transcript, and learns to predict each transcript token and the
        end token from the prompt's last position on (teacher forcing)."""
        c = self.config
        prompt = list(prompt) if prompt is not None else [c.bos_id]
        p = len(prompt)
        b, length = tokens.shape
        positions = torch.arange(length + 1, device=tokens.device)[None, :]
        real = positions < token_lengths[:, None]  # [B, L+1]
        padded = torch.cat([tokens, tokens.new_zeros(b, 1)], dim=1)
        # decoder input: prompt t1 .. tn (pad: eos); target: t1 .. tn eos (pad: ignored)
        body = torch.where(real[:, :-1], tokens, c.eos_id)
        dec_in = torch.cat([torch.tensor(prompt, device=tokens.device).expand(b, p), body], dim=1)
        target = torch.where(real, padded, c.eos_id)
        target = torch.where(positions <= token_lengths[:, None], target, -100)

        logits = self.decode(dec_in, memory, self.memory_mask(mem_lengths, memory.shape[1]))
        logits = logits[:, p - 1:].float()
        att_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                   label_smoothing=c.label_smoothing)
        valid = target != -100
        accuracy = ((logits.argmax(-1) == target) & valid).sum() / valid.sum().clamp_min(1)
        out = {"att_loss": att_loss, "accuracy": accuracy}
        if self.ctc is not None and c.ctc_weight > 0:
            log_probs = self.ctc(memory).float().log_softmax(-1).transpose(0, 1)  # [T, B, V]
            ctc_targets = torch.where(real[:, :-1], tokens, c.blank_id)
            ctc_loss = F.ctc_loss(log_probs, ctc_targets, mem_lengths, token_lengths, blank=c.blank_id,
                                  reduction="mean", zero_infinity=True)
            out["ctc_loss"] = ctc_loss
            out["loss"] = (1 - c.ctc_weight) * att_loss + c.ctc_weight * ctc_loss
        else:
            out["loss"] = att_loss
        return out

    def ctc_log_probs(self, memory: Tensor) -> Tensor:
        """CTC head: memory [B, T, D] -> per-frame log-probabilities [B, T, vocab] (float32)."""
        if self.ctc is None:
            raise ValueError("this model has no CTC head (Whisper models have none): use the attention decoder")
        return self.ctc(memory).float().log_softmax(-1)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Everything before the memory: subsampling, encoder stack, final encoder norm."""
        parts = [self.frontend, self.subsampling, self.encoder_positions, self.encoder_layers, self.encoder_norm]
        return [p for part in parts for p in part.parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
