"""A model folder on disk: its file names, and the readers that name a damaged file in one line.

Shared by the acoustic model's loader (:mod:`speechformer.transcribe`) and the language model's
(:mod:`speechformer.lm`), which sits below it: the transcriber loads an LM, so the LM cannot
import the transcriber."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .errors import UserError
from .tokenizer import AnyTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# what to do about a damaged model, a folder's and a checkpoint's
REEXPORT = "export the model again with `speechformer export` (or copy the folder again)"
RECOPY = "copy the checkpoint again, or give one written by `speechformer fit`"


def read_config_json(cfg_path: Path, section: str = "model", redo: str = REEXPORT) -> dict[str, Any]:
    """A model folder's config.json, which must hold a ``section`` object ("lm" for a language model)."""
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(cfg_path, f"not UTF-8 text ({err.reason} at byte {err.start})", redo) from err
    except json.JSONDecodeError as err:
        raise UserError(cfg_path, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})",
                        f"fix the file or {redo}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get(section), dict):
        raise UserError(cfg_path, f'no "{section}" settings (a JSON object)', redo)
    return meta


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(path, "not found", REEXPORT)
    try:
        return load_file(str(path))
    except SafetensorError as err:  # truncated, empty or not safetensors at all
        raise UserError(path, f"not a readable safetensors file ({err}); it is damaged or incomplete",
                        REEXPORT) from err


def read_tokenizer(source: object, redo: str, load: Callable[[], AnyTokenizer]) -> AnyTokenizer:
    """``load()``, with a damaged tokenizer (sentencepiece raises RuntimeError) named."""
    try:
        return load()
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise UserError(source, f"not a readable tokenizer ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})", redo) from err


def load_weights(model: torch.nn.Module, state: dict[str, Tensor], source: object, redo: str = REEXPORT,
                 assign: bool = False) -> None:
    """``model.load_state_dict(state)``, after checking the names and shapes: weights made for
    another config are one line naming the first difference and the count (not the ~180 lines of
    ``size mismatch`` torch prints). Weights saved before the attention projections were fused
    are converted first."""
    from .model.attention import fused_layout

    state = fused_layout(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if wrong:
        first = wrong[0]
        problems.append(f"{len(wrong)} of {len(expected)} tensors have other shapes than the config gives (the "
                        f"first, {first}: {list(state[first].shape)} in the weights, {list(expected[first].shape)} "
                        "from the config)")
    if missing:
        problems.append(f"{len(missing)} tensors missing (the first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config has no place for (the first: {unexpected[0]})")
    if problems:
        raise UserError(source, "weights and config do not match: " + ", ".join(problems),
                        "the config and the weights come from different models; " + redo)
    model.load_state_dict(state, assign=assign)
