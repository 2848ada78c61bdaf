"""What the commands read and write: an output never replaces an input or a recording, a bad
input path is one file's failure, the output folder is checked before any work.

The model is the untrained one of conftest.py: these are checks on paths, not on transcripts,
and a real (if meaningless) transcription shows what main did before the checks: it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import speechformer.transcribe
from speechformer.cli import main


def _recording(path: Path, seconds: float = 0.3, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, **kwargs)
    return path


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """Every model load of the command (to show a check came before it)."""
    calls: list[str] = []
    real = speechformer.transcribe.load_model

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(speechformer.transcribe, "load_model", spy)
    return calls


# ---------------------------------------------------------------------------- outputs
def test_a_shell_glob_expanding_into_output_is_refused_and_the_audio_kept(untrained_model, tmp_path):
    """`--output in/*.flac`: the shell makes the first recording the output file."""
    for name in ("a.flac", "b.flac", "c.flac"):
        _recording(tmp_path / "in" / name)
    before = (tmp_path / "in" / "a.flac").read_bytes()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(f"'{sys.executable}' -m speechformer.cli transcribe --model '{untrained_model['model']}' "
                          "--output in/*.flac", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --output in/a.flac: is an existing audio file") and "glob" in lines[0]
    assert (tmp_path / "in" / "a.flac").read_bytes() == before


def _same_file_twice(tmp: Path) -> tuple[list[str], Path]:
    x = _recording(tmp / "x.flac")
    return ["--output", "x.flac", "x.flac"], x


def _other_spelling(tmp: Path) -> tuple[list[str], Path]:
    x = _recording(tmp / "x.wav")
    return ["--output", "./x.wav", str(x)], x


def _symlink_to_input(tmp: Path) -> tuple[list[str], Path]:
    x = _recording(tmp / "x.wav")
    (tmp / "link.out").symlink_to(x)
    return ["--output", "link.out", "x.wav"], x


def _hard_link_to_input(tmp: Path) -> tuple[list[str], Path]:
    x = _recording(tmp / "x.wav")
    os.link(x, tmp / "same.txt")
    return ["--output", "same.txt", "x.wav"], x


def _text_file_given_as_input(tmp: Path) -> tuple[list[str], Path]:
    notes = tmp / "notes.txt"  # not audio: only "it is an input" protects it
    notes.write_text("my notes\n")
    return ["--output", "notes.txt", "notes.txt", str(_recording(tmp / "y.wav"))], notes


def _recording_without_audio_name(tmp: Path) -> tuple[list[str], Path]:
    take = _recording(tmp / "take1.dat", format="WAV")  # audio by its header only
    return ["--output", "take1.dat", str(_recording(tmp / "y.wav"))], take


def _output_dir_file_is_an_input(tmp: Path) -> tuple[list[str], Path]:
    odd = _recording(tmp / "d" / "a.txt", format="WAV")  # a wav named .txt: --output-dir d writes d/a.txt
    return ["--output-dir", "d", "d/a.txt"], odd


@pytest.mark.parametrize("case", [_same_file_twice, _other_spelling, _symlink_to_input, _hard_link_to_input,
                                  _text_file_given_as_input, _recording_without_audio_name,
                                  _output_dir_file_is_an_input])
def test_an_output_is_never_an_input_or_an_existing_audio_file(case, untrained_model, tmp_path, monkeypatch, capsys,
                                                               model_loads):
    monkeypatch.chdir(tmp_path)
    argv, kept = case(tmp_path)
    before = kept.read_bytes()
    code = main(["transcribe", "--model", str(untrained_model["model"]), "--quiet", *argv])
    lines = _error_lines(capsys.readouterr().err)
    assert code != 0 and len(lines) == 1 and lines[0].startswith(f"error: {argv[0]} ")
    assert "is also an input" in lines[0] or "is an existing audio file" in lines[0]
    assert "overwritten" in lines[0]
    assert kept.read_bytes() == before
    assert model_loads == []  # refused before any model loads


def _average(tmp: Path, model: dict[str, Path]) -> tuple[list[str], Path]:
    ckpt = torch.load(model["ckpt"], weights_only=True)
    ckpt["speechformer"]["val_wer"] = 0.5
    tmp.mkdir(exist_ok=True)
    torch.save(ckpt, tmp / "a.ckpt")
    return ["average", str(tmp / "a.ckpt"), "--out", str(tmp / "a.ckpt")], tmp / "a.ckpt"


def _average_into_its_ckpt_dir(tmp: Path, model: dict[str, Path]) -> tuple[list[str], Path]:
    _average(tmp / "ckpts", model)  # a training checkpoint, found by --ckpt-dir
    return ["average", "--ckpt-dir", str(tmp / "ckpts"), "--out", str(tmp / "ckpts" / "a.ckpt")], tmp / "ckpts" / "a.ckpt"


def _average_into_audio(tmp: Path, model: dict[str, Path]) -> tuple[list[str], Path]:
    args, _ = _average(tmp, model)
    return [*args[:-1], str(_recording(tmp / "in" / "a.flac"))], tmp / "in" / "a.flac"


def _manifest(tmp: Path) -> Path:
    audio = _recording(tmp / "in" / "a.flac")
    manifest = tmp / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": str(audio), "duration": 0.3, "text": "a"}) + "\n")
    return manifest


def _compute_stats_into_audio(tmp: Path, model: dict[str, Path]) -> tuple[list[str], Path]:
    return ["compute-stats", str(_manifest(tmp)), "--out", str(tmp / "in" / "a.flac")], tmp / "in" / "a.flac"


def _compute_stats_into_its_manifest(tmp: Path, model: dict[str, Path]) -> tuple[list[str], Path]:
    manifest = _manifest(tmp)
    return ["compute-stats", str(manifest), "--out", str(manifest)], manifest


def _evaluate_into_audio(tmp: Path, model: dict[str, Path]) -> tuple[list[str], Path]:
    return ["evaluate", "--model", str(model["model"]), "--manifest", str(_manifest(tmp)), "--out",
            str(tmp / "in" / "a.flac"), "--quiet"], tmp / "in" / "a.flac"


def _export_into_audio(tmp: Path, model: dict[str, Path]) -> tuple[list[str], Path]:
    return ["export", "--model", str(model["ckpt"]), "--out", str(_recording(tmp / "a.wav"))], tmp / "a.wav"


@pytest.mark.parametrize("case", [_average, _average_into_its_ckpt_dir, _average_into_audio, _compute_stats_into_audio,
                                  _compute_stats_into_its_manifest, _evaluate_into_audio, _export_into_audio])
def test_every_command_refuses_to_write_over_an_input_or_a_recording(case, untrained_model, tmp_path, capsys,
                                                                      model_loads):
    argv, kept = case(tmp_path, untrained_model)
    before = kept.read_bytes()
    code = main(argv)
    lines = _error_lines(capsys.readouterr().err)
    assert code != 0 and len(lines) == 1 and lines[0].startswith(f"error: --out {kept}: "), lines
    assert "input" in lines[0] or "audio file" in lines[0]
    assert kept.read_bytes() == before
    assert model_loads == []


@pytest.mark.parametrize("where", ["file", "under_a_file", "read_only"])
def test_an_unwritable_output_dir_is_one_line_before_any_work(where, untrained_model, tmp_path, capsys, model_loads):
    if where == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = {"file": notes, "under_a_file": notes / "sub", "read_only": locked / "txt"}[where]
    code = main(["transcribe", "--model", str(untrained_model["model"]), str(_recording(tmp_path / "a.wav")),
                 "--output-dir", str(out), "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --output-dir {out}: ") and "Errno" not in lines[0]
    assert "give a folder" in lines[0]
    assert notes.read_text() == "my notes\n" and model_loads == []


# ---------------------------------------------------------------------------- inputs
def test_a_missing_path_a_link_loop_and_an_empty_glob_are_per_file_failures(untrained_model, tmp_path, capsys):
    good = [_recording(tmp_path / "in" / "a.flac"), _recording(tmp_path / "in" / "b.wav")]
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    (tmp_path / "in" / "gone.wav").symlink_to(tmp_path / "nowhere.wav")  # met while scanning the folder
    inputs = [str(good[0]), str(tmp_path / "missing.wav"), str(tmp_path / "loop.wav"), f"{tmp_path}/*.mp3",
              str(good[1])]
    out = tmp_path / "out.json"
    code = main(["transcribe", "--model", str(untrained_model["model"]), *inputs, str(tmp_path / "in"),
                 "--format", "json", "--output", str(out), "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 1
    assert [e.split(": ")[1] for e in errors] == [inputs[1], inputs[2], inputs[3], str(tmp_path / "in" / "gone.wav")]
    assert "no such file" in errors[0] and "link loop" in errors[1] and "matches" in errors[2]
    assert "broken symbolic link" in errors[3]
    assert all(e.count("; ") >= 1 for e in errors)  # error: PATH: reason; what to do
    assert lines[-1].startswith("transcribe: 2 of 6 file(s) transcribed, 4 failed")
    rows = json.loads(out.read_text())
    assert [Path(r["path"]).name for r in rows if "error" not in r] == ["a.flac", "b.wav"]


def test_when_every_input_is_bad_each_is_named_and_the_exit_is_non_zero(untrained_model, tmp_path, capsys,
                                                                         model_loads):
    (tmp_path / "empty").mkdir()
    code = main(["transcribe", "--model", str(untrained_model["model"]), str(tmp_path / "missing.wav"),
                 f"{tmp_path}/*.flac", str(tmp_path / "empty"), "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert code == 1
    assert lines[0] == f"error: {tmp_path / 'missing.wav'}: no such file or folder; check the path"
    assert lines[1].startswith(f"error: {tmp_path}/*.flac: no ") and "matches this pattern; check" in lines[1]
    assert lines[2].startswith(f"error: {tmp_path / 'empty'}: folder has no ") and "; check the folder" in lines[2]
    assert lines[3:] == ["transcribe: 0 of 3 file(s) transcribed, 3 failed"]
    assert model_loads == []  # nothing to transcribe: no model needed


@pytest.mark.parametrize("command", ["evaluate", "transcribe", "fit"])
def test_the_duplicate_id_hint_fits_the_command(command, untrained_model, tmp_path, capsys):
    """Only fit can skip bad lines (data.skip_bad_lines); evaluate and transcribe say to fix them."""
    from speechformer.data import ManifestError, SpeechDataModule

    audio = _recording(tmp_path / "a.wav")
    row = {"id": "u1", "audio": str(audio), "duration": 0.3, "text": "a"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    if command == "fit":
        with pytest.raises(ManifestError) as err:
            SpeechDataModule(train_manifest=str(manifest), tokenizer=str(untrained_model["model"])).setup("fit")
        assert "duplicate id 'u1'" in str(err.value) and "data.skip_bad_lines=true trains on the good" in str(err.value)
        return
    out = ["--out", str(tmp_path / "eval")] if command == "evaluate" else []
    assert main([command, "--model", str(untrained_model["model"]), "--manifest", str(manifest), *out]) != 0
    err = capsys.readouterr().err
    assert "duplicate id 'u1'" in err and "fix or remove those lines" in err and "data validate" in err
    assert "skip_bad_lines" not in err  # an option of fit, not of this command


def test_the_writer_takes_results_as_they_come_and_a_resumed_writer_is_left_only_the_rest(tmp_path, capsys):
    """The transcribe flow without the command line: inputs, a writer, results added one by one.
    Each transcript is in its file and the journal the moment it is added (a kill after ``a``
    keeps ``a``); a bad path is reported once the results come; the exit status counts it."""
    from speechformer.inputs import collect_inputs
    from speechformer.outputs import TranscriptWriter
    from speechformer.transcribe import TranscriptResult

    a, b = _recording(tmp_path / "in" / "a.wav"), _recording(tmp_path / "in" / "b.wav")
    missing = str(tmp_path / "in" / "gone.wav")
    inputs = collect_inputs([str(a), missing, str(b)])
    assert [it.key for it in inputs.items] == [str(a), missing, str(b)] and list(inputs.failed) == [missing]
    out = tmp_path / "out"
    first = TranscriptWriter(inputs, "text", output_dir=str(out))
    assert [it.key for it in first.todo] == [str(a), str(b)] and capsys.readouterr().err == ""
    first.add(TranscriptResult(str(a), a, "one two"))
    assert (out / "a.txt").read_text() == "one two\n" and not (out / "b.txt").exists()
    assert capsys.readouterr().err.startswith(f"error: {missing}")  # reported with the first result

    resumed = TranscriptWriter(inputs, "text", output_dir=str(out), resume=True)  # the run was killed here
    assert [it.key for it in resumed.todo] == [str(b)]
    resumed.add(TranscriptResult(str(b), b, "three"))
    assert resumed.finish() == 1  # the missing file failed
    err = capsys.readouterr().err
    assert "resuming, 1 of 3 already done" in err and "2 of 3 file(s) transcribed, 1 failed" in err
    assert (out / "b.txt").read_text() == "three\n" and (out / ".speechformer-progress.jsonl").exists()
