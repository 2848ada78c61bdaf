"""`speechformer fit --config X.yaml` through LightningCLI: checkpoints, logs, and resume from last."""

from __future__ import annotations

import csv
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechformer.decoding import DecodeOptions
from speechformer.transcribe import load_checkpoint

pytestmark = pytest.mark.slow

CONFIG = """\
seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  precision: bf16-mixed
  gradient_clip_val: 5.0       # as the recipes: clipping under mixed precision must work
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  default_root_dir: {exp}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {exp}, name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {exp}/checkpoints
        filename: "epoch{{epoch:02d}}-wer{{val_wer:.4f}}"
        auto_insert_metric_name: false
        monitor: val_wer
        save_top_k: 2
        save_last: true
model:
  model: {{d_model: 32, n_heads: 2, d_ff: 64, n_encoder_layers: 1, n_decoder_layers: 1, subsampling_channels: 8}}
  warmup_steps: 5
data:
  train_manifest: {corpus}/train.jsonl
  valid_manifest: {corpus}/valid.jsonl
  tokenizer: {exp}/tokenizer
  max_batch_seconds: 8
  num_workers: 0
"""


def cli(*args: str, warnings: bool = False) -> subprocess.CompletedProcess:
    """Run ``speechformer ARGS``; with ``warnings`` Python's warnings are shown, as a user sees them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    if not warnings:
        env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-m", "speechformer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


#: What every `fit` printed that was not the user's business (tests/test_train.py checks each is gone)
NOISE = ("LightningCLI's args parameter is intended",  # LightningCLI: args given and sys.argv too
         "Unable to serialize instance",  # jsonargparse, on the AtomicCheckpointIO default
         "Tip: For seamless cloud",  # Lightning's litlogger / litmodels advertisements
         "LeafSpec",  # a torch deprecation inside Lightning's _pytree
         "/-2",  # the progress bar's "Epoch 4/-2" when training by max_steps
         "Total FLOPs: 0", "Total Flops")  # the model summary's FLOPs, never counted


def assert_no_noise(proc: subprocess.CompletedProcess) -> None:
    output = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in output], output[-4000:]


def test_fit_from_yaml_writes_checkpoints_and_logs_then_resumes_from_last(tiny_corpus, tmp_path):
    exp = tmp_path / "exp"
    config = tmp_path / "train.yaml"
    config.write_text(CONFIG.format(exp=exp, corpus=tiny_corpus))
    cli("tokenizer", "train", "--manifest", str(tiny_corpus / "train.jsonl"), "--vocab-size", "40",
        "--out", str(exp / "tokenizer"))
    # no checkpoint yet: starts fresh; shown as a user sees it (warnings, progress bar, model summary)
    proc = cli("fit", "--config", str(config), "--ckpt_path", "last", "--trainer.enable_model_summary", "true",
               "--trainer.enable_progress_bar", "true", warnings=True)
    assert "Total params" in proc.stdout and "Epoch 1" in proc.stdout  # the summary and the bar were shown
    assert_no_noise(proc)
    last = exp / "checkpoints" / "last.ckpt"
    first = load_checkpoint(last)
    steps_per_epoch = first["global_step"] // 2
    assert first["epoch"] == 1 and steps_per_epoch > 0
    assert first["speechformer"]["val_wer"] is not None
    ranked = [p for p in (exp / "checkpoints").glob("epoch*.ckpt")]
    assert len(ranked) == 2  # the best two by validation WER
    metrics = list(csv.DictReader(open(next((exp / "logs").glob("version_*/metrics.csv")))))
    assert any(row.get("val_wer") for row in metrics) and any(row.get("train_loss") for row in metrics)
    # model FLOPs utilisation is in the training log, against the peak measured at the start
    mfu = [float(row["mfu"]) for row in metrics if row.get("mfu")]
    assert mfu and all(0.0 < x < 1.5 for x in mfu)

    # "the job was killed": run the same command with one more epoch's steps; it continues from last.ckpt
    proc = cli("fit", "--config", str(config), "--trainer.max_epochs", "-1", "--trainer.max_steps",
               str(first["global_step"] + steps_per_epoch), "--ckpt_path", "last", "--trainer.enable_progress_bar",
               "true", warnings=True)
    assert "Epoch 2" in proc.stdout  # the bar, without "/-2" (max_epochs is -1)
    assert_no_noise(proc)
    resumed = load_checkpoint(last)
    info = {k: resumed[k] for k in ("epoch", "global_step")} | {"first_step": first["global_step"]}
    assert resumed["global_step"] == first["global_step"] + steps_per_epoch, info  # continued, not restarted
    assert resumed["epoch"] in (2, 3), info  # Lightning may count the finished epoch
    sched = resumed["lr_schedulers"][0]
    assert sched["last_epoch"] == resumed["global_step"]  # the LR schedule continued too


def test_fit_rejects_a_missing_tokenizer_before_training(tiny_corpus, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(CONFIG.format(exp=tmp_path / "exp", corpus=tiny_corpus))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "speechformer.cli", "fit", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "tokenizer" in proc.stderr and "speechformer tokenizer train" in proc.stderr
    assert not (tmp_path / "exp" / "checkpoints").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--data.max_batch_seconds", "-5", "data.max_batch_seconds must be positive, got -5"),
    ("--model.model.n_heads", "3", "d_model=32 must be divisible by n_heads=3"),
])
def test_fit_rejects_wrong_flag_values_before_training_naming_the_flag(tiny_corpus, tmp_path, flag, value, message):
    from speechformer.data import read_manifest
    from speechformer.tokenizer import train_tokenizer

    exp = tmp_path / "exp"
    train_tokenizer([u.text for u in read_manifest(tiny_corpus / "train.jsonl")], 40, exp / "tokenizer")
    config = tmp_path / "train.yaml"
    config.write_text(CONFIG.format(exp=exp, corpus=tiny_corpus))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "speechformer.cli", "fit", "--config", str(config), flag, value],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (exp / "checkpoints").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batch_seconds": 0}, "data.max_batch_seconds must be positive"),
    ({"num_workers": -1}, "data.num_workers must be at least 0"),
    ({"max_duration": 50.0, "max_batch_seconds": 20.0}, "data.max_duration (50.0 s) is longer than"),
    ({"lr": 0.0}, "model.lr must be positive"),
    ({"decoding": DecodeOptions(beam_size=0)}, "model.decoding.beam_size: must be at least 1, got 0"),
    ({"warmup_steps": -1}, "model.warmup_steps must be at least 0"),
    ({"max_bad_steps": 0}, "model.max_bad_steps must be at least 1"),
])
def test_wrong_settings_fail_at_construction_naming_the_setting(kwargs, message):
    from speechformer.data import SpeechDataModule
    from speechformer.lightning import SpeechModule

    cls = SpeechModule if any(k in ("lr", "decoding", "warmup_steps", "max_bad_steps") for k in kwargs) \
        else SpeechDataModule
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**kwargs)
