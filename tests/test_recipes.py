"""The recipes' run.sh scripts, with the ``speechformer`` command replaced by a recorder.

Every recipe strings the same stages together through ``recipes/common/stages.sh``; these
tests check what reaches the command line: each stage reads what the stage before it wrote,
``--stage``/``--stop-stage`` select stages, ``--help`` prints the script's top comment from any
folder, and an unknown option is refused. Nothing is trained: the recorder only logs its
arguments (and prints a three-line WER table for ``evaluate``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["librispeech", "commonvoice", "ljspeech", "synthetic", "whisper_finetune"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the recipes are bash scripts")

RECORDER = """#!{python}
import json, os, sys
args = sys.argv[1:]
if os.path.basename(sys.argv[0]) == "python" and args[:1] == ["-c"]:
    os.execv({python!r}, [{python!r}, *args])  # run.sh's own one-liners run for real
with open(os.environ["RECORDER_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *args]) + "\\n")
if "--out" in args:  # where the real command would write
    os.makedirs(os.path.dirname(args[args.index("--out") + 1]) or ".", exist_ok=True)
if args[:1] == ["evaluate"]:
    name = args[args.index("--name") + 1]
    print("| set | WER % |")
    print("|-----|-------|")
    print(f"| {{name}} | 1.00 |")
"""


@pytest.fixture
def recipes(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of recipes/ (without any exp/ or data/) and an environment whose speechformer records."""
    copy = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", copy, ignore=shutil.ignore_patterns("exp", "data"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("speechformer", "python"):
        (bin_dir / name).write_text(RECORDER.format(python=sys.executable))
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RECORDER_LOG": str(tmp_path / "calls.jsonl")}
    return copy, env


def run(recipes: tuple[Path, dict[str, str]], recipe: str, *options: str,
        ) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """``bash recipes/RECIPE/run.sh OPTIONS`` from the folder above recipes/; the recorded calls."""
    copy, env = recipes
    log = Path(env["RECORDER_LOG"])
    log.unlink(missing_ok=True)
    proc = subprocess.run(["bash", f"recipes/{recipe}/run.sh", *options], cwd=copy.parent, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def option(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def by_command(calls: list[list[str]]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for call in calls:
        out.setdefault(call[1] if call[0] == "speechformer" else call[0], []).append(call)
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_prints_the_top_comment_from_any_folder_and_unknown_options_are_refused(recipes, recipe):
    lines = (ROOT / "recipes" / recipe / "run.sh").read_text().splitlines()
    comment = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        comment.append(line)
    proc, calls = run(recipes, recipe, "--help")  # from the folder above recipes/, not the recipe's own
    assert proc.returncode == 0 and proc.stdout.splitlines() == comment and calls == []
    proc, calls = run(recipes, recipe, "--no-such-option")
    assert proc.returncode == 2 and "unknown option --no-such-option" in proc.stderr and calls == []


@pytest.mark.parametrize(("recipe", "stage0", "sets"), [
    ("librispeech", ["--corpus", "/corpora"], ["dev-clean", "dev-other", "test-clean", "test-other"]),
    ("commonvoice", ["--release", "/cv/cy"], ["dev", "test"]),
    ("ljspeech", ["--corpus", "/LJSpeech-1.1"], ["valid", "test"]),
])
def test_corpus_recipes_chain_each_stage_into_the_next(recipes, recipe, stage0, sets):
    copy, _ = recipes
    if recipe == "librispeech":  # stage 0 joins the two dev sets that `prepare` (recorded here) would write
        (copy / recipe / "data").mkdir()
        for name in ("dev-clean", "dev-other"):
            (copy / recipe / "data" / f"{name}.jsonl").write_text(f"{name}\n")
    proc, calls = run(recipes, recipe, *stage0, "--vocab-size", "77", "--beam-size", "3", "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    cmd = by_command(calls)
    assert [c[1] for c in calls] == ["prepare", "tokenizer", "compute-stats", "fit", "average", "export",
                                     *["evaluate"] * len(sets)]
    assert cmd["prepare"][0][2:4] == [recipe, stage0[1]] and option(cmd["prepare"][0], "--jobs") == "2"
    tokenizer, stats, fit = cmd["tokenizer"][0], cmd["compute-stats"][0], cmd["fit"][0]
    assert option(tokenizer, "--vocab-size") == "77" and option(stats, "--jobs") == "2"
    assert option(fit, "--data.tokenizer") == option(tokenizer, "--out")
    assert option(fit, "--model.feature_stats") == option(stats, "--out")
    assert option(tokenizer, "--manifest") == stats[2] == option(fit, "--data.train_manifest")
    assert option(fit, "--ckpt_path") == "last" and option(fit, "--config").startswith("conf/")
    exp = option(fit, "--trainer.default_root_dir")
    assert option(cmd["average"][0], "--ckpt-dir") == f"{exp}/checkpoints"
    assert option(cmd["export"][0], "--model") == option(cmd["average"][0], "--out")
    for call, name in zip(cmd["evaluate"], sets):
        assert option(call, "--model") == option(cmd["export"][0], "--out") and option(call, "--beam-size") == "3"
        assert option(call, "--manifest") == f"data/{name}.jsonl" and option(call, "--out") == f"{exp}/eval_{name}"
    table = proc.stdout[proc.stdout.index("WER of"):].splitlines()
    assert table[1:3] == ["| set | WER % |", "|-----|-------|"] and table[3:-1] == [f"| {n} | 1.00 |" for n in sets]
    assert table[-1].startswith("total time: ")
    if recipe == "librispeech":
        assert (copy / recipe / "data" / "dev.jsonl").read_text() == "dev-clean\ndev-other\n"
        assert option(fit, "--data.valid_manifest") == "data/dev.jsonl"

    proc, calls = run(recipes, recipe, "--stage", "3", "--stop-stage", "3")  # stage 0 needs no corpus now
    assert proc.returncode == 0 and [c[1] for c in calls] == ["fit"] and calls[0] == fit
    proc, calls = run(recipes, recipe, "--stage", "0")
    assert proc.returncode == 2 and "stage 0 needs" in proc.stderr and calls == []


def test_synthetic_recipe_trains_without_feature_stats_and_scores_with_the_chosen_decoder(recipes):
    copy, _ = recipes
    data = copy / "synthetic" / "data" / "synthetic"
    data.mkdir(parents=True)  # the sample that stage 5 transcribes (stage 0 is recorded, not run)
    (data / "test.jsonl").write_text('{"audio": "wavs/a.wav"}\n{"audio": "wavs/b.wav"}\n')
    proc, calls = run(recipes, "synthetic", "--decoder", "joint", "--exp", "exp/x")
    assert proc.returncode == 0, proc.stderr
    assert [c[0] if c[0] == "python" else c[1] for c in calls] == [
        "python", "tokenizer", "fit", "average", "export", "evaluate", "evaluate", "transcribe"]
    cmd = by_command(calls)
    assert "--model.feature_stats" not in cmd["fit"][0] and option(cmd["fit"][0], "--data.tokenizer") == "exp/x/tokenizer"
    assert [option(c, "--decoder") for c in cmd["evaluate"]] == ["joint", "joint"]
    assert cmd["transcribe"][0][-2:] == ["wavs/a.wav", "wavs/b.wav"]
    assert "WER of exp/x/model (joint, beam 4)" in proc.stdout and "| test | 1.00 |" in proc.stdout


@pytest.mark.parametrize("decoder", ["joint", "attention", "ctc"])
def test_synthetic_recipe_evaluates_with_options_that_speechformer_accepts_for_every_decoder(recipes, decoder):
    """Each stage-4 ``evaluate`` command passes the real parser and the options check (``--decoder
    ctc`` is greedy: a beam there is refused, so the recipe asks for none)."""
    from speechformer.cli import _requested_options, build_parser

    (recipes[0] / "synthetic" / "exp" / "conformer").mkdir(parents=True)  # stage 3 made it
    proc, calls = run(recipes, "synthetic", "--stage", "4", "--stop-stage", "4", "--decoder", decoder)
    assert proc.returncode == 0, proc.stderr
    evaluations = by_command(calls)["evaluate"]
    assert len(evaluations) == 2
    for call in evaluations:
        given = _requested_options(build_parser().parse_args(call[1:]))
        assert given["decoder"] == decoder and ("ctc_weight" in given) == (decoder == "joint")
    if decoder == "ctc":  # a beam typed with it is refused by the recipe, before any stage
        proc, calls = run(recipes, "synthetic", "--stage", "4", "--decoder", "ctc", "--beam-size", "4")
        assert proc.returncode == 2 and "--decoder ctc is greedy" in proc.stderr and calls == []


@pytest.mark.parametrize(("recipe", "options", "text"), [
    ("synthetic", [], "data/synthetic/lm/train.txt.gz"),
    ("librispeech", ["--lm-text", "/corpora/librispeech-lm-norm.txt.gz"], "/corpora/librispeech-lm-norm.txt.gz"),
])
def test_lm_stage_is_off_by_default_and_trains_on_the_recipes_tokenizer_with_held_out_transcripts(
        recipes, recipe, options, text):
    copy, _ = recipes
    data = copy / recipe / ("data/synthetic" if recipe == "synthetic" else "data")
    data.mkdir(parents=True)
    valid = data / ("valid.jsonl" if recipe == "synthetic" else "dev.jsonl")
    valid.write_text('{"id": "a", "text": "the cat sat"}\n{"id": "b", "text": "a dog ran"}\n')
    proc, calls = run(recipes, recipe, "--stage", "6", *options)
    assert proc.returncode == 0 and calls == [], proc.stderr  # without --lm true: nothing
    proc, calls = run(recipes, recipe, "--stage", "6", "--lm", "true", *options)
    assert proc.returncode == 0, proc.stderr
    if recipe == "synthetic":  # the text comes from the grammar, held out from the same corpus settings
        assert calls[0][0] == "python" and option(calls[0], "--lm-text") == text
        assert option(calls[0], "--num-train") == "8000" and option(calls[0], "--out") == "data/synthetic"
        calls = calls[1:]
    train, ppl = calls
    assert train[1:3] == ["lm", "train"] and ppl[1:3] == ["lm", "perplexity"]
    assert option(train, "--text") == text and option(train, "--tokenizer").endswith("/tokenizer")
    assert option(train, "--out") == option(ppl, "--lm") == option(train, "--tokenizer").replace("tokenizer", "lm")
    held_out = copy / recipe / option(train, "--valid-text")
    assert option(ppl, "--text") == option(train, "--valid-text") and held_out.read_text() == "the cat sat\na dog ran\n"
    if recipe == "librispeech":
        proc, calls = run(recipes, recipe, "--stage", "6", "--lm", "true")
        assert proc.returncode == 2 and "stage 6 needs --lm-text" in proc.stderr and calls == []


def test_whisper_recipe_scores_the_pretrained_and_the_finetuned_model_on_the_same_sentences(recipes):
    copy, _ = recipes
    (copy / "whisper_finetune" / "all.jsonl").write_text("{}\n")
    ckpts = copy / "whisper_finetune" / "exp" / "whisper" / "checkpoints"
    ckpts.mkdir(parents=True)  # what stage 3 (recorded) would have written
    (ckpts / "epoch=3-val_wer=0.05.ckpt").write_bytes(b"")
    proc, calls = run(recipes, "whisper_finetune", "--src", "/models/tiny.en", "--manifest", "all.jsonl")
    assert proc.returncode == 0, proc.stderr
    cmd = by_command(calls)
    assert [option(c, "--model") for c in cmd["evaluate"]] == ["exp/whisper/pretrained", "exp/whisper/finetuned"]
    assert {option(c, "--manifest") for c in cmd["evaluate"]} == {"data/test.jsonl"}
    assert option(cmd["export"][0], "--model").endswith("epoch=3-val_wer=0.05.ckpt")
    assert proc.stdout.splitlines()[-3:-1] == ["| pretrained | 1.00 |", "| finetuned | 1.00 |"]
