"""Never lose a user's work: kills mid-epoch and mid-checkpoint, NaN batches, full disks, bad manifests.

The kill tests run `speechformer fit` in a subprocess and kill it with a real SIGKILL, then run the
same command again and compare every trained batch (step, epoch, learning rate, utterance ids) and
the final weights (bit for bit) with a run that was never interrupted; dropout, SpecAugment and speed
perturbation are on, so the random state must be restored too.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechformer.transcribe import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
seed_everything: 5
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 3
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  logger: false
  default_root_dir: {exp}
  callbacks:
    - class_path: speechformer.checkpoint.ResumeCheckpoint
      init_args: {{dirpath: {exp}/checkpoints, every_n_train_steps: 1}}
    - class_path: helpers.killer.BatchLog
model:
  # dropout and SpecAugment as ModelConfig has them by default: the resume must restore their random state
  model: {{d_model: 32, n_heads: 2, d_ff: 64, n_encoder_layers: 1, n_decoder_layers: 1, subsampling_channels: 8}}
  warmup_steps: 4
data:
  train_manifest: {corpus}/train.jsonl
  valid_manifest: {corpus}/valid.jsonl
  tokenizer: {tokenizer}
  max_batch_seconds: 6
  num_workers: {workers}
  speed_perturb: [0.9, 1.0, 1.1]  # as the recipes: random too, and drawn inside the loader workers
"""


@pytest.fixture(scope="module")
def shared_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    from speechformer.data import read_manifest
    from speechformer.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([u.text for u in read_manifest(tiny_corpus / "train.jsonl")], 40, out)
    return out


def fit(exp: Path, corpus: Path, tokenizer: Path, workers: int = 0, **env: str) -> subprocess.CompletedProcess:
    """`speechformer fit --config exp/fit.yaml --ckpt_path last`: the command a user re-runs."""
    config = exp / "fit.yaml"
    if not config.exists():
        exp.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG.format(exp=exp, corpus=corpus, tokenizer=tokenizer, workers=workers))
    environ = dict(os.environ, PYTHONWARNINGS="ignore", SPEECHFORMER_BATCH_LOG=str(exp / "batches.tsv"),
                   PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-m", "speechformer.cli", "fit", "--config", str(config),
                           "--ckpt_path", "last"], capture_output=True, text=True, env=environ, timeout=600)


def batches(exp: Path) -> list[tuple[int, int, str, str]]:
    rows = []
    for line in (exp / "batches.tsv").read_text().splitlines():
        step, epoch, lr, ids = line.split("\t")
        rows.append((int(step), int(epoch), lr, ids))
    return rows


