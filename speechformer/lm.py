"""A language model over the acoustic model's BPE pieces: the decoder stack alone.

The speech model's decoder reads its tokens so far (causal self-attention) and the audio
(cross-attention into the encoder memory). Take the audio away and what is left predicts the
next piece of a sentence from the pieces before it: a language model (LM). It is built from
the same parts: :class:`~speechformer.model.TokenEmbedding` (tied de-embedding), sinusoidal
positions, :class:`~speechformer.model.DecoderLayer` with ``cross_attention=False``, a final
LayerNorm; so it has the same key/value caches for incremental decoding.

A sentence is ``<s> t1 .. tn </s>`` over the tokenizer's ids (``bos_id`` 2, ``eos_id`` 3): the
model reads ``<s> t1 .. tn`` and learns to predict ``t1 .. tn </s>``. Its perplexity is
``exp`` of the mean negative log-probability of those predictions, per piece (the end included).

Incremental use (decoding, shallow fusion): :meth:`LanguageModel.step` takes the prefixes
``[N, L]`` (each starting with ``<s>``) or only their last tokens ``[N]``, and a cache
(:class:`~speechformer.model.DecoderState` with self-attention caches only; ``None`` at the
start), feeds the tokens the cache has not seen, and returns the next-piece log-probabilities
``[N, V]`` and the cache; ``cache.reorder(index)`` makes row i of the cache row ``index[i]``
(beam search's parents; the batch may shrink).

A trained LM is a folder like an exported acoustic model: ``config.json`` (``"format":
"speechformer-lm"``, the ``"lm"`` settings), ``model.safetensors``, ``tokenizer.model``
(:func:`export_lm`, :func:`load_lm`). :func:`load_lm_for_model` (:func:`check_tokenizer_matches`)
refuses an LM whose pieces are not the acoustic model's. Training (``speechformer lm train``) is :mod:`speechformer.lm_train`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atomic import atomic_write, atomic_write_text
from .errors import UserError
from .model import DecoderLayer, DecoderState, KVCache, SinusoidalPositions, TokenEmbedding
from .model.config import check_layer_settings, settings_from_dict
from .model.layers import Dropout
from .tokenizer import BOS_ID, EOS_ID, MODEL_FILE, Tokenizer, load_tokenizer

LM_FORMAT = "speechformer-lm"
RETRAIN = "train it again with `speechformer lm train` (or copy the folder again)"


@dataclass
class LMConfig:
    """The sizes of a :class:`LanguageModel`; ``vocab_size`` 0 means "take it from the tokenizer"."""

    vocab_size: int = 0
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    n_layers: int = 4
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "relu"
    max_positions: int = 256  # <s> + pieces of the longest sentence
    layer_norm_eps: float = 1e-5
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        check_layer_settings(self, "lm config", ("d_model", "n_heads", "d_ff", "n_layers", "max_positions"))
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"lm config: activation must be relu or gelu, got {self.activation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "LMConfig":
        """The settings a config.json stores, each checked (a ``ValueError`` names the setting)."""
        return settings_from_dict(cls, data, "lm config")


class LanguageModel(nn.Module):
    """The decoder stack alone: embedding + positions, causal DecoderLayers, LayerNorm, tied logits."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("lm config: vocab_size must be set (from the tokenizer) before building the model")
        self.config = c = config
        self.embedding = TokenEmbedding(c.vocab_size, c.d_model, scale=True)
        self.positions = SinusoidalPositions(c.max_positions, c.d_model)
        self.layers = nn.ModuleList(
            DecoderLayer(c.d_model, c.n_heads, c.d_ff, c.dropout, c.attention_dropout, c.activation, True,
                         c.layer_norm_eps, c.activation_dropout, cross_attention=False)
            for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.dropout)

    def forward(self, tokens: Tensor, cache: DecoderState | None = None) -> Tensor:
        """Tokens [N, L] (the new ones, when ``cache`` holds the past) -> logits [N, L, vocab]."""
        x = self.dropout(self.positions(self.embedding(tokens), offset=cache.offset if cache is not None else 0))
        for i, layer in enumerate(self.layers):
            x = layer(x, None, None, self_cache=cache.self_caches[i] if cache is not None else None)
        return self.embedding.logits(self.norm(x))

    def init_cache(self, batch: int, max_len: int | None = None) -> DecoderState:
        """Empty key/value caches for ``batch`` rows of up to ``max_len`` tokens (default: all positions)."""
        c, w = self.config, self.embedding.weight
        length = min(max_len or c.max_positions, c.max_positions)
        caches = [KVCache(batch, c.n_heads, length, c.d_model // c.n_heads, w.device, w.dtype) for _ in self.layers]
        return DecoderState(caches, [])

    def step(self, tokens: Tensor, cache: DecoderState | None = None) -> tuple[Tensor, DecoderState]:
        """Next-piece log-probabilities [N, vocab] (float32) after each row's prefix, and the cache.

        ``tokens``: the prefixes [N, L] (starting with ``<s>``; the cache holds their first
        ``cache.offset`` tokens and the rest are fed), or the last token of each [N] (one new
        token per row). ``cache`` None starts a new one. Equals the full forward's last
        position (``tests/test_lm.py::test_step_with_cache_equals_the_full_forward``).
        """
        if cache is None:
            cache = self.init_cache(tokens.shape[0])
        new = tokens[:, None] if tokens.dim() == 1 else tokens[:, cache.offset:]
        if new.shape[1] == 0:
            raise ValueError(f"lm step: the cache already holds all {tokens.shape[1]} tokens; give the new ones")
        logits = self(new, cache)[:, -1]
        return logits.float().log_softmax(-1), cache

    def start(self, batch: int) -> tuple[Tensor, DecoderState]:
        """:meth:`step` after ``<s>`` alone: the first pieces' log-probabilities for ``batch`` rows."""
        bos = torch.full((batch, 1), self.config.bos_id, dtype=torch.long, device=self.embedding.weight.device)
        return self.step(bos)

    def sentence_nll(self, sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Negative log-probability of each sentence (pieces, without <s>/</s>) and its predicted
        tokens (pieces + the end): ``(nll [N], counts [N])``, teacher-forced in one batch."""
        inputs, targets = pad_batch(sequences, self.config, self.embedding.weight.device)
        logits = self(inputs).float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        return nll.sum(1), (targets != -100).sum(1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def pad_batch(sequences: Sequence[Sequence[int]], config: LMConfig, device: torch.device | str = "cpu"
              ) -> tuple[Tensor, Tensor]:
    """Inputs ``<s> t1 .. tn`` and targets ``t1 .. tn </s>`` [N, L], padded (targets with -100)."""
    length = max(len(s) for s in sequences) + 1
    inputs = torch.full((len(sequences), length), config.eos_id, dtype=torch.long)
    targets = torch.full((len(sequences), length), -100, dtype=torch.long)
    for i, s in enumerate(sequences):
        inputs[i, 0] = config.bos_id
        inputs[i, 1:len(s) + 1] = torch.tensor(s, dtype=torch.long)
        targets[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        targets[i, len(s)] = config.eos_id
    return inputs.to(device), targets.to(device)


@torch.no_grad()
def perplexity(model: LanguageModel, sequences: Sequence[Sequence[int]], batch_size: int = 64) -> float:
    """``exp`` of the mean negative log-probability per predicted piece (the end included)."""
    if not sequences:
        raise ValueError("perplexity: no sentences to score")
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths: little padding
    for start in range(0, len(order), batch_size):
        nll, n = model.sentence_nll([sequences[i] for i in order[start:start + batch_size]])
        total, count = total + float(nll.sum()), count + int(n.sum())
    return math.exp(total / count)


@torch.no_grad()
def complete(model: LanguageModel, prompt: Sequence[int], max_new: int = 50) -> list[int]:
    """The prompt's pieces followed by the likeliest next piece, again and again (greedy), until
    the end token, ``max_new`` pieces or the last position. The end token is not returned."""
    model.eval()
    tokens = [model.config.bos_id, *prompt]
    if len(tokens) > model.config.max_positions:
        raise ValueError(f"lm complete: the prompt is {len(prompt)} pieces; this model reads at most "
                         f"{model.config.max_positions - 1}")
    log_probs, cache = model.step(torch.tensor([tokens], device=model.embedding.weight.device))
    for _ in range(max_new):
        best = int(log_probs[0].argmax())
        if best == model.config.eos_id:
            break
        tokens.append(best)
        if len(tokens) >= model.config.max_positions:
            break
        log_probs, cache = model.step(torch.tensor([best], device=model.embedding.weight.device), cache)
    return tokens[1:]


# ---------------------------------------------------------------------------- model folders
@dataclass
class LMBundle:
    """A language model with its tokenizer and the folder's metadata."""

    model: LanguageModel
    tokenizer: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)


def export_lm(model: LanguageModel, tokenizer: Tokenizer, out_dir: str | Path, **meta: Any) -> Path:
    """Write an LM folder (config.json, model.safetensors, tokenizer.model), each file atomically."""
    from safetensors.torch import save_file

    from .stored import CONFIG_FILE, WEIGHTS_FILE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    atomic_write(out / MODEL_FILE, lambda tmp: tmp.write_bytes(tokenizer.model_proto))
    info = {"format": LM_FORMAT, "lm": model.config.to_dict(), **meta}
    atomic_write_text(out / CONFIG_FILE, json.dumps(info, indent=2) + "\n")
    return out


def load_lm(path: str | Path, device: str | torch.device = "cpu") -> LMBundle:
    """An LM folder written by :func:`export_lm`; whatever is wrong with it is one line naming the file."""
    from .stored import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_safetensors, read_tokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--lm {folder}", "no such folder", "give a folder written by `speechformer lm train`")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(folder, f"no {CONFIG_FILE}", "give a folder written by `speechformer lm train`")
    meta = _lm_settings(cfg_path, folder)
    try:
        config = LMConfig.from_dict(meta["lm"])
        model = LanguageModel(config)
    except ValueError as err:
        raise UserError(cfg_path, str(err), f"fix the setting or {RETRAIN}") from err
    load_weights(model, read_safetensors(folder / WEIGHTS_FILE), folder, RETRAIN, assign=True)
    if not (folder / MODEL_FILE).is_file():
        raise UserError(folder / MODEL_FILE, "not found (an LM folder holds its tokenizer)", RETRAIN)
    tokenizer = read_tokenizer(folder / MODEL_FILE, RETRAIN, lambda: load_tokenizer(folder / MODEL_FILE))
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(folder, f"its tokenizer has {tokenizer.vocab_size} pieces, its model {config.vocab_size}",
                        RETRAIN)
    return LMBundle(model.to(device).eval(), tokenizer, meta)


def _lm_settings(cfg_path: Path, folder: Path) -> dict[str, Any]:
    """config.json with its "lm" object; an acoustic model's folder (a "model" object) is named as such."""
    from .stored import read_config_json

    try:
        return read_config_json(cfg_path, section="lm", redo=RETRAIN)
    except UserError as err:
        try:
            read_config_json(cfg_path, section="model")
        except UserError:
            raise err from None
        raise UserError(f"--lm {folder}", "an acoustic model's folder, not a language model",
                        "give a folder written by `speechformer lm train`") from None


def load_lm_for_model(lm_path: str | Path, tokenizer: Any, model_path: object,
                      device: str | torch.device = "cpu") -> LMBundle:
    """The LM folder ``lm_path`` for decoding with the acoustic model at ``model_path`` (whose
    tokenizer is ``tokenizer``): refused in one line unless both have the same pieces."""
    lm = load_lm(lm_path, device)
    check_tokenizer_matches(lm, tokenizer, lm_path, model_path)
    return lm


def check_tokenizer_matches(lm: LMBundle, tokenizer: Any, lm_path: object, model_path: object) -> None:
    """Refuse an LM whose pieces are not the acoustic model's: its scores would be of other tokens."""
    if not isinstance(tokenizer, Tokenizer):
        raise UserError(f"--lm {lm_path}", f"{model_path} has no sentencepiece tokenizer (a Whisper model?)",
                        "use a language model only with a speechformer model whose tokenizer it was trained on")
    ours, theirs = lm.tokenizer.vocab_size, tokenizer.vocab_size
    if ours != theirs or lm.tokenizer.pieces(range(ours)) != tokenizer.pieces(range(theirs)):
        differ = f"{ours} pieces against {theirs}" if ours != theirs else "the same number of pieces, not the same ones"
        raise UserError(f"--lm {lm_path}", f"its tokenizer is not the one of {model_path} ({differ})",
                        f"train the LM with `speechformer lm train --tokenizer` on {model_path}'s tokenizer")
