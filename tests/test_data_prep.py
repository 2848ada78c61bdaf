"""Tests for data_prep/synthetic.py (sentence grammar, corpus generation) and data_prep/folder.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import ROOT, load_data_prep

synthetic = load_data_prep("synthetic")
folder = load_data_prep("folder")


def _espeak_backend_or_skip() -> str:
    try:
        return synthetic.find_backend()
    except synthetic.EspeakUnavailable as err:
        pytest.skip(f"no eSpeak NG backend (espeakng_loader or espeak-ng): {err}")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------
# sentence generator
# ---------------------------------------------------------------------------------------


def test_vocabulary_has_at_least_1000_distinct_plain_words():
    vocab = synthetic.vocabulary()
    assert len(vocab) >= 1000
    assert all(re.fullmatch(r"[a-z]+", word) for word in vocab), "lower-case letters only"
    # The base lists alone (lemmas, before inflection) also exceed 1,000 words.
    lemmas = set(synthetic._NOUNS) | set(synthetic._PLACES) | set(synthetic._ADJECTIVES)
    lemmas |= (
        set(synthetic.ADVERBS) | set(synthetic.NAMES) | set(synthetic.DAYS) | set(synthetic.MONTHS)
    )
    for verbs in (synthetic._TRANSITIVE, synthetic._INTRANSITIVE, synthetic._MOTION):
        lemmas |= {verb.base for verb in verbs}
    assert len(lemmas) >= 1000


def test_every_slot_is_used_and_every_template_slot_exists():
    used = {
        slot for template in synthetic.TEMPLATES for slot in re.findall(r"\{([^}]+)\}", template)
    }
    composed = {"num", "a_noun", "a_adj_noun"}
    assert used - composed <= set(synthetic.SLOTS)
    assert set(synthetic.SLOTS) - {"num.small", "num.any"} <= used


def test_sentences_are_clean_and_sized():
    generator = synthetic.SentenceGenerator(seed=3)
    vocab = synthetic.vocabulary()
    for _ in range(2000):
        text, spoken = generator.next()
        words = text.split()
        assert synthetic.MIN_WORDS <= len(words) <= synthetic.MAX_WORDS, text
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", text), text
        assert set(words) <= vocab, text
        assert spoken[:-1] == text and spoken[-1] in ".?"


def test_inflection_and_numbers():
    assert [synthetic.plural(n) for n in ("box", "baby", "toy", "knife", "sheep", "tomato")] == [
        "boxes",
        "babies",
        "toys",
        "knives",
        "sheep",
        "tomatoes",
    ]
    assert synthetic._inflect_verb("stop") == synthetic.Verb("stop", "stops", "stopped", "stopping")
    assert synthetic._inflect_verb("carry") == synthetic.Verb(
        "carry", "carries", "carried", "carrying"
    )
    assert synthetic._inflect_verb("make:made") == synthetic.Verb("make", "makes", "made", "making")
    assert synthetic._inflect_verb("tie") == synthetic.Verb("tie", "ties", "tied", "tying")
    assert synthetic.number_words(42) == "forty two"
    assert synthetic.number_words(17) == "seventeen"
    assert synthetic.number_words(305) == "three hundred and five"
    assert synthetic.article("apple") == "an" and synthetic.article("useful") == "a"


def test_generator_is_deterministic_per_seed():
    def first(seed: int) -> list[tuple[str, str]]:
        generator = synthetic.SentenceGenerator(seed)
        return [generator.next() for _ in range(300)]

    assert first(5) == first(5)
    assert first(5) != first(6)
    assert synthetic.split_sentences(1, 200, 20, 20) == synthetic.split_sentences(1, 200, 20, 20)


def test_splits_are_disjoint_and_sized():
    splits = synthetic.split_sentences(0, 3000, 200, 200)
    texts = {name: [text for text, _ in items] for name, items in splits.items()}
    assert {name: len(items) for name, items in texts.items()} == {
        "train": 3000,
        "valid": 200,
        "test": 200,
    }
    for name, items in texts.items():
        assert len(set(items)) == len(items), f"duplicate sentence inside {name}"
    assert not set(texts["test"]) & set(texts["train"])
    assert not set(texts["valid"]) & set(texts["train"])
    assert not set(texts["test"]) & set(texts["valid"])
    # Decks spread the words: nearly every word of the grammar occurs in training.
    train_words = {word for text in texts["train"] for word in text.split()}
    assert len(synthetic.vocabulary() - train_words) < 0.02 * len(synthetic.vocabulary())


def test_plans_hold_out_the_test_speaker():
    plans = synthetic.plan_corpus(0, 300, 30, 30)
    held_out = "+".join(synthetic.HELD_OUT)
    by_split = {split: {p.speaker for p in plans if p.split == split} for split in synthetic.SPLITS}
    assert by_split["test"] == {held_out}
    assert held_out not in by_split["train"] | by_split["valid"]
    # The held-out variant is unseen with any accent, not just in this combination.
    assert not any(p.variant == synthetic.HELD_OUT[1] for p in plans if p.split != "test")
    assert len(by_split["train"]) > 50
    for plan in plans:
        assert synthetic.RATE_WPM[0] <= plan.rate <= synthetic.RATE_WPM[1]
        assert synthetic.PITCH[0] <= plan.pitch <= synthetic.PITCH[1]
        assert synthetic.SNR_DB[0] <= plan.snr_db <= synthetic.SNR_DB[1]


# ---------------------------------------------------------------------------------------
# corpus generation (needs eSpeak NG)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    _espeak_backend_or_skip()
    out = tmp_path_factory.mktemp("synthetic")
    summary = synthetic.generate_corpus(out, num_train=6, num_valid=2, num_test=2, seed=11, jobs=1)
    assert not summary.skipped
    assert summary.counts == {"train": 6, "valid": 2, "test": 2}
    return out


def test_corpus_manifests_and_audio(small_corpus: Path):
    records = {split: _read_jsonl(small_corpus / f"{split}.jsonl") for split in synthetic.SPLITS}
    assert {split: len(r) for split, r in records.items()} == {"train": 6, "valid": 2, "test": 2}
    for split, items in records.items():
        for record in items:
            assert list(record) == ["id", "audio", "duration", "text", "speaker"]
            assert record["audio"] == f"wavs/{split}/{record['id']}.wav"
            path = small_corpus / record["audio"]
            assert path.is_file()
            info = soundfile.info(str(path))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert record["duration"] == round(info.frames / 16000, 3)
            assert 0.8 < record["duration"] < 6.0, record
            audio, _ = soundfile.read(str(path), dtype="float32")
            assert 0.4 < np.abs(audio).max() <= 1.0, "peak-normalised, not clipped"
            # Leading silence holds only faint noise; the speech is much louder.
            assert np.abs(audio[:400]).max() < 0.3 * np.abs(audio).max()
    train_speakers = {r["speaker"] for r in records["train"] + records["valid"]}
    test_speakers = {r["speaker"] for r in records["test"]}
    assert test_speakers == {"+".join(synthetic.HELD_OUT)}
    assert not test_speakers & train_speakers
    readme = (small_corpus / "README.txt").read_text()
    assert "+".join(synthetic.HELD_OUT) in readme and "seed: 11" in readme


def test_corpus_generation_is_reproducible_and_skips_when_up_to_date(
    small_corpus: Path, tmp_path: Path
):
    again = synthetic.generate_corpus(
        tmp_path, num_train=6, num_valid=2, num_test=2, seed=11, jobs=2
    )
    assert not again.skipped
    for split in synthetic.SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (
            small_corpus / f"{split}.jsonl"
        ).read_bytes()
    # Same parameters: nothing is regenerated.
    wav = tmp_path / "wavs" / "train" / "train_00000.wav"
    before = wav.stat().st_mtime_ns
    skipped = synthetic.generate_corpus(
        tmp_path, num_train=6, num_valid=2, num_test=2, seed=11, jobs=1
    )
    assert skipped.skipped and wav.stat().st_mtime_ns == before
    assert skipped.counts == again.counts and abs(skipped.hours - again.hours) < 1e-9
    # A missing audio file invalidates the stamp.
    wav.unlink()
    redone = synthetic.generate_corpus(
        tmp_path, num_train=6, num_valid=2, num_test=2, seed=11, jobs=1
    )
    assert not redone.skipped and wav.is_file()


def test_same_utterance_renders_identically_whatever_came_before():
    backend = synthetic.make_backend(_espeak_backend_or_skip())
    plan = synthetic.plan_corpus(2, 3, 0, 0)[0]
    first = synthetic.render(plan, backend)
    backend.synthesize("something else entirely.", "en-029", "klatt", 190, 35)
    assert np.array_equal(first, synthetic.render(plan, backend))


def test_cli_reports_missing_espeak(tmp_path: Path):
    # Hide both backends: no espeakng_loader module, no espeak-ng on PATH.
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "espeakng_loader.py").write_text("raise ImportError('blocked for the test')\n")
    script = str(ROOT / "data_prep" / "synthetic.py")
    code = (
        "import runpy, sys\n"
        "sys.path.insert(0, sys.argv.pop(1))\n"
        "sys.argv[0] = sys.argv.pop(1)\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(blocker), script, "--out", str(tmp_path / "out")],
        check=False,
        capture_output=True,
        text=True,
        env={"PATH": str(tmp_path)},
    )
    assert result.returncode == 2
    assert (
        "pip install espeakng-loader" in result.stderr
        and "apt-get install espeak-ng" in result.stderr
    )


# ---------------------------------------------------------------------------------------
# folder.py
# ---------------------------------------------------------------------------------------


def _sine(path: Path, seconds: float, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(path), 0.3 * np.sin(2 * np.pi * 440 * t), rate)


def test_folder_manifest(tmp_path: Path, capsys):
    audio = tmp_path / "corpus"
    (audio / "alice").mkdir(parents=True)
    (audio / "bob" / "day2").mkdir(parents=True)
    _sine(audio / "alice" / "one.wav", 1.0)
    (audio / "alice" / "one.txt").write_text("  hello world \n")
    _sine(audio / "alice" / "two.flac", 0.5, rate=8000)
    (audio / "alice" / "two.txt").write_text("second\nline")
    _sine(audio / "bob" / "day2" / "three.wav", 1.25)
    (audio / "bob" / "day2" / "three.txt").write_text("three")
    _sine(audio / "bob" / "orphan.wav", 0.3)  # no transcript
    (audio / "notes.txt").write_text("not a transcript of anything")

    out = tmp_path / "manifests" / "all.jsonl"
    assert folder.build_manifest(audio, out, ["wav", "flac"]) == 3
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "id": "alice_one",
            "audio": "../corpus/alice/one.wav",
            "duration": 1.0,
            "text": "hello world",
            "speaker": "alice",
        },
        {
            "id": "alice_two",
            "audio": "../corpus/alice/two.flac",
            "duration": 0.5,
            "text": "second line",
            "speaker": "alice",
        },
        {
            "id": "bob_day2_three",
            "audio": "../corpus/bob/day2/three.wav",
            "duration": 1.25,
            "text": "three",
            "speaker": "day2",
        },
    ]
    err = capsys.readouterr().err
    assert "skipped 1 audio file(s) without a .txt transcript: bob/orphan.wav" in err

    # Only .wav requested: the flac file is ignored.
    assert folder.build_manifest(audio, tmp_path / "wav_only.jsonl", ["wav"]) == 2
    assert [
        json.loads(line)["id"] for line in (tmp_path / "wav_only.jsonl").read_text().splitlines()
    ] == ["alice_one", "bob_day2_three"]


def test_folder_cli(tmp_path: Path):
    audio = tmp_path / "data"
    audio.mkdir()
    _sine(audio / "a.wav", 0.25)
    script = str(ROOT / "data_prep" / "folder.py")
    out = tmp_path / "m.jsonl"
    empty = subprocess.run(
        [sys.executable, script, "--audio-dir", str(audio), "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert empty.returncode != 0 and not out.exists()
    assert "without a .txt transcript: a.wav" in empty.stderr
    (audio / "a.txt").write_text("a")
    ok = subprocess.run(
        [sys.executable, script, "--audio-dir", str(audio), "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text()) == {
        "id": "a",
        "audio": "data/a.wav",
        "duration": 0.25,
        "text": "a",
        "speaker": "data",
    }
