"""Model sizes and architecture switches as one plain dataclass.

The same dataclass describes speechformer's own models (conv2d x4 subsampling, ReLU
feed-forward, sinusoidal positions everywhere) and OpenAI Whisper's architecture
(conv1d + GELU frontend with stride 2, GELU feed-forward, learned decoder positions, no
bias on the key projection), so there is one model class, not a second copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`~speechformer.model.SpeechTransformer`.

    Token ids follow the tokenizer's layout (see :mod:`speechformer.tokenizer`):
    ``blank_id`` is the CTC blank (never a transcript token), ``bos_id`` starts the
    decoder input and ``eos_id`` ends the transcript.
    """

    vocab_size: int = 0  # 0 means "take it from the tokenizer"
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    n_encoder_layers: int = 6
    n_decoder_layers: int = 3
    dropout: float = 0.1  # on embeddings and on each block's output before the skip connection
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # inside the feed-forward, after the non-linearity

    # audio -> frames
    sample_rate: int = 16000
    n_mels: int = 80
    frontend: Literal["fbank", "whisper"] = "fbank"
    # frames -> encoder input
    # conv2d: 3x3 convolutions over (time, mel); conv1d_glu: 5-wide convolutions over time with GLUs
    # (Speech2Text's stem, unpadded; matmul-shaped, so cheaper to train on CPUs); conv1d: Whisper's
    subsampling: Literal["conv2d", "conv1d_glu", "conv1d"] = "conv2d"
    # conv2d: the convolutions' channels; conv1d_glu: the width between its layers (Speech2Text's
    # conv_channels / 2); 0 means d_model
    subsampling_channels: int = 0
    subsampling_layers: int = 2  # conv2d, conv1d_glu: stride-2 convolutions, 2 -> 40 ms frames, 3 -> 80 ms

    # encoder: "transformer" (self-attention + feed-forward) or "conformer" (macaron
    # feed-forward halves around self-attention and a convolution module; see layers.py)
    encoder: Literal["transformer", "conformer"] = "transformer"
    conv_kernel_size: int = 15  # conformer: depthwise convolution width in encoder frames (odd)
    conv_norm: Literal["layer", "batch"] = "layer"  # conformer: norm after the depthwise convolution
    # conformer: the LayerNorm that ends each block (the paper's). It renormalises the residual
    # stream after every block, which trains like a post-LN stack: on the synthetic recipe the CTC
    # loss stalled with it and not without it (recipes/synthetic/README.md)
    conformer_final_norm: bool = True

    activation: Literal["relu", "gelu"] = "relu"
    decoder_positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    # stored: the checkpoint's rounded table; rotary: RoPE on the encoder's queries and keys
    # (relative offsets only); sinusoidal+rotary: both, so the memory also carries where each
    # frame is, which the decoder's cross-attention can use to align (faster to train, see
    # recipes/synthetic/README.md)
    encoder_positions: Literal["sinusoidal", "stored", "rotary", "sinusoidal+rotary"] = "sinusoidal"
    embed_scale: bool = True  # multiply token embeddings by sqrt(d_model) before adding positions
    # multiply the subsampled audio frames by sqrt(d_model) before adding positions (ESPnet's
    # xscale): the audio then enters at the scale of what the blocks add. With the Conformer's
    # block-final norm it kept the audio's frame-to-frame spread but did not by itself unstall the
    # CTC loss; the synthetic Conformer config keeps it (figures: recipes/synthetic/README.md)
    encoder_input_scale: bool = False
    key_bias: bool = True  # Whisper has no bias on the key projection
    layer_norm_eps: float = 1e-5
    max_source_positions: int = 3000  # encoder frames after subsampling
    max_target_positions: int = 448  # decoder tokens
    # Whisper: the (decoder layer, head) pairs whose cross-attention aligns tokens to audio, for
    # word times (speechformer/alignment.py); empty: the last half of the decoder layers, all heads
    alignment_heads: list[list[int]] = field(default_factory=list)

    # heads and losses
    ctc_head: bool = True
    ctc_weight: float = 0.3
    label_smoothing: float = 0.1

    # SpecAugment (training only)
    specaug_freq_masks: int = 2
    specaug_freq_width: int = 27
    specaug_time_masks: int = 2
    specaug_time_width_ratio: float = 0.05

    # special ids (filled in from the tokenizer)
    blank_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        check_layer_settings(self, "model config", ("d_model", "n_heads", "d_ff", "n_mels", "sample_rate"))
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"model config: ctc_weight must be in [0, 1], got {self.ctc_weight}")
        if self.encoder not in ("transformer", "conformer"):
            raise ValueError(f"model config: encoder must be transformer or conformer, got {self.encoder!r}")
        if self.conv_kernel_size < 1 or self.conv_kernel_size % 2 == 0:
            raise ValueError(f"model config: conv_kernel_size must be odd and positive, got {self.conv_kernel_size}")
        if self.subsampling not in ("conv2d", "conv1d_glu", "conv1d"):
            raise ValueError(f"model config: subsampling must be conv2d, conv1d_glu or conv1d (Whisper's), "
                             f"got {self.subsampling!r}")
        if self.subsampling_layers not in (2, 3):
            raise ValueError(f"model config: subsampling_layers must be 2 (40 ms frames) or 3 (80 ms), "
                             f"got {self.subsampling_layers}")
        if self.conv_norm not in ("layer", "batch"):
            raise ValueError(f"model config: conv_norm must be layer or batch, got {self.conv_norm!r}")
        if self.encoder_positions not in ("sinusoidal", "stored", "rotary", "sinusoidal+rotary"):
            raise ValueError(f"model config: encoder_positions must be sinusoidal, stored, rotary or "
                             f"sinusoidal+rotary, got {self.encoder_positions!r}")
        if self.rotary and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model config: rotary positions need an even head size, got "
                             f"d_model / n_heads = {self.d_model // self.n_heads}")
        if self.ctc_weight > 0 and not self.ctc_head:
            raise ValueError("model config: ctc_weight > 0 needs ctc_head: true")
        for pair in self.alignment_heads:
            if not (len(pair) == 2 and 0 <= pair[0] < self.n_decoder_layers and 0 <= pair[1] < self.n_heads):
                raise ValueError(f"model config: alignment_heads must be [decoder layer, head] pairs within "
                                 f"{self.n_decoder_layers} layers and {self.n_heads} heads, got {pair!r}")

    @property
    def is_whisper(self) -> bool:
        """A Whisper model (``ModelConfig.whisper``): 30-second windows, Whisper's frontend and tokenizer.
        The one question every module asks instead of comparing ``frontend`` itself."""
        return self.frontend == "whisper"

    @property
    def rotary(self) -> bool:
        """Whether the encoder's self-attention rotates queries and keys by position."""
        return self.encoder_positions.endswith("rotary")

    @property
    def subsampling_factor(self) -> int:
        return 2 if self.subsampling == "conv1d" else 2 ** self.subsampling_layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config a file stores (an exported config.json, a checkpoint), every value checked.

        A key the dataclass does not have, a value of the wrong type (``"d_model": "256"``) or
        outside a setting's choices is a ``ValueError`` naming the setting; the dataclass alone
        would fail later with a ``TypeError`` deep inside the model.
        """
        return settings_from_dict(cls, data, "model config")

    @classmethod
    def whisper(cls, n_mels: int, n_audio_ctx: int, n_audio_state: int, n_audio_head: int,
                n_audio_layer: int, n_vocab: int, n_text_ctx: int, n_text_state: int,
                n_text_head: int, n_text_layer: int) -> "ModelConfig":
        """The architecture of an OpenAI Whisper checkpoint, from its ``dims``."""
        if n_audio_state != n_text_state or n_audio_head != n_text_head:
            raise ValueError("Whisper dims with different encoder/decoder widths are not supported")
        # <|endoftext|> and <|startoftranscript|>: 50256/50257 (English-only), 50257/50258 (multilingual)
        eos = 50257 if n_vocab >= 51865 else 50256
        special = {"eos_id": eos, "bos_id": eos + 1} if n_vocab >= 51864 else {}
        return cls(
            vocab_size=n_vocab, d_model=n_audio_state, n_heads=n_audio_head, d_ff=4 * n_audio_state,
            n_encoder_layers=n_audio_layer, n_decoder_layers=n_text_layer, dropout=0.0,
            n_mels=n_mels, frontend="whisper", subsampling="conv1d", activation="gelu",
            decoder_positions="learned", encoder_positions="stored", embed_scale=False, key_bias=False,
            max_source_positions=n_audio_ctx, max_target_positions=n_text_ctx,
            ctc_head=False, ctc_weight=0.0, label_smoothing=0.0,
            specaug_freq_masks=0, specaug_time_masks=0, **special,
        )


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def check_layer_settings(config: Any, label: str, positive: tuple[str, ...]) -> None:
    """What every stack of attention layers needs of its settings (the acoustic model's and the
    language model's): heads that divide the width, ``positive`` sizes above 0, dropouts in [0, 1).
    A ``ValueError`` starts with ``label`` and names the setting."""
    if config.d_model % config.n_heads:
        raise ValueError(f"{label}: d_model={config.d_model} must be divisible by n_heads={config.n_heads}")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{label}: {name} must be positive, got {getattr(config, name)}")
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{label}: {name} must be in [0, 1), got {getattr(config, name)}")


def settings_from_dict(cls: Any, data: Any, label: str) -> Any:
    """The dataclass ``cls`` from stored settings, every key known and every value of its type
    (a ``ValueError`` starting with ``label`` names the setting): the acoustic model's and the
    language model's configs alike."""
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected an object of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{label}: unknown keys {unknown}")
    hints = get_type_hints(cls)
    return cls(**{name: _checked_value(name, hints[name], value, label) for name, value in data.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_value(name: str, hint: Any, value: Any, label: str = "model config") -> Any:
    """``value`` if it fits the setting's type (an int where a float is asked becomes a float)."""
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(f"{label}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if hint == list[list[int]]:  # pairs of whole numbers (alignment_heads)
        if isinstance(value, list) and all(isinstance(p, list) and all(_is_int(x) for x in p) for p in value):
            return value
        raise ValueError(f"{label}: {name} must be a list of [layer, head] pairs of whole numbers, got {value!r}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = {bool: isinstance(value, bool), int: is_number and isinstance(value, int), float: is_number,
            str: isinstance(value, str)}[hint]
    if not fits:
        raise ValueError(f"{label}: {name} must be {_KINDS[hint]}, got {value!r} ({type(value).__name__})")
    return float(value) if hint is float else value
