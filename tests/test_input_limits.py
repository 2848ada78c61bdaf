"""What a model accepts: audio of any length from one sample on, and, for training, only
utterances that fit its position tables and can carry their transcript, reported up front.

Every input is made here: random waveforms, manifests of generated tones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechformer.decoding import DecodeOptions, decode
from speechformer.model import ModelConfig, SpeechTransformer
from speechformer.model.layers import Conv1dGLUSubsampling, Conv1dSubsampling, Conv2dSubsampling


def tiny_model(subsampling: str = "conv2d", **kw) -> SpeechTransformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=24, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=1,
                         dropout=0.0, subsampling=subsampling, subsampling_channels=8, **kw)
    return SpeechTransformer(config).eval()


# --------------------------------------------------------------------------- any length >= 1 sample
@pytest.mark.parametrize("subsampling", ["conv2d", "conv1d_glu", "conv1d"])
@pytest.mark.parametrize("samples", [1, 100, 400, 800])
def test_the_model_encodes_decodes_and_trains_on_any_length_from_one_sample(subsampling, samples):
    """1 sample to 50 ms (fewer frames than the conv2d stem's 7-frame receptive field): one
    encoder frame or more, a decoded hypothesis, finite losses. On main conv2d raised
    'Calculated padded input size per channel: (2 x 80). Kernel size: (3 x 3)'."""
    model = tiny_model(subsampling)
    wav = torch.randn(1, samples) * 0.1
    memory, lengths = model.encode(wav, torch.tensor([samples]))
    assert memory.shape[1] >= 1 and 1 <= int(lengths[0]) <= memory.shape[1]
    assert bool(torch.isfinite(memory).all())
    hyps = decode(model, memory, lengths, DecodeOptions(max_len=5))
    assert len(hyps) == 1 and len(hyps[0].tokens) <= 5
    model.train()
    out = model(wav, torch.tensor([samples]), torch.tensor([[5]]), torch.tensor([1]))
    assert bool(torch.isfinite(out["loss"])), out


@pytest.mark.parametrize("subsampling", ["conv2d", "conv1d_glu", "conv1d"])
def test_a_batch_of_short_clips_gives_each_clip_what_it_gets_alone(subsampling):
    """Several short clips batched together (transcribe --batch-seconds 2, or a small training
    batch): no error, and each clip gets as many encoder frames as on its own; with the unpadded
    stems (conv2d, conv1d_glu) the frames are the same. The conv1d stem (Whisper, always 30 s windows)
    pads inside its convolutions, so a clip's last frame there reads its neighbour's padding."""
    model = tiny_model(subsampling)
    lengths = [1, 100, 480, 800, 1000]
    torch.manual_seed(1)
    clips = [torch.randn(n) * 0.1 for n in lengths]
    batch = torch.zeros(len(clips), max(lengths))
    for row, clip in zip(batch, clips):
        row[:len(clip)] = clip
    memory, mem_lengths = model.encode(batch, torch.tensor(lengths))
    for row, clip in enumerate(clips):
        alone, alone_lengths = model.encode(clip[None], torch.tensor([len(clip)]))
        n = int(alone_lengths[0])
        assert int(mem_lengths[row]) == n and bool(torch.isfinite(memory[row]).all())
        if subsampling != "conv1d":
            torch.testing.assert_close(memory[row, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_normal_lengths_are_unchanged_by_the_short_input_padding():
    """From the receptive field on, the stems compute their plain convolutions (the conv2d stem in
    another memory layout, channels-last, and its projection reading the frames in (F', C) order
    with the weight reordered to match: equal to float32 rounding, gradients too)."""
    torch.manual_seed(2)
    conv2d, conv1d = Conv2dSubsampling(80, 32, 8), Conv1dSubsampling(80, 32)
    for frames in (7, 8, 9, 50, 333):
        x = torch.randn(2, frames, 80)
        y = conv2d.conv(x.unsqueeze(1))
        b, c, t, f = y.shape
        plain = conv2d.norm(conv2d.proj(y.transpose(1, 2).reshape(b, t, c * f)))
        grad = torch.randn_like(plain)
        plain_grads = torch.autograd.grad(plain, list(conv2d.parameters()), grad)
        out = conv2d(x)
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
        for g, want in zip(torch.autograd.grad(out, list(conv2d.parameters()), grad), plain_grads):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
        assert t == int(conv2d.output_lengths(torch.tensor(frames)))
        plain1 = conv1d.act(conv1d.conv2(conv1d.act(conv1d.conv1(x.transpose(1, 2))))).transpose(1, 2)
        assert torch.equal(conv1d(x), plain1)


def test_three_convolutions_give_80_ms_frames_and_their_length_rule_holds():
    """``subsampling_layers: 3``: 8x fewer frames than the 10 ms input, a 15-frame receptive field,
    and the length rule the data module and the model's mask use equals the real output length."""
    torch.manual_seed(3)
    stem = Conv2dSubsampling(80, 32, 8, layers=3)
    assert stem.min_frames == 15 and ModelConfig(subsampling_layers=3).subsampling_factor == 8
    for frames in (1, 14, 15, 16, 17, 100, 801):
        y = stem(torch.randn(1, frames, 80))
        assert y.shape[1] == int(stem.output_lengths(torch.tensor(frames))) == max(1, (((frames - 1) // 2 - 1) // 2 - 1) // 2)
    assert abs(y.shape[1] - 801 / 8) < 2  # ~one frame per 80 ms
    with pytest.raises(ValueError, match="subsampling_layers"):
        ModelConfig(subsampling_layers=4)


@pytest.mark.parametrize("layers", [2, 3])
def test_the_conv1d_glu_stem_length_rule_and_receptive_field_hold(layers):
    """5-wide stride-2 unpadded convolutions: (T - 5) // 2 + 1 frames per layer, 13 (two layers) or
    29 (three) input frames for one output frame, 40 or 80 ms frames; shorter clips give one frame."""
    torch.manual_seed(3)
    stem = Conv1dGLUSubsampling(80, 32, 16, layers=layers)
    assert stem.min_frames == {2: 13, 3: 29}[layers]
    assert ModelConfig(subsampling="conv1d_glu", subsampling_layers=layers).subsampling_factor == 2 ** layers
    for frames in (1, stem.min_frames - 1, stem.min_frames, stem.min_frames + 1, stem.min_frames + 2, 100, 801):
        want = frames
        for _ in range(layers):
            want = (want - 5) // 2 + 1
        y = stem(torch.randn(1, frames, 80))
        assert y.shape[1] == int(stem.output_lengths(torch.tensor(frames))) == max(1, want)
    assert abs(y.shape[1] - 801 / 2 ** layers) < 4
    with pytest.raises(ValueError, match="subsampling must be"):
        ModelConfig(subsampling="conv3d")


# --------------------------------------------------------------------------- training: what fits the model
WORDS = "the quick brown fox jumps over a lazy dog while seven green parrots sing".split()
SMALL = dict(max_source_positions=50, max_target_positions=20)  # 50 encoder frames: 2.05 s of audio


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from speechformer.tokenizer import train_tokenizer

    rng = random.Random(0)
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(200)], 40, out)
    return out


def one_token_word(tokenizer_dir) -> str:
    from speechformer.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return next(w for w in WORDS if len(tok.encode(w)) == 1)


def write_manifest(folder: Path, rows: list[tuple[float, str]]) -> Path:
    """rows: (seconds, text); each gets a tone wav of that length. Returns the manifest path."""
    (folder / "wavs").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (seconds, text) in enumerate(rows):
        n = int(round(seconds * 16000))
        wav = (0.3 * np.sin(np.arange(n) * 0.07 * (1 + i % 3))).astype(np.float32)
        sf.write(folder / "wavs" / f"u{i}.wav", wav, 16000, subtype="PCM_16")
        lines.append(json.dumps({"id": f"u{i}", "audio": f"wavs/u{i}.wav", "duration": n / 16000, "text": text}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_limits_agree_with_the_model_itself():
    """UtteranceLimits' longest audio encodes; 40 ms more stops the model with its position error."""
    from speechformer.data import UtteranceLimits

    model = tiny_model(**SMALL)
    longest = UtteranceLimits(model.config).longest_seconds()
    assert longest == 2.05  # 32800 samples: 206 frames of 10 ms, 50 after the 4x subsampling
    samples = int(longest * 16000)
    memory, _ = model.encode(torch.randn(1, samples) * 0.1, torch.tensor([samples]))
    assert memory.shape[1] == 50
    over = samples + 640
    with pytest.raises(ValueError, match="sequence of 51 positions exceeds the maximum 50"):
        model.encode(torch.randn(1, over) * 0.1, torch.tensor([over]))


def bad_rows(tokenizer_dir):
    long_text = " ".join(WORDS * 2)  # more than the 19 tokens the decoder has room for
    return [(1.0, "the quick brown fox"),       # 1 good
            (0.03, one_token_word(tokenizer_dir)),  # 2 good: 30 ms, one encoder frame, one token
            (1.0, "fox 你好 jumps 😀"),            # 3 good, with characters the tokenizer cannot represent
            (3.0, "the lazy dog"),              # 4 longer than the 50 encoder frames (2.05 s)
            (1.0, long_text),                   # 5 transcript longer than the decoder's table
            (0.03, "the lazy dog")]             # 6 30 ms: too few encoder frames for CTC


def test_data_validate_with_the_model_names_every_utterance_it_cannot_take(tokenizer_dir, tmp_path, capsys):
    """On main: `data validate` said OK (it knew no model) and training died mid-epoch naming no line."""
    from speechformer.cli import main

    manifest = write_manifest(tmp_path, bad_rows(tokenizer_dir))
    assert main(["data", "validate", str(manifest)]) == 0  # without the model: nothing to check against
    capsys.readouterr()
    model_dir = tmp_path / "model"  # what `validate --model` reads: config.json and the tokenizer
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model": ModelConfig(vocab_size=40, **SMALL).to_dict()}))
    (model_dir / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    config = tmp_path / "train.yaml"
    config.write_text(f"model:\n  model: {json.dumps(SMALL)}\ndata:\n  tokenizer: {tokenizer_dir}\n"
                      f"  train_manifest: {manifest}\n")
    for how in (["--model", str(model_dir), str(manifest)], ["--config", str(config)]):
        assert main(["data", "validate", *how]) == 1, how
        out = capsys.readouterr()
        by_line = {int(line.split(":")[1]): line for line in out.out.splitlines() if line.startswith(str(manifest))
                   and line.split(":")[1].isdigit()}
        assert sorted(by_line) == [4, 5, 6], out.out
        assert "3.00 s of audio is 74 encoder frames, more than the model's 50" in by_line[4]
        assert "data.max_duration: 2.05" in by_line[4]
        assert "transcript is" in by_line[5] and "more than the decoder's 19" in by_line[5]
        assert "too few for CTC to align" in by_line[6]
        assert "3 problem(s) on 3 line(s); 3 good utterance(s)" in out.err
        assert "'你' (U+4F60) x1, line(s) 3" in out.out and "'😀' (U+1F600) x1, line(s) 3" in out.out
    # the training config's data.max_duration leaves the long audio out, as training does
    config.write_text(config.read_text() + "  max_duration: 2.0\n")
    assert main(["data", "validate", "--config", str(config)]) == 1
    out = capsys.readouterr()
    assert "leaves out 1 longer utterance(s) (the first on line 4)" in out.err
    assert "2 problem(s) on 2 line(s)" in out.err


def test_data_validate_lists_the_characters_the_tokenizer_cannot_represent(tokenizer_dir, tmp_path, capsys):
    """Chinese (<unk>) and an emoji (removed by the normalisation): main said OK without a word."""
    from speechformer.cli import main

    manifest = write_manifest(tmp_path, [(0.5, "the fox"), (0.5, "你 fox 😀"), (0.5, "dog"), (0.5, "你 你")])
    assert main(["data", "validate", "--tokenizer", str(tokenizer_dir), str(manifest)]) == 0  # a warning
    out = capsys.readouterr()
    assert "2 character(s) in 2 line(s) that the tokenizer does not represent" in out.out
    assert "'你' (U+4F60) x3, line(s) 2, 4" in out.out and "'😀' (U+1F600) x1, line(s) 2" in out.out
    assert "OK, 4 utterances, 0.00 h; 2 character(s) the tokenizer does not represent" in out.err


def _fit(manifest, tokenizer_dir, tmp_path, **data_kw):
    import lightning as L

    from speechformer.data import SpeechDataModule
    from speechformer.lightning import SpeechModule

    L.seed_everything(0, verbose=False)
    config = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                         subsampling_channels=8, dropout=0.0, **SMALL)
    module = SpeechModule(model=config, tokenizer=str(tokenizer_dir), warmup_steps=1, stats_utterances=10)
    data = SpeechDataModule(train_manifest=str(manifest), tokenizer=str(tokenizer_dir), max_batch_size=1,
                            num_workers=0, **data_kw)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    return trainer, data


def test_training_refuses_utterances_the_model_cannot_take_before_it_starts_unless_told_to_skip(
        tokenizer_dir, tmp_path):
    """`fit` checks every line against the model it trains before the first step; on main the 30 ms
    utterance alone in its batch stopped it with a conv2d error and the 3 s one with 'sequence of 74
    positions exceeds the maximum 50', naming no utterance. skip_bad_lines drops them with a count,
    the 30 ms one-token utterance trains, and the characters the tokenizer cannot represent are
    reported once at setup."""
    from speechformer.data import ManifestError

    manifest = write_manifest(tmp_path, bad_rows(tokenizer_dir))
    with pytest.raises(ManifestError) as refused:
        _fit(manifest, tokenizer_dir, tmp_path)
    assert [p.line for p in refused.value.problems] == [4, 5, 6]
    assert "train.jsonl:4: 3.00 s of audio is 74 encoder frames" in str(refused.value)
    with pytest.warns(UserWarning) as warned:
        trainer, data = _fit(manifest, tokenizer_dir, tmp_path, skip_bad_lines=True)
    messages = [str(w.message) for w in warned]
    assert any("skipped 3 bad line(s), kept 3 utterance(s)" in m for m in messages), messages
    lost = [m for m in messages if "the tokenizer does not represent" in m]
    assert len(lost) == 1 and "'你' (U+4F60) x1, line(s) 3" in lost[0], messages
    assert trainer.global_step == 3 and [u.line for u in data.train_dataset().utts] == [1, 2, 3]


@pytest.mark.parametrize("subsampling, layers", [("conv2d", 2), ("conv2d", 3), ("conv1d_glu", 2), ("conv1d_glu", 3)])
def test_the_stems_counted_flops_equal_what_torch_counts(subsampling, layers):
    """MFU's numerator for the stem (``flops.stem_flops``) against ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    from speechformer.flops import stem_flops

    model = tiny_model(subsampling, subsampling_layers=layers)
    with FlopCounterMode(display=False) as counter:
        y = model.subsampling(torch.randn(1, 333, 80))
    flops, frames = stem_flops(model.config, 333)
    assert frames == y.shape[1] and flops == counter.get_total_flops()
