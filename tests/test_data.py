"""Manifests, the duration-bucketing sampler (incl. its DDP property), collate, tokenizer, frontend."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechformer.data import DurationBatchSampler, ManifestError, collate, read_manifest
from speechformer.frontend import LogMelFrontend, SpecAugment
from speechformer.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven green parrots sing about "
         "rivers mountains and quiet evenings don't stop").split()


def _durations(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.5, 12.0) for _ in range(n)]


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [7, 50, 333])
def test_sampler_every_rank_same_count_every_utterance_once(replicas, n):
    durations = _durations(n, seed=n)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(replicas):
            s = DurationBatchSampler(durations, max_seconds=30.0, num_replicas=replicas, rank=rank, seed=3)
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s)
            per_rank.append(batches)
        assert len({len(b) for b in per_rank}) == 1, "every rank must get the same number of batches"
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(seen) == list(range(n)), "every utterance exactly once per epoch"


def test_sampler_caps_padded_seconds_and_buckets_by_length():
    durations = _durations(500)
    s = DurationBatchSampler(durations, max_seconds=40.0)
    batches = list(s)
    for b in batches:
        assert len(b) == 1 or max(durations[i] for i in b) * len(b) <= 40.0
    padded = sum(max(durations[i] for i in b) * len(b) for b in batches)
    assert sum(durations) / padded > 0.85  # bucketing keeps padding small
    # a new epoch reshuffles; the same epoch is reproducible
    s.set_epoch(1)
    assert list(s) != batches
    s.set_epoch(0)
    assert list(s) == batches


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_seconds"):
        DurationBatchSampler([1.0], max_seconds=0)
    with pytest.raises(ValueError, match="cannot be shared"):
        DurationBatchSampler([1.0], max_seconds=10, num_replicas=2)


def test_manifest_reading_resolves_paths_and_reports_bad_lines(tmp_path):
    m = tmp_path / "sub" / "m.jsonl"
    m.parent.mkdir()
    m.write_text(json.dumps({"id": "a", "audio": "wavs/a.wav", "duration": 1.5, "text": "hi"}) + "\n"
                 + json.dumps({"id": "b", "audio": "/abs/b.wav", "duration": 2, "text": "yo", "offset": 1.0}) + "\n")
    utts = read_manifest(m)
    assert utts[0].audio == m.parent / "wavs/a.wav"
    assert str(utts[1].audio) == "/abs/b.wav" and utts[1].offset == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "audio": "a.wav", "duration": 1}) + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: not valid JSON"):
        read_manifest(bad)
    bad.write_text(json.dumps({"id": "a", "audio": "a.wav", "duration": -1}) + "\n")
    with pytest.raises(ManifestError, match=r":1: duration must be positive"):
        read_manifest(bad)
    bad.write_text("".join(json.dumps({"id": "a", "audio": "a.wav", "duration": 1, "text": "t"}) + "\n"
                           for _ in range(2)))
    with pytest.raises(ManifestError, match=r":2: duplicate id"):
        read_manifest(bad)


def test_collate_pads_and_keeps_lengths():
    items = [{"id": "a", "text": "x", "wav": torch.ones(5), "tokens": torch.tensor([5, 6])},
             {"id": "b", "text": "y", "wav": torch.ones(3), "tokens": torch.tensor([7, 8, 9])}]
    batch = collate(items)
    assert batch["wav"].shape == (2, 5) and batch["wav_lengths"].tolist() == [5, 3]
    assert batch["wav"][1, 3:].abs().sum() == 0
    assert batch["tokens"].tolist() == [[5, 6, 0], [7, 8, 9]] and batch["token_lengths"].tolist() == [2, 3]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    return train_tokenizer(texts, 80, tmp_path_factory.mktemp("tok"))


def test_tokenizer_round_trip_and_reserved_ids(tokenizer, tmp_path):
    text = "the lazy parrots don't stop singing about quiet rivers"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert min(ids) > tokenizer.eos_id  # blank/unk/bos/eos are never produced for known characters
    assert tokenizer.decode(tokenizer.encode("The QUICK, brown fox!")) == "the quick brown fox"
    reloaded = Tokenizer.load(tokenizer.save(tmp_path))
    assert reloaded.encode(text) == ids
    # BPE learnt merges: far fewer pieces than letters
    merged = "the lazy parrots sing about quiet rivers"
    assert len(tokenizer.encode(merged)) < len(merged.replace(" ", "")) / 2


def test_tokenizer_rejects_a_vocab_the_text_cannot_fill(tmp_path):
    with pytest.raises(ValueError, match="vocab-size"):
        train_tokenizer(["a b", "b a"], 500, tmp_path)


def test_frontend_frames_are_normalised_with_stored_statistics():
    fe = LogMelFrontend()
    wav = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([16000, 8000])
    raw, frames = fe.log_mel(wav, lengths)
    assert raw.shape == (2, 101, 80) and frames.tolist() == [101, 51]
    x = raw[0]
    fe.set_stats(x.sum(0), (x ** 2).sum(0), x.shape[0])
    out, _ = fe(wav, lengths)
    torch.testing.assert_close(out[0].mean(0), torch.zeros(80), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[0].std(0, unbiased=False), torch.ones(80), atol=1e-2, rtol=0)
    assert out[1, 51:].abs().sum() == 0  # padded frames are zero
    assert "mean" in fe.state_dict() and "std" in fe.state_dict()  # stats travel with the checkpoint


def test_frontend_log_mel_is_torchaudios_mel_spectrogram():
    """The log-mel is the log of torchaudio's ``MelSpectrogram`` on the zero-padded audio (the power
    computed as re^2 + im^2 instead of |X|^2: equal to float32 rounding), at several lengths."""
    import torchaudio

    torch.manual_seed(0)
    fe = LogMelFrontend()
    reference = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, win_length=400, hop_length=160, n_mels=80,
                                                     power=2.0, center=False)
    for n in (400, 16000, 23456):
        wav = torch.randn(3, n) * torch.tensor([[0.01], [0.1], [1.0]])
        ours, frames = fe.log_mel(wav, torch.full((3,), n))
        expected = reference(torch.nn.functional.pad(wav, (256, 256))).clamp_min(1e-10).log().transpose(1, 2)
        assert ours.shape == expected.shape and int(frames[0]) == ours.shape[1]
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)


def test_specaugment_masks_only_in_training():
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width_ratio=0.2)
    x = torch.ones(4, 100, 80)
    lengths = torch.full((4,), 100)
    aug.eval()
    assert torch.equal(aug(x, lengths), x)
    aug.train()
    torch.manual_seed(0)
    y = aug(x, lengths)
    zeros = (y == 0).float().mean()
    assert 0 < zeros < 0.6


@settings(max_examples=25, deadline=None)
@given(n=st.integers(min_value=1, max_value=4000), scale=st.floats(min_value=1e-4, max_value=1e3))
def test_frontend_gives_finite_frames_for_any_length_and_scale(n, scale):
    fe = LogMelFrontend()
    wav = torch.randn(1, n) * scale
    out, frames = fe(wav, torch.tensor([n]))
    assert out.shape[1] == int(frames[0]) == n // 160 + 1
    assert torch.isfinite(out).all()


def _bad_manifest(tmp_path):
    """A manifest with one of each problem the validator must find, and two good lines."""
    import soundfile as sf

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for name in ("good1", "good2", "short"):
        sf.write(wavs / f"{name}.wav", np.full(16000, 0.1, dtype=np.float32), 16000)
    def row(**kw):
        base = {"id": "x", "audio": "wavs/good1.wav", "duration": 1.0, "text": "hello"}
        base.update(kw)
        return json.dumps({k: v for k, v in base.items() if v is not None}, ensure_ascii=False).encode() + b"\n"
    lines = [
        row(id="good1"),                                   # 1
        b"{not json\n",                                    # 2
        row(id="nodur", duration=None),                    # 3 missing field
        row(id="neg", duration=-2),                        # 4 negative duration
        row(id="wrongdur", audio="wavs/short.wav", duration=7.5),  # 5 wrong duration
        row(id="gone", audio="wavs/missing.wav"),          # 6 audio does not exist
        row(id="empty", text=""),                          # 7 empty transcript
        b'{"id": "latin", "audio": "wavs/good2.wav", "duration": 1.0, "text": "caf\xe9"}\n',  # 8 not UTF-8
        row(id="good1", audio="wavs/good2.wav"),           # 9 duplicate id
        row(id="good2", audio="wavs/good2.wav", text="na\u00efve \u00fcber"),  # 10 good, non-ASCII
    ]
    m = tmp_path / "bad.jsonl"
    m.write_bytes(b"".join(lines))
    return m


def test_validate_reports_every_problem_with_its_line(tmp_path):
    from speechformer.data import scan_manifest

    m = _bad_manifest(tmp_path)
    utts, problems = scan_manifest(m, check_audio=True)
    assert [u.id for u in utts] == ["good1", "good2"]
    by_line = {p.line: p.message for p in problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in by_line[2]
    assert "missing field(s) duration" in by_line[3]
    assert "duration must be positive" in by_line[4]
    assert "7.500 s but" in by_line[5] and "short.wav is 1.000 s long" in by_line[5]
    assert "file not found" in by_line[6] and "missing.wav" in by_line[6]
    assert "empty transcript" in by_line[7]
    assert "not UTF-8" in by_line[8]
    assert "duplicate id 'good1' (first on line 1)" in by_line[9]
    with pytest.raises(ManifestError) as err:
        read_manifest(m, check_audio=True)
    assert len(err.value.problems) == 8 and "bad.jsonl:9: duplicate id" in str(err.value)
    with pytest.warns(UserWarning, match="skipped 8 bad line"):
        assert [u.id for u in read_manifest(m, check_audio=True, skip_bad=True)] == ["good1", "good2"]


def test_cli_data_validate_exit_status_and_report(tmp_path, capsys):
    from speechformer.cli import main

    m = _bad_manifest(tmp_path)
    assert main(["data", "validate", str(m)]) == 1
    out = capsys.readouterr()
    assert all(f"bad.jsonl:{n}:" in out.out for n in (2, 3, 4, 5, 6, 7, 8, 9))
    assert "8 problem(s) on 8 line(s); 2 good" in out.err
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(l for i, l in enumerate(m.read_bytes().splitlines(keepends=True)) if i in (0, 9)))
    assert main(["data", "validate", str(good)]) == 0
    assert "OK, 2 utterances" in capsys.readouterr().err


def test_sampler_shuffle_is_seeded_by_the_epoch_and_the_same_on_every_rank():
    durations = _durations(333, seed=1)
    ranks = [DurationBatchSampler(durations, max_seconds=30.0, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    lists = []
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        assert ranks[0]._all_batches() == ranks[1]._all_batches()  # each rank builds the same global list
        lists.append(ranks[0]._all_batches())
    assert lists[0] != lists[1]  # and a new epoch reshuffles it


def test_lightning_hands_the_epoch_to_the_batch_sampler():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = DurationBatchSampler(_durations(50), max_seconds=30.0, num_replicas=2, rank=1, seed=3)
    loader = DataLoader(list(range(50)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 4)  # what Lightning's fit loop calls at the start of each epoch
    assert sampler.epoch == 4


def test_every_epoch_has_the_same_number_of_batches():
    """Lightning counts the batches of an epoch once; an epoch with one batch fewer skipped its
    validation (seen in the synthetic recipe). Batches are made once, their order reshuffled."""
    rng = random.Random(3)
    durations = [rng.uniform(0.5, 12.0) for _ in range(997)]
    # small buckets: re-packing them every epoch gave 229-234 batches (checked against the old sampler)
    s = DurationBatchSampler(durations, max_seconds=40.0, seed=1, bucket_size=3)
    counts, orders = set(), []
    for epoch in range(6):
        s.set_epoch(epoch)
        batches = list(s)
        counts.add(len(batches))
        assert len(batches) == len(s)
        orders.append(batches)
    assert len(counts) == 1 and orders[0] != orders[1]


def test_speed_perturbation_plays_a_whole_batch_at_one_speed_so_padding_stays_small():
    """With a factor drawn per utterance most batches padded to the one utterance slowed to 0.9x
    (1.11x the audio of no perturbation on the recipe's corpus); one draw per batch keeps the
    batch's lengths alike, and the factors still vary from batch to batch and epoch to epoch."""
    from speechformer.data import SpeechDataset

    durations = _durations(300, seed=5)
    sampler = DurationBatchSampler(durations, max_seconds=40.0, seed=2, draw_seeds=True)
    dataset = SpeechDataset([], None, speed_perturb=[0.9, 1.0, 1.1])
    factors = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i, _ in b) == list(range(300))
        draws = [{d for _, d in b} for b in batches]
        assert all(len(d) == 1 for d in draws), "every item of a batch shares the batch's draw"
        assert len({d.pop() for d in draws}) == len(batches), "each batch has a draw of its own"
        factors.append([dataset.speed_perturb[dataset.draw_choice(b[0][1])] for b in batches])
        padded = {f: 0.0 for f in dataset.speed_perturb}
        for b, f in zip(batches, factors[-1]):
            padded[f] += max(durations[i] for i, _ in b) * len(b) / f
        plain = sum(max(durations[i] for i, _ in b) * len(b) for b in batches)
        mean = sum(padded.values()) / plain  # the audio a perturbed epoch pads to, against no perturbation
        assert 0.95 < mean < 1.05
    assert set(factors[0]) == {0.9, 1.0, 1.1} and factors[0] != factors[1]
    # the same seed and epoch draw the same factors (what an exact resume needs)
    sampler.set_epoch(1)
    assert [dataset.speed_perturb[dataset.draw_choice(b[0][1])] for b in sampler] == factors[1]
