"""The error rule (docs/reliability.md, "Errors"): a user error ends in one line
``error: WHAT: reason; what to do`` and a non-zero exit, never a traceback; ``--debug`` or
``SPEECHFORMER_DEBUG=1`` shows the traceback; a bug shows its traceback and an "internal
error" line. And the help: every option of every command has a help text.

The commands run in this process through :func:`speechformer.cli.main` (seconds, not a
Python start each); one subprocess checks the real stderr of a command end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import torch

from speechformer.cli import HelpParser, build_parser, main

# error: WHAT: reason; what to do  (WHAT names the file, flag, line or setting)
RULE = re.compile(r"^error: (?P<what>[^\s;][^;]*?): (?P<reason>[^;]+); (?P<hint>.+)$")


@pytest.fixture(scope="module")
def tiny(untrained_model, tmp_path_factory) -> dict[str, Path]:
    """The untrained model of conftest (exported folder and .ckpt), its tokenizer, a wav, a good
    manifest; no training."""
    out = tmp_path_factory.mktemp("tiny_inputs")
    wav = out / "a.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    manifest = out / "good.jsonl"
    manifest.write_text(json.dumps({"id": "u1", "audio": str(wav), "duration": 1.0, "text": "the cat sat"}) + "\n")
    return {**untrained_model, "wav": wav, "tokenizer": untrained_model["model"].parent / "tokenizer",
            "manifest": manifest}


# ---------------------------------------------------------------------------- making the bad inputs
def model_copy(tiny: dict[str, Path], tmp: Path, change: Callable[[Path], None]) -> Path:
    """A copy of the tiny model folder with one thing broken by ``change``."""
    folder = tmp / "broken_model"
    folder.mkdir()
    for f in tiny["model"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    change(folder)
    return folder


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / name).write_bytes((folder / name).read_bytes()[:keep])
    return change


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        meta = json.loads((folder / "config.json").read_text())
        edit(meta["model"])
        (folder / "config.json").write_text(json.dumps(meta))
    return change


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def transcribe_with(change: Callable[[Path], None]) -> Callable:
    return lambda tiny, tmp, mp: ["transcribe", "--model", str(model_copy(tiny, tmp, change)), str(tiny["wav"])]


def bad_manifest(tiny: dict[str, Path], tmp: Path, row: dict) -> Path:
    path = tmp / "train.jsonl"
    good = tiny["manifest"].read_text()
    path.write_text(good + json.dumps(row) + "\n")
    return path


def fit_args(tiny: dict[str, Path], tmp: Path, *extra: str, train: Path | None = None) -> list[str]:
    """`speechformer fit` on the tiny data (it stops in setup, before any training step)."""
    return ["fit", "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp / "exp"), "--model.peak_tflops", "1",
            "--model.model", json.dumps({"d_model": 16, "n_heads": 2, "d_ff": 32, "n_encoder_layers": 1,
                                         "n_decoder_layers": 1, "subsampling_channels": 4}),
            "--data.train_manifest", str(train or tiny["manifest"]), "--data.valid_manifest", str(tiny["manifest"]),
            "--data.tokenizer", str(tiny["tokenizer"]), *extra]


def no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def out_of_memory(monkeypatch) -> None:
    from speechformer import transcribe

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.5 GiB free.")
    monkeypatch.setattr(transcribe.Transcriber, "transcribe_items", oom)


def garbage(path: Path) -> Path:
    path.write_bytes(os.urandom(200))
    return path


def missing(tmp: Path, name: str) -> str:
    return str(tmp / name)


# (id, argv made from (tiny, tmp, monkeypatch), words the error line must contain); the ids are the
# table rows of docs/reliability.md ("Errors")
CASES = [
    # model folders and checkpoints (load_model)
    ("truncated-safetensors", transcribe_with(truncate("model.safetensors", 5000)),
     ["model.safetensors", "not a readable safetensors file"]),
    ("half-safetensors", transcribe_with(truncate("model.safetensors", 60000)),
     ["model.safetensors", "damaged or incomplete"]),
    ("config-not-json", transcribe_with(write("config.json", b'{"model": {')), ["config.json", "not valid JSON"]),
    ("config-not-utf8", transcribe_with(write("config.json", b'{"model": "\xff\xfe"}')), ["config.json", "UTF-8"]),
    ("config-wrong-type", transcribe_with(edit_config(lambda m: m.update(d_model="16"))),
     ["config.json", "d_model must be a whole number", "'16'"]),
    ("config-wrong-choice", transcribe_with(edit_config(lambda m: m.update(encoder="lstm"))),
     ["config.json", "encoder must be one of"]),
    ("config-shapes-differ", transcribe_with(edit_config(lambda m: m.update(d_model=48, d_ff=96))),
     ["weights and config do not match", "tensors have other shapes", "the first"]),
    ("tokenizer-damaged", transcribe_with(truncate("tokenizer.model", 1000)),
     ["tokenizer.model", "not a readable tokenizer"]),
    ("model-missing", lambda tiny, tmp, mp: ["export", "--model", missing(tmp, "nope.ckpt"), "--out", str(tmp / "x")],
     ["nope.ckpt", "no such model file or folder"]),
    ("checkpoint-garbage", lambda tiny, tmp, mp: ["export", "--model", str(garbage(tmp / "bad.ckpt")),
                                                  "--out", str(tmp / "x")],
     ["bad.ckpt", "not a loadable speechformer checkpoint"]),
    ("checkpoint-shapes-differ", lambda tiny, tmp, mp: ["export", "--model", str(_shrunk_ckpt(tiny, tmp)),
                                                        "--out", str(tmp / "x")],
     ["small.ckpt", "weights and config do not match", "copy the checkpoint again"]),
    # flags checked up front
    ("device-cuda-without-gpu", lambda tiny, tmp, mp: no_gpu(mp) or [
        "transcribe", "--model", str(tiny["model"]), "--device", "cuda", str(tiny["wav"])],
     ["--device cuda", "no CUDA GPU", "--device cpu"]),
    ("device-not-a-name", lambda tiny, tmp, mp: [
        "explain", "--model", str(tiny["model"]), "--device", "gpu0", str(tiny["wav"]), "--out", str(tmp / "e")],
     ["--device gpu0", "not a device name"]),
    ("flag-out-of-range", lambda tiny, tmp, mp: [
        "transcribe", "--model", str(tiny["model"]), "--beam-size", "0", str(tiny["wav"])],
     ["--beam-size", "must be at least 1, got 0"]),
    # files that are not there, or in the way
    ("output-dir-under-a-file", lambda tiny, tmp, mp: [
        "transcribe", "--model", str(tiny["model"]), str(tiny["wav"]), "--output-dir", str(tiny["wav"] / "sub")],
     ["a.wav", "cannot write there", "give a folder"]),
    ("cuda-out-of-memory", lambda tiny, tmp, mp: out_of_memory(mp) or [
        "transcribe", "--model", str(tiny["model"]), str(tiny["wav"])], ["out of memory", "--batch-seconds"]),
    ("evaluate-manifest-missing", lambda tiny, tmp, mp: [
        "evaluate", "--model", str(tiny["model"]), "--manifest", missing(tmp, "nope.jsonl"), "--out", str(tmp / "r")],
     ["nope.jsonl", "manifest not found"]),
    ("average-nothing-to-average", lambda tiny, tmp, mp: [
        "average", "--ckpt-dir", str(tmp), "--out", str(tmp / "avg.ckpt")], ["no checkpoints found"]),
    ("import-whisper-source-missing", lambda tiny, tmp, mp: [
        "import-whisper", missing(tmp, "tiny.pt"), "--out", str(tmp / "w")], ["tiny.pt", "no such file or folder"]),
    ("tokenizer-train-manifest-missing", lambda tiny, tmp, mp: [
        "tokenizer", "train", "--manifest", missing(tmp, "nope.jsonl"), "--vocab-size", "30", "--out", str(tmp / "t")],
     ["nope.jsonl", "manifest not found"]),
    ("data-validate-manifest-missing", lambda tiny, tmp, mp: ["data", "validate", missing(tmp, "nope.jsonl")],
     ["nope.jsonl", "manifest not found"]),
    ("explain-audio-missing", lambda tiny, tmp, mp: [
        "explain", "--model", str(tiny["model"]), missing(tmp, "nope.wav"), "--out", str(tmp / "e")],
     ["nope.wav", "file not found"]),
    ("plot-no-metrics", lambda tiny, tmp, mp: ["plot", str(tmp)], ["no metrics.csv"]),
    ("prepare-librispeech-root-missing", lambda tiny, tmp, mp: [
        "prepare", "librispeech", missing(tmp, "LibriSpeech"), "--out", str(tmp / "m")], ["LibriSpeech", "not a folder"]),
    ("prepare-kaldi-dir-missing", lambda tiny, tmp, mp: [
        "prepare", "kaldi", missing(tmp, "data"), "--out", str(tmp / "m.jsonl")], ["wav.scp not found"]),
    ("compute-stats-manifest-missing", lambda tiny, tmp, mp: [
        "compute-stats", missing(tmp, "nope.jsonl"), "--out", str(tmp / "s.json")], ["nope.jsonl", "manifest not found"]),
    # Lightning's commands: errors raised in setup
    ("fit-audio-missing", lambda tiny, tmp, mp: fit_args(tiny, tmp, train=bad_manifest(tiny, tmp, {
        "id": "u2", "audio": str(tmp / "gone.wav"), "duration": 1.0, "text": "a dog"})),
     ["train.jsonl:2", "gone.wav", "file not found", "data.skip_bad_lines"]),
    ("fit-wrong-duration", lambda tiny, tmp, mp: fit_args(tiny, tmp, train=bad_manifest(tiny, tmp, {
        "id": "u2", "audio": str(tiny["wav"]), "duration": 7.5, "text": "a dog"})),
     ["train.jsonl:2", "duration 7.500 s", "1.000 s long"]),
    ("fit-tokenizer-missing", lambda tiny, tmp, mp: fit_args(tiny, tmp, "--data.tokenizer", missing(tmp, "tok")),
     ["tok", "not found", "speechformer tokenizer train"]),
    ("fit-bad-setting", lambda tiny, tmp, mp: fit_args(tiny, tmp, "--data.max_batch_seconds", "-5"),
     ["data.max_batch_seconds must be positive"]),
    ("fit-gpu-accelerator-without-gpu", lambda tiny, tmp, mp: fit_args(tiny, tmp, "--trainer.accelerator", "gpu"),
     ["trainer", "gpu", "--trainer"]),
    ("validate-manifest-missing", lambda tiny, tmp, mp: ["validate", *fit_args(tiny, tmp)[1:],
                                                        "--data.valid_manifest", missing(tmp, "valid.jsonl")],
     ["valid.jsonl", "manifest not found"]),
    ("test-manifest-missing", lambda tiny, tmp, mp: ["test", *fit_args(tiny, tmp)[1:],
                                                    "--data.test_manifest", missing(tmp, "test.jsonl")],
     ["test.jsonl", "manifest not found"]),
]


def _shrunk_ckpt(tiny: dict[str, Path], tmp: Path) -> Path:
    """The tiny checkpoint with a config that says d_model 48: weights of other shapes."""
    ckpt = torch.load(tiny["ckpt"], weights_only=True)
    ckpt["speechformer"]["config"].update(d_model=48, d_ff=96)
    torch.save(ckpt, tmp / "small.ckpt")
    return tmp / "small.ckpt"


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)``'s status and stderr. Lightning's log handlers keep the stderr of the test
    that imported lightning (closed since): they are pointed at this test's for the call."""
    import logging

    handlers = [h for name, logger in logging.Logger.manager.loggerDict.items() if name.startswith("lightning")
                and isinstance(logger, logging.Logger) for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    streams = [h.stream for h in handlers]  # (not setStream: it flushes the closed stream)
    for h in handlers:
        h.stream = sys.stderr
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    finally:
        for h, stream in zip(handlers, streams):
            h.stream = stream
    return status, capsys.readouterr().err


def assert_one_error_line(status: int, err: str, words: list[str]) -> re.Match:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines and sum(line.startswith("error:") for line in lines) == 1, err[-3000:]
    match = RULE.match(lines[-1])
    assert match, f"not 'error: WHAT: reason; what to do': {lines[-1]!r}"
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return match


NEEDS_NO_GPU = {"fit-gpu-accelerator-without-gpu"}  # Lightning's own check: a GPU machine would train


@pytest.mark.parametrize(("make", "words"), [
    pytest.param(make, words, id=name, marks=pytest.mark.skipif(
        name in NEEDS_NO_GPU and torch.cuda.is_available(), reason="this machine has a GPU"))
    for name, make, words in CASES])
def test_a_user_error_ends_in_one_error_line_for_every_command(tiny, tmp_path, monkeypatch, capsys, make, words):
    monkeypatch.delenv("SPEECHFORMER_DEBUG", raising=False)
    argv = make(tiny, tmp_path, monkeypatch)
    status, err = run_main(argv, capsys)
    assert_one_error_line(status, err, words)


def test_debug_flag_and_environment_show_the_traceback_above_the_line(tiny, tmp_path, monkeypatch, capsys):
    argv = transcribe_with(truncate("model.safetensors", 5000))(tiny, tmp_path, monkeypatch)
    monkeypatch.delenv("SPEECHFORMER_DEBUG", raising=False)
    quiet_status, quiet = run_main(argv, capsys)
    for how in ("flag-first", "flag-last", "env"):
        if how == "env":
            monkeypatch.setenv("SPEECHFORMER_DEBUG", "1")
        status, err = run_main(["--debug", *argv] if how == "flag-first" else
                               [*argv, "--debug"] if how == "flag-last" else argv, capsys)
        assert status == quiet_status == 2
        assert "Traceback (most recent call last)" in err and "SafetensorError" in err, how
        assert err.splitlines()[-1] == quiet.strip(), how  # the same line, now below its traceback


def test_a_bug_shows_its_traceback_and_an_internal_error_line(tiny, monkeypatch, capsys):
    from speechformer import cli

    def buggy(args: argparse.Namespace) -> int:
        return None + 1  # a TypeError deep in the code: not the user's doing

    monkeypatch.setattr(cli, "cmd_export", buggy)
    status, err = run_main(["export", "--model", str(tiny["model"]), "--out", "x"], capsys)
    assert status == 1
    assert "Traceback (most recent call last)" in err and "return None + 1" in err
    last = err.splitlines()[-1]
    assert last.startswith("error: internal error: TypeError: unsupported operand") and "report it" in last, last


def test_the_real_stderr_of_a_failed_command_is_one_line(tiny, tmp_path):
    """End to end, in a fresh Python: nothing but the line (no warning, no traceback) on stderr."""
    broken = model_copy(tiny, tmp_path, edit_config(lambda m: m.update(n_heads="2")))  # a TypeError deep inside
    env = {k: v for k, v in os.environ.items() if k != "SPEECHFORMER_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "speechformer.cli", "transcribe", "--model", str(broken),
                           str(tiny["wav"])], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and RULE.match(proc.stderr.strip()), proc.stderr
    assert f"{broken / 'config.json'}: model config: n_heads must be a whole number, got '2'" in proc.stderr


# ---------------------------------------------------------------------------- help
def subparsers(parser: argparse.ArgumentParser, name: str = "speechformer"):
    """(name, parser) of every command and sub-command, depth first."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from subparsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help_and_shows_its_default():
    parser = build_parser()
    commands = dict(subparsers(parser))
    assert {"speechformer transcribe", "speechformer evaluate", "speechformer export", "speechformer average",
            "speechformer import-whisper", "speechformer tokenizer train", "speechformer data validate",
            "speechformer explain", "speechformer plot", "speechformer prepare librispeech",
            "speechformer compute-stats"} <= set(commands)
    for name, sub in commands.items():
        if isinstance(sub, HelpParser):
            sub.add_late_flags()  # the flags made from dataclasses (transcription options, lm train's settings)
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{label}: no help text"
            unset = action.default is None or action.default is False or action.default in ("", []) \
                or action.default is argparse.SUPPRESS  # an option not typed is the model's default
            if action.option_strings and not unset and not action.required:
                rendered = sub._get_formatter()._get_help_string(action) % {"default": action.default}
                assert "default" in rendered and (str(action.default) in rendered or "default:" in rendered), \
                    f"{label}: default {action.default!r} not shown: {rendered!r}"
        assert "``" not in text, f"{name} --help shows reST markup"
    top = parser.format_help()
    assert "``" not in top and ":mod:" not in top
    assert "--debug" in top and "SPEECHFORMER_DEBUG" in top
