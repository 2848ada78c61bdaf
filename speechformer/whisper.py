"""Import OpenAI Whisper weights into speechformer's own model classes.

Whisper is this toolkit's shape (log-mel frames -> conv stem -> encoder stack ->
BPE decoder with cross-attention), so its weights load into :class:`SpeechTransformer`
configured by :meth:`ModelConfig.whisper`: there is no second copy of the model. Three
formats are read, none of them with the engine that wrote it:

* an openai-whisper checkpoint (``.pt`` with ``dims`` and ``model_state_dict``), read with
  ``torch.load(..., weights_only=True)``;
* a Hugging Face Whisper folder (``config.json`` + ``*.safetensors`` [+ ``tokenizer.json``]);
* a CTranslate2 Whisper folder (``model.bin`` + ``config.json`` + ``tokenizer.json``, the
  format faster-whisper uses), parsed by :func:`read_ctranslate2` (float32/16, bfloat16
  and int8 weights, which are dequantised).

The result is a speechformer model folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``) that ``transcribe``, ``evaluate``,
``export`` and fine-tuning (``fit --model.init_from DIR``) use like any other. The model's
alignment heads (for word times, :mod:`speechformer.alignment`) come along in its config where
the format stores them (CTranslate2's ``config.json``, Hugging Face's ``generation_config.json``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .frontend import WHISPER_WINDOW_SECONDS
from .model import ModelConfig, SpeechTransformer
from .model.layers import sinusoids
from .tokenizer import WHISPER_FILE, WhisperTokenizer

MULTILINGUAL_MIN_VOCAB = 51865  # English-only Whisper models have 51864 tokens


class WhisperImportError(ValueError):
    """The source is not a Whisper checkpoint this importer understands."""


# ---------------------------------------------------------------------------- name maps
def _layer_map(prefix: str, ours: str, names: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}.{src}": f"{ours}.{dst}" for src, dst in names.items()}


def _linear(src: str, dst: str, bias: bool = True) -> dict[str, str]:
    out = {f"{src}.weight": f"{dst}.weight"}
    if bias:
        out[f"{src}.bias"] = f"{dst}.bias"
    return out


def _norm(src: str, dst: str, weight: str = "weight", bias: str = "bias") -> dict[str, str]:
    return {f"{src}.{weight}": f"{dst}.weight", f"{src}.{bias}": f"{dst}.bias"}


def _attention(src: str, dst: str, q: str, k: str, v: str, o: str) -> dict[str, str]:
    return {**_linear(f"{src}.{q}", f"{dst}.query"), **_linear(f"{src}.{k}", f"{dst}.key", bias=False),
            **_linear(f"{src}.{v}", f"{dst}.value"), **_linear(f"{src}.{o}", f"{dst}.out")}


def openai_names(n_enc: int, n_dec: int) -> dict[str, str]:
    """openai-whisper state-dict names -> speechformer names."""
    m = {**_linear("encoder.conv1", "subsampling.conv1"), **_linear("encoder.conv2", "subsampling.conv2"),
         **_norm("encoder.ln_post", "encoder_norm"), "encoder.positional_embedding": "encoder_positions.table",
         "decoder.token_embedding.weight": "embedding.weight",
         "decoder.positional_embedding": "decoder_positions.table", **_norm("decoder.ln", "decoder_norm")}
    for i in range(n_enc):
        s, d = f"encoder.blocks.{i}", f"encoder_layers.{i}"
        m |= {**_attention(f"{s}.attn", f"{d}.attn", "query", "key", "value", "out"),
              **_norm(f"{s}.attn_ln", f"{d}.attn_norm"), **_norm(f"{s}.mlp_ln", f"{d}.ff_norm"),
              **_linear(f"{s}.mlp.0", f"{d}.ff.fc1"), **_linear(f"{s}.mlp.2", f"{d}.ff.fc2")}
    for i in range(n_dec):
        s, d = f"decoder.blocks.{i}", f"decoder_layers.{i}"
        m |= {**_attention(f"{s}.attn", f"{d}.self_attn", "query", "key", "value", "out"),
              **_attention(f"{s}.cross_attn", f"{d}.cross_attn", "query", "key", "value", "out"),
              **_norm(f"{s}.attn_ln", f"{d}.self_norm"), **_norm(f"{s}.cross_attn_ln", f"{d}.cross_norm"),
              **_norm(f"{s}.mlp_ln", f"{d}.ff_norm"),
              **_linear(f"{s}.mlp.0", f"{d}.ff.fc1"), **_linear(f"{s}.mlp.2", f"{d}.ff.fc2")}
    return m


def hf_names(n_enc: int, n_dec: int) -> dict[str, str]:
    """Hugging Face ``WhisperForConditionalGeneration`` names (without ``model.``) -> speechformer names."""
    m = {**_linear("encoder.conv1", "subsampling.conv1"), **_linear("encoder.conv2", "subsampling.conv2"),
         **_norm("encoder.layer_norm", "encoder_norm"), "encoder.embed_positions.weight": "encoder_positions.table",
         "decoder.embed_tokens.weight": "embedding.weight",
         "decoder.embed_positions.weight": "decoder_positions.table", **_norm("decoder.layer_norm", "decoder_norm")}
    for i in range(n_enc):
        s, d = f"encoder.layers.{i}", f"encoder_layers.{i}"
        m |= {**_attention(f"{s}.self_attn", f"{d}.attn", "q_proj", "k_proj", "v_proj", "out_proj"),
              **_norm(f"{s}.self_attn_layer_norm", f"{d}.attn_norm"), **_norm(f"{s}.final_layer_norm", f"{d}.ff_norm"),
              **_linear(f"{s}.fc1", f"{d}.ff.fc1"), **_linear(f"{s}.fc2", f"{d}.ff.fc2")}
    for i in range(n_dec):
        s, d = f"decoder.layers.{i}", f"decoder_layers.{i}"
        m |= {**_attention(f"{s}.self_attn", f"{d}.self_attn", "q_proj", "k_proj", "v_proj", "out_proj"),
              **_attention(f"{s}.encoder_attn", f"{d}.cross_attn", "q_proj", "k_proj", "v_proj", "out_proj"),
              **_norm(f"{s}.self_attn_layer_norm", f"{d}.self_norm"),
              **_norm(f"{s}.encoder_attn_layer_norm", f"{d}.cross_norm"),
              **_norm(f"{s}.final_layer_norm", f"{d}.ff_norm"),
              **_linear(f"{s}.fc1", f"{d}.ff.fc1"), **_linear(f"{s}.fc2", f"{d}.ff.fc2")}
    return m


def _rename(state: dict[str, Tensor], names: dict[str, str], source: str) -> dict[str, Tensor]:
    missing = sorted(set(names) - set(state))
    if missing:
        raise WhisperImportError(f"{source}: not a Whisper checkpoint: {len(missing)} weights missing "
                                 f"(first: {missing[0]})")
    return {dst: state[src].float() for src, dst in names.items()}


def _check_encoder_positions(table: Tensor, source: str) -> None:
    """Whisper's encoder positions are sinusoids (stored rounded to the checkpoint's precision)."""
    expected = sinusoids(table.shape[0], table.shape[1])
    err = (table.float() - expected).abs().max().item()
    if err > 1e-2:  # float16 storage rounds them by ~1e-3
        raise WhisperImportError(f"{source}: encoder positions differ from Whisper's sinusoids "
                                 f"(max difference {err:.3g}); not a standard Whisper model")


# ---------------------------------------------------------------------------- formats
def from_openai(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """An openai-whisper ``.pt`` checkpoint (``dims`` + ``model_state_dict``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - refusal to unpickle code, or corruption
        raise WhisperImportError(f"{path}: cannot be read as a weights-only checkpoint ({type(err).__name__}); "
                                 "only tensors and plain types are accepted") from err
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise WhisperImportError(f"{path}: not an openai-whisper checkpoint (no 'dims'/'model_state_dict')")
    dims = dict(ckpt["dims"])
    config = ModelConfig.whisper(**dims)
    state = ckpt["model_state_dict"]
    if "encoder.positional_embedding" not in state:  # a buffer: older exports may leave it out
        state = {**state, "encoder.positional_embedding": sinusoids(config.max_source_positions, config.d_model)}
    _check_encoder_positions(state["encoder.positional_embedding"], str(path))
    return config, _rename(state, openai_names(config.n_encoder_layers, config.n_decoder_layers), str(path))


def from_huggingface(folder: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A Hugging Face Whisper folder: ``config.json`` + one or more ``*.safetensors``."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "whisper":
        raise WhisperImportError(f"{folder}/config.json: model_type is {cfg.get('model_type')!r}, not 'whisper'")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WhisperImportError(f"{folder}: no *.safetensors weights (PyTorch .bin files are not read: "
                                 "they are pickles; convert them to safetensors)")
    state: dict[str, Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            state[k[len("model."):] if k.startswith("model.") else k] = v
    if cfg["encoder_ffn_dim"] != 4 * cfg["d_model"] or cfg["decoder_ffn_dim"] != 4 * cfg["d_model"]:
        raise WhisperImportError(f"{folder}: feed-forward width is not 4 x d_model; not a standard Whisper")
    config = ModelConfig.whisper(
        n_mels=cfg["num_mel_bins"], n_audio_ctx=cfg["max_source_positions"], n_audio_state=cfg["d_model"],
        n_audio_head=cfg["encoder_attention_heads"], n_audio_layer=cfg["encoder_layers"],
        n_vocab=cfg["vocab_size"], n_text_ctx=cfg["max_target_positions"], n_text_state=cfg["d_model"],
        n_text_head=cfg["decoder_attention_heads"], n_text_layer=cfg["decoder_layers"])
    if "encoder.embed_positions.weight" not in state:
        state["encoder.embed_positions.weight"] = sinusoids(config.max_source_positions, config.d_model)
    _check_encoder_positions(state["encoder.embed_positions.weight"], str(folder))
    return config, _rename(state, hf_names(config.n_encoder_layers, config.n_decoder_layers), str(folder))


_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


def read_ctranslate2(path: Path) -> dict[str, Tensor]:
    """Every variable of a CTranslate2 ``model.bin`` (binary format versions 3 to 6).

    The layout (from CTranslate2's ``ModelSpec.save``): u32 version, string spec name,
    u32 revision, u32 count, then per variable: string name, u8 rank, u32 dims, u8 dtype,
    u32 byte count, raw bytes; then u32 alias count and (alias, target) string pairs.
    Strings are a u16 length (with the trailing NUL) and UTF-8 bytes.
    """
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(data):
            raise WhisperImportError(f"{path}: truncated CTranslate2 model (at byte {pos})")
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += size
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("H")
        raw = data[pos:pos + n]
        pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    (version,) = take("I")
    if not 3 <= version <= 6:
        raise WhisperImportError(f"{path}: CTranslate2 binary version {version} is not supported (3 to 6 are)")
    spec = string()
    take("I")  # spec revision
    if spec != "WhisperSpec":
        raise WhisperImportError(f"{path}: a CTranslate2 {spec}, not a WhisperSpec")
    (count,) = take("I")
    variables: dict[str, Tensor] = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        shape = take("I" * rank)
        (dtype_id,) = take("B")
        (nbytes,) = take("I")
        raw = bytearray(data[pos:pos + nbytes])
        pos += nbytes
        tensor = torch.frombuffer(raw, dtype=_CT2_DTYPES[dtype_id]) if nbytes else torch.empty(0)
        variables[name] = tensor.reshape(shape)
    (n_alias,) = take("I")
    for _ in range(n_alias):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def from_ctranslate2(folder: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A CTranslate2 Whisper folder (``model.bin``): fused projections are split back."""
    v = read_ctranslate2(folder / "model.bin")

    def weight(name: str) -> Tensor:
        w = v[name]
        scale = v.get(name + "_scale")
        if scale is not None:  # int8 weights: w_int8 = round(w * scale), one scale per output row
            return w.float() / scale.float().reshape(-1, *([1] * (w.dim() - 1)))
        return w.float()

    d = v["encoder/conv2/weight"].shape[0]
    n_heads = int(v["encoder/num_heads"])
    if int(v["decoder/num_heads"]) != n_heads:
        raise WhisperImportError(f"{folder}: encoder and decoder head counts differ")
    n_enc = len({k.split("/")[1] for k in v if re.match(r"encoder/layer_\d+/", k)})
    n_dec = len({k.split("/")[1] for k in v if re.match(r"decoder/layer_\d+/", k)})
    config = ModelConfig.whisper(
        n_mels=v["encoder/conv1/weight"].shape[1], n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=d, n_audio_head=n_heads, n_audio_layer=n_enc, n_vocab=v["decoder/embeddings/weight"].shape[0],
        n_text_ctx=v["decoder/position_encodings/encodings"].shape[0], n_text_state=d, n_text_head=n_heads,
        n_text_layer=n_dec)
    _check_encoder_positions(v["encoder/position_encodings/encodings"], str(folder))
    out: dict[str, Tensor] = {}

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = weight(f"{src}/weight")
        out[f"{dst}.bias"] = v[f"{src}/bias"].float()

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = v[f"{src}/gamma"].float()
        out[f"{dst}.bias"] = v[f"{src}/beta"].float()

    def split(src: str, dsts: list[str]) -> None:
        """A fused projection (q|k|v or k|v) back into separate ones; Whisper's key has no bias."""
        ws = weight(f"{src}/weight").chunk(len(dsts))
        bs = v[f"{src}/bias"].float().chunk(len(dsts))
        for w, b, dst in zip(ws, bs, dsts):
            out[f"{dst}.weight"] = w
            if dst.endswith(".key"):
                if b.abs().max() > 0:
                    raise WhisperImportError(f"{folder}: {src} has a key bias; Whisper's keys have none")
            else:
                out[f"{dst}.bias"] = b

    linear("encoder/conv1", "subsampling.conv1")
    linear("encoder/conv2", "subsampling.conv2")
    for i in range(n_enc):
        s, t = f"encoder/layer_{i}", f"encoder_layers.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{t}.attn_norm")
        split(f"{s}/self_attention/linear_0", [f"{t}.attn.query", f"{t}.attn.key", f"{t}.attn.value"])
        linear(f"{s}/self_attention/linear_1", f"{t}.attn.out")
        norm(f"{s}/ffn/layer_norm", f"{t}.ff_norm")
        linear(f"{s}/ffn/linear_0", f"{t}.ff.fc1")
        linear(f"{s}/ffn/linear_1", f"{t}.ff.fc2")
    norm("encoder/layer_norm", "encoder_norm")
    out["encoder_positions.table"] = v["encoder/position_encodings/encodings"].float()
    out["embedding.weight"] = weight("decoder/embeddings/weight")
    out["decoder_positions.table"] = v["decoder/position_encodings/encodings"].float()
    for i in range(n_dec):
        s, t = f"decoder/layer_{i}", f"decoder_layers.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{t}.self_norm")
        split(f"{s}/self_attention/linear_0", [f"{t}.self_attn.query", f"{t}.self_attn.key", f"{t}.self_attn.value"])
        linear(f"{s}/self_attention/linear_1", f"{t}.self_attn.out")
        norm(f"{s}/attention/layer_norm", f"{t}.cross_norm")
        linear(f"{s}/attention/linear_0", f"{t}.cross_attn.query")
        split(f"{s}/attention/linear_1", [f"{t}.cross_attn.key", f"{t}.cross_attn.value"])
        linear(f"{s}/attention/linear_2", f"{t}.cross_attn.out")
        norm(f"{s}/ffn/layer_norm", f"{t}.ff_norm")
        linear(f"{s}/ffn/linear_0", f"{t}.ff.fc1")
        linear(f"{s}/ffn/linear_1", f"{t}.ff.fc2")
    norm("decoder/layer_norm", "decoder_norm")
    return config, out


def detect_format(src: Path) -> str:
    """``openai``, ``huggingface`` or ``ctranslate2`` (or a clear error)."""
    if src.is_file():
        return "openai"
    if src.is_dir():
        if (src / "model.bin").is_file():
            return "ctranslate2"
        if (src / "config.json").is_file() and any(src.glob("*.safetensors")):
            return "huggingface"
        raise WhisperImportError(f"{src}: neither a CTranslate2 folder (model.bin) nor a Hugging Face folder "
                                 "(config.json + *.safetensors)")
    raise FileNotFoundError(f"{src}: no such file or folder; give an openai-whisper .pt file, a Hugging Face "
                            "folder or a CTranslate2 folder")


READERS: dict[str, Callable[[Path], tuple[ModelConfig, dict[str, Tensor]]]] = {
    "openai": from_openai, "huggingface": from_huggingface, "ctranslate2": from_ctranslate2}


#: where each format keeps its alignment heads, ``[[decoder layer, head], ...]`` (an openai-whisper
#: ``.pt`` has none: openai-whisper keeps a table by model name in its code)
ALIGNMENT_HEADS_FILES = {"huggingface": "generation_config.json", "ctranslate2": "config.json"}


def stored_alignment_heads(src: Path, fmt: str, config: ModelConfig) -> list[list[int]]:
    """The alignment heads the converted model stores next to its weights (for word times,
    :mod:`speechformer.alignment`), or ``[]`` when it stores none. A list that does not fit the
    model (a head it does not have) is refused, naming the file."""
    path = src / ALIGNMENT_HEADS_FILES[fmt] if fmt in ALIGNMENT_HEADS_FILES else None
    if path is None or not path.is_file():
        return []
    try:
        heads = json.loads(path.read_text(encoding="utf-8")).get("alignment_heads") or []
        heads = [[int(layer), int(head)] for layer, head in heads]
        return ModelConfig.from_dict({**config.to_dict(), "alignment_heads": heads}).alignment_heads
    except (ValueError, TypeError, AttributeError) as err:
        raise WhisperImportError(f"{path}: alignment_heads is not a list of [layer, head] pairs of this model "
                                 f"({err})") from err


def load_whisper(src: str | Path) -> tuple[SpeechTransformer, str]:
    """A Whisper checkpoint in any of the three formats as a speechformer model (and the format),
    with the alignment heads the format stores (:func:`stored_alignment_heads`)."""
    src = Path(src)
    fmt = detect_format(src)
    config, state = READERS[fmt](src)
    config.alignment_heads = stored_alignment_heads(src, fmt, config)
    model = SpeechTransformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), fmt


def find_tokenizer_json(src: Path, tokenizer: str | Path | None) -> Path | None:
    if tokenizer:
        path = Path(tokenizer)
        path = path / WHISPER_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        return path
    candidate = (src if src.is_dir() else src.parent) / WHISPER_FILE
    return candidate if candidate.is_file() else None


def import_whisper(src: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                   language: str = "en", task: str = "transcribe") -> Path:
    """Convert ``src`` into a speechformer model folder ``out``; returns ``out``.

    The tokenizer comes from ``tokenizer`` (a ``tokenizer.json`` or a folder with one) or
    from next to the weights; without one the weights are still imported, and the folder
    needs a ``tokenizer.json`` before it can transcribe.
    """
    from .transcribe import ModelBundle, export_model

    src = Path(src)
    model, fmt = load_whisper(src)
    tok_path = find_tokenizer_json(src, tokenizer)
    multilingual = model.config.vocab_size >= MULTILINGUAL_MIN_VOCAB
    tok = None
    if tok_path is not None:
        tok = WhisperTokenizer(tok_path.read_text(encoding="utf-8"), multilingual, language, task)
        if tok.vocab_size > model.config.vocab_size:
            raise WhisperImportError(f"{tok_path}: {tok.vocab_size} tokens, more than the model's "
                                     f"{model.config.vocab_size}; is it the tokenizer of this model?")
    model.config.bos_id = tok.sot if tok is not None else model.config.bos_id
    model.config.eos_id = tok.eot if tok is not None else model.config.eos_id
    bundle = ModelBundle(model, tok, WHISPER_WINDOW_SECONDS, {"source": f"{fmt}:{src.resolve().name}"})  # type: ignore[arg-type]
    return export_model(bundle, out)
