#!/usr/bin/env python3
"""Regenerate every figure of docs/transformers-from-scratch.md from speechformer's own code.

    python docs/make_figures.py                 # trains a tiny model first (a few minutes on CPU)
    python docs/make_figures.py --model exp/model   # or use a trained model (export dir or .ckpt)

Offline: the corpus is spoken by eSpeak NG (``data_prep/synthetic.py``), the model is
trained here with the toolkit's own Lightning module. The tiny model learns to read
random digit sequences ("seven two nine four"): with no grammar to lean on, the decoder
must look at the audio in order, so its cross-attention learns a clear alignment within
a couple of minutes of CPU. Every figure name is in ``FIGURES``; the tests check the doc
references only those.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIGITS = "zero one two three four five six seven eight nine".split()


def load_synthetic():
    """``data_prep/synthetic.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("data_prep_synthetic", ROOT / "data_prep" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def digit_corpus(out: Path, num_train: int = 400, num_test: int = 8, seed: int = 0) -> Path:
    """Random sequences of 3 to 6 spoken digits, one voice: ``out/{train,test}.jsonl``.

    Raises ``synthetic.EspeakUnavailable`` when eSpeak NG is missing."""
    syn = load_synthetic()
    kind = syn.find_backend()
    if (out / "test.jsonl").is_file() and (out / "stamp.json").is_file() and \
            json.loads((out / "stamp.json").read_text()) == [num_train, num_test, seed]:
        return out
    rng = random.Random(seed)
    plans = []
    for split, count in (("train", num_train), ("test", num_test)):
        (out / "wavs" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            text = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 6)))
            plans.append(syn.UtterancePlan(
                split=split, utt_id=f"{split}_{i:05d}", text=text, spoken=text, voice="en-us", variant="m1",
                rate=rng.randint(150, 190), pitch=50, lead_s=round(rng.uniform(0.05, 0.3), 3),
                trail_s=round(rng.uniform(0.05, 0.3), 3), noise="white", snr_db=30.0, peak=0.8,
                noise_seed=rng.getrandbits(32)))
    samples = syn.render_all(plans, kind, out)
    for split in ("train", "test"):
        rows = [{"id": p.utt_id, "audio": p.audio, "duration": round(samples[p.utt_id] / 16000, 3),
                 "text": p.text, "speaker": p.speaker} for p in plans if p.split == split]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "stamp.json").write_text(json.dumps([num_train, num_test, seed]))
    return out


def train_tiny_model(corpus: Path, exp: Path, epochs: int = 12, seed: int = 0) -> Path:
    """Train a tiny transformer on the digit corpus; returns the exported model folder."""
    import lightning as L
    import torch

    from speechformer.data import SpeechDataModule, read_manifest
    from speechformer.lightning import SpeechModule
    from speechformer.model import ModelConfig
    from speechformer.tokenizer import train_tokenizer
    from speechformer.transcribe import export_model, load_model

    train = corpus / "train.jsonl"
    train_tokenizer([u.text for u in read_manifest(train)], 32, exp / "tokenizer")
    L.seed_everything(seed, verbose=False)
    config = ModelConfig(d_model=96, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2,
                         subsampling_channels=32, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0,
                         ctc_weight=0.3, label_smoothing=0.0)
    module = SpeechModule(model=config, tokenizer=str(exp / "tokenizer"), lr=3e-3, warmup_steps=30)
    data = SpeechDataModule(train_manifest=str(train), valid_manifest=str(corpus / "test.jsonl"),
                            tokenizer=str(exp / "tokenizer"), max_batch_seconds=40.0, num_workers=0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=epochs,
                        default_root_dir=str(exp), use_distributed_sampler=False, gradient_clip_val=5.0,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    ckpt = exp / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    return export_model(load_model(ckpt), exp / "model")
