"""The language model (speechformer/lm.py, lm_train.py): training, perplexity, the incremental API,
``speechformer lm`` and its errors, and the synthetic recipe's LM text (data_prep/synthetic.py)."""

from __future__ import annotations

import collections
import gzip
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_data_prep
from speechformer.cli import main
from speechformer.errors import UserError
from speechformer.lm import (LanguageModel, LMConfig, check_tokenizer_matches, complete, load_lm, load_lm_for_model,
                             perplexity)
from speechformer.lm_train import LMTraining, read_sentences, train_lm
from speechformer.tokenizer import EOS_ID, train_tokenizer

synthetic = load_data_prep("synthetic")

SMALL = dict(d_model=64, n_heads=4, d_ff=256, n_layers=2, dropout=0.0)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grammar_lm(tmp_path_factory) -> dict:
    """An LM trained (about 15 s) on 1,500 sentences of the synthetic grammar, and 200 held-out ones."""
    d = tmp_path_factory.mktemp("grammar_lm")
    generator = synthetic.SentenceGenerator(5)
    held_out = [generator.next()[0] for _ in range(200)]
    train = synthetic.lm_sentences(1500, 0, set(held_out))
    tokenizer = train_tokenizer(train, 128, d / "tokenizer")
    write_lines(d / "valid.txt", held_out)
    with gzip.open(d / "train.txt.gz", "wt", encoding="utf-8") as handle:  # the .gz reader too
        handle.writelines(f"{t}\n" for t in train)
    torch.manual_seed(0)
    summary = train_lm(d / "train.txt.gz", d / "tokenizer", d / "lm", LMConfig(**SMALL),
                       LMTraining(max_epochs=4, batch_size=32, lr=3e-3, warmup_steps=50, progress=False,
                                  accelerator="cpu"), valid_text=d / "valid.txt")
    return {"dir": d, "lm": d / "lm", "tokenizer": tokenizer, "train": d / "train.txt.gz",
            "valid": d / "valid.txt", "summary": summary}


def unigram_perplexity(train: list[list[int]], held_out: list[list[int]], vocab: int) -> float:
    """Perplexity of the add-one unigram model of ``train``'s pieces (ends included) on ``held_out``."""
    counts = collections.Counter(p for s in train for p in [*s, EOS_ID])
    total = sum(counts.values())
    nll = -sum(math.log((counts[p] + 1) / (total + vocab)) for s in held_out for p in [*s, EOS_ID])
    return math.exp(nll / sum(len(s) + 1 for s in held_out))


def test_lm_trains_and_its_held_out_perplexity_is_below_a_unigram_models(grammar_lm):
    tok = grammar_lm["tokenizer"]
    train = read_sentences(grammar_lm["train"], tok, 255)
    held_out = read_sentences(grammar_lm["valid"], tok, 255)
    lm = load_lm(grammar_lm["lm"])
    ppl = perplexity(lm.model, held_out)
    unigram = unigram_perplexity(train, held_out, tok.vocab_size)
    untrained = perplexity(LanguageModel(lm.model.config).eval(), held_out)
    assert ppl == pytest.approx(grammar_lm["summary"]["valid_perplexity"], rel=1e-3)  # what the folder records
    assert ppl < 0.5 * unigram < untrained, (ppl, unigram, untrained)