def weights(exp: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(exp / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.fixture(scope="module")
def reference(tiny_corpus, shared_tokenizer, tmp_path_factory) -> Path:
    exp = tmp_path_factory.mktemp("reference")
    proc = fit(exp, tiny_corpus, shared_tokenizer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exp


def check_resumed_like_reference(exp: Path, reference: Path, killed_rows: list) -> None:
    ref = batches(reference)
    rows = batches(exp)
    resumed = rows[len(killed_rows):]
    assert resumed, "the second run trained nothing"
    first = resumed[0][0]
    # the steps before the resume point (from the interrupted run) followed by the resumed run
    merged = [r for r in killed_rows if r[0] < first] + resumed
    assert [r[0] for r in merged] == list(range(1, len(ref) + 1)), "a step was repeated or skipped"
    assert merged == ref, "data order, epoch or learning rate differ from the uninterrupted run"
    ref_w, w = weights(reference), weights(exp)
    assert ref_w.keys() == w.keys()
    differ = {k: float((w[k].double() - ref_w[k].double()).abs().max()) for k in ref_w if not torch.equal(w[k], ref_w[k])}
    assert not differ, f"final weights differ from the uninterrupted run's (max abs difference): {differ}"


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", [0, 1])
def test_sigkill_mid_epoch_resumes_with_the_same_steps_data_and_random_draws(tiny_corpus, shared_tokenizer,
                                                                            reference, tmp_path, workers):
    ref = batches(reference)
    per_epoch = sum(1 for r in ref if r[1] == 0)
    assert per_epoch >= 3, "the test needs several batches per epoch"
    kill_at = per_epoch + per_epoch // 2  # the middle of the second epoch
    exp = tmp_path / "run"
    proc = fit(exp, tiny_corpus, shared_tokenizer, workers=workers, SPEECHFORMER_KILL_AT_STEP=str(kill_at))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = batches(exp)
    assert killed[-1][0] == kill_at
    last = load_checkpoint(exp / "checkpoints" / "last.ckpt")
    assert last["global_step"] in (kill_at - 1, kill_at)
    proc = fit(exp, tiny_corpus, shared_tokenizer, workers=workers)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_resumed_like_reference(exp, reference, killed)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_corpus, shared_tokenizer, reference, tmp_path):
    exp = tmp_path / "run"
    proc = fit(exp, tiny_corpus, shared_tokenizer, SPEECHFORMER_KILL_IN_SAVE="5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = batches(exp)
    ckpts = exp / "checkpoints"
    orphans = [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert len(orphans) == 1, "the kill did not happen during a write"
    last = load_checkpoint(ckpts / "last.ckpt")  # loads: not truncated
    assert last["global_step"] == 4
    proc = fit(exp, tiny_corpus, shared_tokenizer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the half-written temporary file of the killed run is removed when the resumed run starts, and said
    assert not orphans[0].exists() and not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert f"speechformer: removed {orphans[0]}, an unfinished checkpoint write" in proc.stdout, proc.stdout[-2000:]
    check_resumed_like_reference(exp, reference, killed)


def test_the_saved_random_state_loads_as_plain_data_and_continues_every_generator():
    import io
    import random

    import numpy as np

    from speechformer.checkpoint import random_state, set_random_state

    cpu = torch.device("cpu")
    buffer = io.BytesIO()
    torch.save(random_state(cpu), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as a checkpoint is read: no pickled code
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    set_random_state(saved, cpu)
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


def test_specaugment_continues_from_its_saved_state_and_leaves_the_global_generator_alone():
    from speechformer.frontend import SpecAugment

    x, lengths = torch.ones(4, 100, 80), torch.full((4,), 100)
    aug = SpecAugment(time_width_ratio=0.2).train()
    torch.manual_seed(1)
    aug(x, lengths)  # a first batch
    saved = aug.random_state()
    global_before = torch.get_rng_state()
    expected = aug(x, lengths)
    assert torch.equal(torch.get_rng_state(), global_before)  # its masks come from its own generator
    resumed = SpecAugment(time_width_ratio=0.2).train()
    resumed.set_random_state(saved)
    assert torch.equal(resumed(x, lengths), expected) and not torch.equal(expected, x)


def test_only_our_orphan_checkpoint_temp_files_are_removed(tmp_path):
    from speechformer.checkpoint import remove_orphan_temp_files

    folder = tmp_path / "checkpoints"
    (folder / "sub").mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"the checkpoint")
    orphans = [folder / ".last.ckpt.k3j9x0_a.tmp", folder / ".epoch03-wer0.1234.ckpt.a1b2c3d4.tmp"]
    users = [folder / name for name in (".last.ckpt.tmp", "notes.tmp", ".data.k3j9x0_a.tmp", "last.ckpt.k3j9x0_a.tmp",
                                        ".last.ckpt.k3j9x0_a.tmp.bak", ".last.ckpt.TOOLONG99.tmp")]
    users.append(folder / "sub" / ".last.ckpt.k3j9x0_a.tmp")  # another folder: not ours to clean
    for path in orphans + users:
        path.write_bytes(b"half a checkpoint")
    assert remove_orphan_temp_files(folder) == sorted(orphans)
    assert not any(p.exists() for p in orphans)
    assert all(p.read_bytes() == b"half a checkpoint" for p in users)
    assert (folder / "last.ckpt").read_bytes() == b"the checkpoint"
    assert remove_orphan_temp_files(tmp_path / "missing") == []


# --------------------------------------------------------------------------- NaN / inf batches
def _tiny_trainer(tiny_corpus, tokenizer, exp, max_steps, max_bad_steps=20):
    import lightning as L

    from speechformer.checkpoint import AtomicCheckpointIO
    from speechformer.data import SpeechDataModule
    from speechformer.lightning import SpeechModule
    from speechformer.model import ModelConfig

    L.seed_everything(0, verbose=False)
    config = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                         subsampling_channels=8, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0)
    module = SpeechModule(model=config, tokenizer=str(tokenizer), warmup_steps=2, max_bad_steps=max_bad_steps,
                          peak_tflops=1.0)
    data = SpeechDataModule(train_manifest=str(tiny_corpus / "train.jsonl"), tokenizer=str(tokenizer),
                            max_batch_seconds=6, num_workers=0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(exp),
                        plugins=[AtomicCheckpointIO()], enable_checkpointing=False)
    return module, data, trainer


def _poison(module, bad_calls):
    """Make the loss NaN on the given (0-based) training calls."""
    real = module.model.losses
    calls = {"n": 0}

    def losses(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        if module.training and calls["n"] in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += module.training
        return out

    module.model.losses = losses


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_a_nan_batch_is_skipped_counted_and_leaves_the_weights_alone(tiny_corpus, shared_tokenizer, tmp_path):
    import lightning as L

    module, data, trainer = _tiny_trainer(tiny_corpus, shared_tokenizer, tmp_path, max_steps=4)
    _poison(module, bad_calls={1})
    seen = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen[batch_idx] = [_snapshot(pl_module)]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen[batch_idx].append(_snapshot(pl_module))

    trainer.callbacks.append(Watch())
    with pytest.warns(UserWarning, match=r"loss is nan on the batch of .*train_\d+.*batch skipped"):
        trainer.fit(module, datamodule=data)
    assert module.skipped_batches == 1
    assert float(trainer.callback_metrics["skipped_batches"]) == 1.0
    before, after = seen[1]
    assert all(torch.equal(before[k], after[k]) for k in before), "the NaN batch changed the weights"
    before, after = seen[2]
    assert any(not torch.equal(before[k], after[k]) for k in before), "a good batch did not train"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_many_nan_batches_in_a_row_stop_with_a_checkpoint_from_before(tiny_corpus, shared_tokenizer, tmp_path):
    import lightning as L

    module, data, trainer = _tiny_trainer(tiny_corpus, shared_tokenizer, tmp_path, max_steps=20, max_bad_steps=3)
    _poison(module, bad_calls=set(range(2, 100)))
    good = {}

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            if batch_idx == 1:
                good.update(_snapshot(pl_module))

    trainer.callbacks.append(Watch())
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match=r"3 batches in a row had a NaN/inf "
                                                                          r"loss .* training stopped"):
        trainer.fit(module, datamodule=data)
    saved = tmp_path / "before-nonfinite.ckpt"
    state = load_checkpoint(saved)["state_dict"]
    for k, v in good.items():
        assert torch.equal(state["model." + k], v), k
    assert load_checkpoint(saved)["global_step"] == 4  # Lightning counts the 2 skipped steps too


# --------------------------------------------------------------------------- full disks, untrusted files
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from speechformer import checkpoint

    path = tmp_path / "last.ckpt"
    checkpoint.atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def full(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"last.ckpt: no space left .* previous last.ckpt is "
                                                            r"intact.*--ckpt_path last"):
        checkpoint.atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"


def test_a_checkpoint_with_a_pickle_payload_is_refused_by_resume(tmp_path):
    import pickle

    from speechformer.checkpoint import AtomicCheckpointIO

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, bad)
    with pytest.raises(ValueError, match=r"bad.ckpt: not a loadable speechformer checkpoint \(UnpicklingError.*only "
                                         r"tensors and plain types are accepted") as refused:
        AtomicCheckpointIO().load_checkpoint(bad)
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    with pytest.raises(FileNotFoundError, match=r"missing.ckpt: checkpoint not found"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_a_bad_manifest_stops_training_before_it_starts_unless_told_to_skip(tiny_corpus, shared_tokenizer, tmp_path):
    from speechformer.data import ManifestError, SpeechDataModule

    lines = (tiny_corpus / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    # audio paths are relative to the manifest: point them back at the corpus
    bad.write_text(bad.read_text().replace('"audio": "', f'"audio": "{tiny_corpus}/'))
    data = SpeechDataModule(train_manifest=str(bad), tokenizer=str(shared_tokenizer))
    with pytest.raises(ManifestError, match=r"train.jsonl:4: not valid JSON"):
        data.setup("fit")
    data = SpeechDataModule(train_manifest=str(bad), tokenizer=str(shared_tokenizer), skip_bad_lines=True)
    with pytest.warns(UserWarning, match=r"skipped 1 bad line\(s\), kept 8"):
        data.setup("fit")
    assert len(data.train_dataset()) == 8


# --------------------------------------------------------------------------- transcription runs
def transcribe_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "speechformer.cli", "transcribe", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_transcribe_killed_then_resumed_does_only_the_missing_files(overfit_model, tmp_path):
    import time

    import soundfile as sf

    from speechformer.audio import load_audio
    from speechformer.data import read_manifest

    utts = read_manifest(overfit_model["train"])
    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(48):
        u = utts[i % len(utts)]
        sf.write(folder / f"f{i:03d}.wav", load_audio(u.audio).numpy(), 16000)
    model = str(overfit_model["model"])
    ref = transcribe_cli("--model", model, str(folder), "--format", "tsv", "--quiet")
    ref_out, ref_err = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_err

    out, txt = tmp_path / "out.tsv", tmp_path / "txt"
    journal = txt / ".speechformer-progress.jsonl"
    args = ["--model", model, str(folder), "--format", "tsv", "--output", str(out), "--output-dir", str(txt),
            "--flush-every", "4", "--batch-seconds", "8", "--quiet"]
    proc = transcribe_cli(*args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists(), "a half-finished output file"
    kept = {p.name: p.stat().st_mtime_ns for p in txt.glob("*.txt")}
    assert 8 <= len(kept) < 48

    resumed = transcribe_cli(*args, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming, {len(kept)} of 48 already done" in err
    assert {p.name: p.stat().st_mtime_ns for p in txt.glob("*.txt") if p.name in kept} == kept, \
        "a finished file was transcribed again"
    assert out.read_text() == ref_out, "the resumed run's output differs from an uninterrupted run"
    assert len(list(txt.glob("*.txt"))) == 48 and not journal.exists()


def test_manifest_ids_cannot_write_outside_the_output_folder(overfit_model, tmp_path):
    import json

    from speechformer.data import read_manifest

    u = read_manifest(overfit_model["train"])[0]
    ids = ["../../escaped", "/etc/passwd_like", "a/b", "..", "plain", "ünïcode id"]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"id": i, "audio": str(u.audio), "duration": u.duration}) + "\n" for i in ids))
    out = tmp_path / "deep" / "out"
    proc = transcribe_cli("--model", str(overfit_model["model"]), "--manifest", str(m), "--output-dir", str(out),
                          "--format", "json", "--quiet")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.txt"))
    assert len(written) == len(ids) and all(p.parent == Path("deep/out") for p in written), written
    assert "plain.txt" in {p.name for p in written} and "ünïcode id.txt" in {p.name for p in written}
    assert [r["id"] for r in json.loads(stdout)] == ids


# --------------------------------------------------------------------------- bad audio in one batch
def test_every_kind_of_bad_audio_in_one_batch_is_reported_and_the_rest_transcribed(overfit_model, tmp_path):
    import numpy as np
    import soundfile as sf

    from speechformer.audio import load_audio
    from speechformer.data import read_manifest
    from speechformer.transcribe import Transcriber

    speech = load_audio(read_manifest(overfit_model["train"])[0].audio).numpy()
    d = tmp_path / "in"
    d.mkdir()
    good, bad = {}, {}

    def write(name, data, rate=16000, **kw):  # type: ignore[no-untyped-def]
        sf.write(d / name, data, rate, **kw)
        return d / name

    # readable, each a different format, layout or rate
    good["pcm_u8"] = write("u8.wav", speech, subtype="PCM_U8")
    good["pcm_24"] = write("s24.wav", speech, subtype="PCM_24")
    good["float"] = write("f32.wav", speech, subtype="FLOAT")
    good["8ch_96k"] = write("eight_channels_96k.wav", np.repeat(
        np.interp(np.arange(len(speech) * 6) / 6, np.arange(len(speech)), speech)[:, None], 8, 1), 96000)
    good["8k"] = write("eight_k.wav", speech[::2], 8000)
    good["short"] = write("fifty_ms.wav", speech[4000:4800])
    good["name"] = write("my file ünïcødé ß.wav", speech)
    good["hot_float"] = write("hot_float.wav", np.clip(speech * 1.9 / np.abs(speech).max(), -1.9, 1.9),
                              subtype="FLOAT")  # peaks up to 2 after float processing: clipped, transcribed
    # not usable, each must be named with its reason
    bad["truncated"] = d / "truncated.wav"
    bad["truncated"].write_bytes((good["float"]).read_bytes()[:30])
    bad["random"] = d / "random.wav"
    bad["random"].write_bytes(np.random.default_rng(0).bytes(5000))
    bad["empty"] = d / "empty.wav"
    bad["empty"].write_bytes(b"")
    bad["no_samples"] = write("no_samples.wav", np.zeros(0, dtype=np.float32))
    bad["silence"] = write("silence.wav", np.zeros(16000, dtype=np.float32))
    nan = speech.copy()
    nan[100] = np.nan
    bad["nan"] = write("nan.wav", nan, subtype="FLOAT")
    inf = speech.copy()
    inf[200] = np.inf
    bad["inf"] = write("inf.wav", inf, subtype="FLOAT")
    bad["missing"] = d / "does_not_exist.wav"
    glitch = speech.copy()
    glitch[300] = 1e6  # main: an empty transcript, no error
    bad["float_glitch"] = write("glitch.wav", glitch, subtype="FLOAT")
    bad["integer_scale"] = write("int_scale.wav", speech * 32767, subtype="FLOAT")  # main: one wrong word

    from itertools import zip_longest

    paths = [p for pair in zip_longest(good.values(), bad.values()) for p in pair if p is not None]  # interleaved
    t = Transcriber.from_pretrained(overfit_model["model"], device="cpu")
    results = t.transcribe(paths)
    assert [r.path for r in results] == paths
    by_path = {r.path: r for r in results}
    for name, p in good.items():
        assert by_path[p].ok, (name, by_path[p].error)
    assert by_path[good["float"]].text == by_path[good["pcm_24"]].text != ""
    reasons = {"truncated": "cannot be read", "random": "cannot be read", "empty": "empty", "no_samples": "no samples",
               "silence": "only silence", "nan": "NaN/inf", "inf": "NaN/inf", "missing": "not found",
               "float_glitch": "outside full scale", "integer_scale": "outside full scale"}
    for name, p in bad.items():
        error = by_path[p].error
        assert error is not None, name
        assert error.startswith(str(p)) and reasons[name] in error and "\n" not in error, (name, error)


def test_a_full_disk_while_writing_an_output_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    from speechformer import atomic

    out = tmp_path / "out.txt"
    atomic.atomic_write_text(out, "old\n")

    def full(tmp, path):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_publish", full)
    with pytest.raises(OSError, match=r"out.txt: no space left on the device \(the previous out.txt is intact\); "
                                      r"free some space and re-run with --resume"):
        atomic.atomic_write_text(out, "new\n", rerun="re-run with --resume")
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_failures_keep_the_previous_file_and_say_so(tmp_path):
    from speechformer.atomic import atomic_write

    out = tmp_path / "stats.json"
    atomic_write(out, lambda tmp: tmp.write_text("old"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "not the permissions a plain open() would give"

    def half_then(err):  # type: ignore[no-untyped-def]
        def write(tmp):  # type: ignore[no-untyped-def]
            tmp.write_text("half")
            raise err
        return write

    with pytest.raises(ValueError, match="not serialisable"):  # not an OSError: raised as it was
        atomic_write(out, half_then(ValueError("not serialisable")))
    with pytest.raises(PermissionError, match=r"stats.json: cannot be written: denied \(the previous stats.json is "
                                              r"intact\)"):
        atomic_write(out, half_then(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(OSError, match=r"new.json: no space left on the device \(nothing was written\)"):
        atomic_write(tmp_path / "new.json", half_then(OSError(errno.ENOSPC, "No space left on device")))
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["stats.json"]
