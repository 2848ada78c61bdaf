"""Shared fixtures: a tiny spoken corpus (espeak-ng) and a tiny model overfit on it.

The overfit model is trained once per test session (about a minute on 2 CPU cores) and
reused by the CLI tests, so `speechformer transcribe` and `evaluate` run on a model that
really maps audio to text.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_data_prep(name: str):
    """Import ``data_prep/NAME.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", ROOT / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synthetic():
    return load_data_prep("synthetic")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, synthetic) -> Path:
    """8 train / 2 valid / 2 test utterances spoken by espeak-ng."""
    try:
        synthetic.find_backend()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no espeak-ng backend: {err}")
    out = tmp_path_factory.mktemp("tiny_corpus")
    synthetic.generate_corpus(out, num_train=8, num_valid=2, num_test=2, seed=7, jobs=1)
    return out


@pytest.fixture(scope="session")
def overfit_model(tmp_path_factory, tiny_corpus) -> dict[str, Path]:
    """A tiny transformer trained to memorise the 8 training utterances.

    Returns paths: ``ckpt`` (last Lightning checkpoint), ``model`` (exported dir),
    ``train`` (the manifest it learnt).
    """
    import lightning as L
    import torch

    from speechformer.data import SpeechDataModule, read_manifest
    from speechformer.lightning import SpeechModule
    from speechformer.model import ModelConfig
    from speechformer.tokenizer import train_tokenizer
    from speechformer.transcribe import export_model, load_model

    exp = tmp_path_factory.mktemp("overfit")
    train = tiny_corpus / "train.jsonl"
    train_tokenizer([u.text for u in read_manifest(train)], 48, exp / "tokenizer")
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(2)
    config = ModelConfig(d_model=96, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2,
                         subsampling_channels=32, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0,
                         ctc_weight=0.3, label_smoothing=0.0)
    module = SpeechModule(model=config, tokenizer=str(exp / "tokenizer"), lr=3e-3, warmup_steps=20)
    data = SpeechDataModule(train_manifest=str(train), valid_manifest=str(train), tokenizer=str(exp / "tokenizer"),
                            max_batch_seconds=60.0, num_workers=0)
    trainer = L.Trainer(max_epochs=150, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, check_val_every_n_epoch=150, num_sanity_val_steps=0,
                        default_root_dir=str(exp), use_distributed_sampler=False, gradient_clip_val=5.0,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(exp / "checkpoints"),
                                                                       save_last=True, monitor="val_wer")])
    trainer.fit(module, datamodule=data)
    ckpt = exp / "checkpoints" / "last.ckpt"
    export_model(load_model(ckpt), exp / "model")
    return {"ckpt": ckpt, "model": exp / "model", "train": train, "exp": exp}


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> dict[str, Path]:
    """An untrained small model (export dir and .ckpt), for what does not need training: shapes,
    files, command-line checks. Built in about a second."""
    import torch

    from speechformer.model import ModelConfig, SpeechTransformer
    from speechformer.tokenizer import train_tokenizer
    from speechformer.transcribe import ModelBundle, export_model

    out = tmp_path_factory.mktemp("random_model")
    tok = train_tokenizer(["the cat sat on the mat", "a dog ran in the park", "seven two nine four",
                           "hello world and good morning"], 40, out / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2,
                         n_decoder_layers=3, subsampling_channels=8)
    model = SpeechTransformer(config).eval()
    export_model(ModelBundle(model, tok, 20.0), out / "model")
    ckpt = out / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "speechformer": {"config": config.to_dict(), "tokenizer": tok.payload(), "max_input_seconds": 20.0}},
               ckpt)
    return {"model": out / "model", "ckpt": ckpt}