def test_lm_perplexity_command_prints_the_models_perplexity(grammar_lm, capsys):
    assert main(["lm", "perplexity", "--lm", str(grammar_lm["lm"]), "--text", str(grammar_lm["valid"])]) == 0
    printed = float(re.search(r"perplexity ([\d.]+)", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(grammar_lm["summary"]["valid_perplexity"], abs=1e-3)


def test_lm_complete_adds_the_likeliest_next_piece(grammar_lm, capsys):
    lm = load_lm(grammar_lm["lm"])
    tok = lm.tokenizer
    prompt = tok.encode("where are my")
    with torch.no_grad():  # the full forward, no cache: the likeliest piece after the prompt
        logits = lm.model(torch.tensor([[lm.model.config.bos_id, *prompt]]))[0, -1]
    assert main(["lm", "complete", "--lm", str(grammar_lm["lm"]), "where are my"]) == 0
    out = capsys.readouterr().out.strip()
    expected = complete(lm.model, prompt)
    assert expected[:len(prompt) + 1] == [*prompt, int(logits.argmax())]
    assert out == tok.decode(expected) and out.startswith("where are my ")


def test_lm_complete_continues_a_prompt_with_the_sentence_it_learnt(tmp_path, capsys):
    """Four sentences that differ after their second word: the continuation is the learnt sentence."""
    sentences = ["the cat sat on the mat", "the dog ran to the park", "a bird sang in the tree",
                 "my friend made a cake"]
    write_lines(tmp_path / "text.txt", sentences * 25)
    train_tokenizer(sentences, 40, tmp_path / "tokenizer")
    torch.manual_seed(0)
    train_lm(tmp_path / "text.txt", tmp_path / "tokenizer", tmp_path / "lm", LMConfig(**SMALL),
             LMTraining(max_steps=60, batch_size=20, lr=3e-3, warmup_steps=10, progress=False, accelerator="cpu"))
    for prompt, sentence in [("the cat", sentences[0]), ("the dog", sentences[1]), ("my", sentences[3])]:
        assert main(["lm", "complete", "--lm", str(tmp_path / "lm"), prompt]) == 0
        assert capsys.readouterr().out.strip() == sentence


@pytest.fixture()
def random_lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(LMConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=3, dropout=0.0)).eval()


@torch.no_grad()
def test_step_with_cache_equals_the_full_forward(random_lm):
    tokens = torch.cat([torch.full((3, 1), 2), torch.randint(4, 50, (3, 9))], dim=1)
    full = random_lm(tokens).float().log_softmax(-1)  # [N, L, V], no cache
    log_probs, cache = random_lm.step(tokens[:, :3])  # a prefix of 3 at once
    got = [log_probs]
    for t in range(3, 10):  # then one token a time: the last token only, or the whole prefix
        log_probs, cache = random_lm.step(tokens[:, t] if t % 2 else tokens[:, :t + 1], cache)
        got.append(log_probs)
    assert cache.offset == 10
    assert torch.allclose(torch.stack(got, 1), full[:, 2:], atol=1e-5, rtol=0)
    first, _ = random_lm.start(3)
    assert torch.allclose(first, full[:, 0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cache_reorder_follows_the_beam_index(random_lm):
    prefixes = torch.cat([torch.full((3, 1), 2), torch.randint(4, 50, (3, 5))], dim=1)
    _, cache = random_lm.step(prefixes)
    for index in (torch.tensor([2, 0, 0]), torch.tensor([1, 1])):  # beams' parents; then the batch shrinks
        cache.reorder(index)
        prefixes = prefixes[index]
        nxt = torch.randint(4, 50, (len(index),))
        log_probs, cache = random_lm.step(nxt, cache)
        prefixes = torch.cat([prefixes, nxt[:, None]], dim=1)
        fresh, _ = random_lm.step(prefixes)  # the same prefixes, scored from scratch
        assert torch.allclose(log_probs, fresh, atol=1e-5, rtol=0)


def test_synthetic_lm_text_never_holds_a_valid_or_test_sentence(tmp_path):
    corpus = tmp_path / "data"
    corpus.mkdir()
    # a manifest on disk whose sentence the LM generator would write (its first one)
    planted = synthetic.lm_sentences(1, 3, set())[0]
    (corpus / "valid.jsonl").write_text(json.dumps({"id": "v1", "audio": "x.wav", "duration": 1.0,
                                                    "text": planted}) + "\n")
    assert synthetic.main(["--out", str(corpus), "--num-train", "300", "--num-valid", "100", "--num-test", "300",
                           "--seed", "3", "--lm-text", str(tmp_path / "lm.txt.gz"), "--lm-sentences", "20000"]) == 0
    written = gzip.decompress((tmp_path / "lm.txt.gz").read_bytes()).decode().splitlines()
    splits = synthetic.split_sentences(3, 300, 100, 300)
    held = {t for s in ("valid", "test") for t, _ in splits[s]}
    unfiltered = set(synthetic.lm_sentences(20000, 3, set()))
    assert len(written) == 20000
    assert held & unfiltered and planted in unfiltered  # the grammar repeats itself: the filter has work to do
    assert not (held | {planted}) & set(written)
    vocab = synthetic.vocabulary()
    assert all(set(t.split()) <= vocab for t in written)


def test_lm_folder_checks_its_tokenizer_against_the_acoustic_models(grammar_lm, untrained_model):
    from speechformer.transcribe import load_model

    lm = load_lm_for_model(grammar_lm["lm"], grammar_lm["tokenizer"], "model")  # the same pieces: no error
    assert lm.tokenizer.pieces(range(128)) == grammar_lm["tokenizer"].pieces(range(128))
    with pytest.raises(UserError, match=r"--lm .*: its tokenizer is not the one of .*model \(128 pieces against 40\)"):
        load_lm_for_model(grammar_lm["lm"], load_model(untrained_model["model"]).tokenizer, untrained_model["model"])
    same_size = train_tokenizer(["the quick brown fox jumps over the lazy dog",
                                 "pack my box with five dozen liquor jugs"] * 20, 40, grammar_lm["dir"] / "other")
    shrunk = load_lm(grammar_lm["lm"])
    shrunk.tokenizer = same_size  # an LM over 40 other pieces: same count as the model's, other pieces
    with pytest.raises(UserError, match="the same number of pieces, not the same ones"):
        check_tokenizer_matches(shrunk, load_model(untrained_model["model"]).tokenizer, "lm", "model")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_lm_train_command_builds_the_model_and_the_loop_its_flags_ask_for(grammar_lm, tmp_path, capsys):
    """Each size flag reaches the LM's config, each untyped one is the dataclass's default, and
    --max-steps stops the loop: the flags are made from LMConfig and LMTraining."""
    out = tmp_path / "lm"
    assert main(["lm", "train", "--text", str(grammar_lm["valid"]), "--tokenizer", str(grammar_lm["dir"] / "tokenizer"),
                 "--out", str(out), "--d-model", "32", "--n-layers", "1", "--d-ff", "64", "--max-steps", "2",
                 "--batch-size", "16", "--accelerator", "cpu", "--quiet"]) == 0
    assert "2 steps" in capsys.readouterr().out
    settings = json.loads((out / "config.json").read_text())["lm"]
    assert (settings["d_model"], settings["n_layers"], settings["d_ff"]) == (32, 1, 64)
    assert (settings["n_heads"], settings["max_positions"], settings["dropout"]) == (LMConfig.n_heads, 256, 0.1)


def test_lm_command_errors_are_one_line_naming_the_file(grammar_lm, untrained_model, tmp_path, capsys):
    tok = str(grammar_lm["dir"] / "tokenizer")
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes(b"the cat\nthe caf\xe9\n")
    bad_gzip = tmp_path / "broken.txt.gz"
    bad_gzip.write_bytes(gzip.compress(b"the cat sat\n" * 100)[:40])
    damaged = tmp_path / "damaged_lm"
    shutil.copytree(grammar_lm["lm"], damaged)
    (damaged / "model.safetensors").write_bytes(b"not weights")
    wrong_type = tmp_path / "wrong_type_lm"
    shutil.copytree(grammar_lm["lm"], wrong_type)
    config = json.loads((wrong_type / "config.json").read_text())
    config["lm"]["n_layers"] = "2"
    (wrong_type / "config.json").write_text(json.dumps(config))
    cases = [
        (["lm", "train", "--text", str(tmp_path / "missing.txt"), "--tokenizer", tok, "--out", str(tmp_path / "o")],
         "missing.txt: not found"),
        (["lm", "train", "--text", str(bad_utf8), "--tokenizer", tok, "--out", str(tmp_path / "o")],
         "latin1.txt:2: not UTF-8 text"),
        (["lm", "train", "--text", str(bad_gzip), "--tokenizer", tok, "--out", str(tmp_path / "o")],
         "broken.txt.gz: not a readable gzip file"),
        (["lm", "complete", "--lm", str(untrained_model["model"]), "the"], "an acoustic model's folder"),
        (["lm", "complete", "--lm", str(damaged), "the"], "model.safetensors: not a readable safetensors file"),
        (["lm", "complete", "--lm", str(wrong_type), "the"], "config.json: lm config: n_layers must be a whole number"),
        (["lm", "complete", "--lm", str(tmp_path / "nowhere"), "the"], "nowhere: no such folder"),
        (["lm", "perplexity", "--lm", str(grammar_lm["lm"]), "--text", str(tmp_path)], "not a file"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        line = _error_line(capsys)
        assert expected in line and "; " in line, line


# ---------------------------------------------------------------------------- shallow fusion (--lm)
@pytest.fixture(scope="module")
def fusion(untrained_model, tmp_path_factory) -> dict:
    """An untrained, peaked LM over the untrained model's own pieces (built in a second), two
    recordings and a manifest of them."""
    import numpy as np
    import soundfile as sf

    from speechformer.lm import export_lm
    from speechformer.transcribe import load_model

    d = tmp_path_factory.mktemp("fusion")
    tokenizer = load_model(untrained_model["model"]).tokenizer
    torch.manual_seed(1)
    lm = LanguageModel(LMConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, d_ff=64, n_layers=1,
                                dropout=0.0)).eval()
    with torch.no_grad():
        lm.embedding.weight.mul_(30.0)  # tied logits: a peaked LM, which a weight of 5 lets decide
    export_lm(lm, tokenizer, d / "lm")
    rng = np.random.default_rng(0)
    wavs = []
    for i, seconds in enumerate((0.6, 0.9)):
        wavs.append(d / f"u{i}.wav")
        sf.write(wavs[-1], (0.3 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    manifest = write_lines(d / "test.jsonl", [json.dumps({"id": w.stem, "audio": str(w), "duration": 0.5,
                                                          "text": "the cat"}) for w in wavs])
    return {"model": str(untrained_model["model"]), "lm": str(d / "lm"), "wavs": [str(w) for w in wavs],
            "manifest": str(manifest), "dir": d}


def _transcripts(fusion, capsys, *flags: str) -> str:
    assert main(["transcribe", "--model", fusion["model"], "--quiet", "--beam-size", "2", *flags,
                 *fusion["wavs"]]) == 0
    return capsys.readouterr().out


def _evaluated(fusion, out: str, *flags: str) -> list[str]:
    assert main(["evaluate", "--model", fusion["model"], "--manifest", fusion["manifest"], "--quiet",
                 "--out", str(fusion["dir"] / out), *flags]) == 0
    return sorted((fusion["dir"] / out / "utterances.tsv").read_text(encoding="utf-8").splitlines())


def test_lm_with_weight_0_transcribes_and_evaluates_as_without_it_and_a_strong_lm_changes_the_text(fusion, capsys):
    """--lm with --lm-weight 0 only vetoes (it forbids nothing): the text is exactly the text without
    --lm, in transcribe and evaluate; at weight 5 the LM's choice wins and the text is another."""
    plain = _transcripts(fusion, capsys)
    assert _transcripts(fusion, capsys, "--lm", fusion["lm"], "--lm-weight", "0") == plain
    assert _transcripts(fusion, capsys, "--lm", fusion["lm"], "--lm-weight", "5") != plain
    assert _evaluated(fusion, "plain") == _evaluated(fusion, "w0", "--lm", fusion["lm"], "--lm-weight", "0")
    assert _evaluated(fusion, "plain") != _evaluated(fusion, "w5", "--lm", fusion["lm"], "--lm-weight", "5",
                                                     "--lm-bonus", "1")


def test_lm_flags_are_refused_in_one_line_naming_the_flag(fusion, grammar_lm, capsys):
    """--lm with greedy CTC (no search to join), a negative weight, a weight without --lm, and an
    LM over other pieces than the model's: each one `error:` line naming the flag, nothing written."""
    cases = [
        (["--lm", fusion["lm"], "--decoder", "ctc"], "error: --lm "),
        (["--lm", fusion["lm"], "--lm-weight", "-1"], "error: --lm-weight: must be at least 0"),
        (["--lm-weight", "0.3"], "error: --lm-weight: applies with --lm"),
        (["--lm", str(grammar_lm["lm"]), "--lm-weight", "0.3"],
         "its tokenizer is not the one of the model (128 pieces against 40)"),
        (["--lm", fusion["lm"], "--max-len", "1000"], "error: --max-len 1000: more tokens than the LM"),
    ]
    for flags, expected in cases:
        for command in (["transcribe", *fusion["wavs"]],
                        ["evaluate", "--manifest", fusion["manifest"], "--out", str(fusion["dir"] / "refused")]):
            assert main([command[0], "--model", fusion["model"], "--quiet", *flags, *command[1:]]) == 2, flags
            line = _error_line(capsys)
            assert expected in line and "; " in line, line
            assert not (fusion["dir"] / "refused" / "summary.json").exists()
