"""What a model accepts: audio of any length from one sample on, and, for training, only
utterances that fit its position tables and can carry their transcript, reported up front.

Every input is made here: random waveforms, manifests of generated tones.
"""

from __future__ import annotations

import pytest
import torch

from speechformer.decoding import DecodeOptions, decode
from speechformer.model import ModelConfig, SpeechTransformer
from speechformer.model.layers import Conv1dSubsampling, Conv2dSubsampling


def tiny_model(subsampling: str = "conv2d", **kw) -> SpeechTransformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=24, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=1,
                         dropout=0.0, subsampling=subsampling, subsampling_channels=8, **kw)
    return SpeechTransformer(config).eval()


# --------------------------------------------------------------------------- any length >= 1 sample
@pytest.mark.parametrize("subsampling", ["conv2d", "conv1d"])
@pytest.mark.parametrize("samples", [1, 100, 400, 800])
def test_the_model_encodes_decodes_and_trains_on_any_length_from_one_sample(subsampling, samples):
    """1 sample to 50 ms (fewer frames than the conv2d stem's 7-frame receptive field): one
    encoder frame or more, a decoded hypothesis, finite losses. On main conv2d raised
    'Calculated padded input size per channel: (2 x 80). Kernel size: (3 x 3)'."""
    model = tiny_model(subsampling)
    wav = torch.randn(1, samples) * 0.1
    memory, lengths, _ = model.encode(wav, torch.tensor([samples]))
    assert memory.shape[1] >= 1 and 1 <= int(lengths[0]) <= memory.shape[1]
    assert bool(torch.isfinite(memory).all())
    hyps = decode(model, memory, lengths, DecodeOptions(max_len=5))
    assert len(hyps) == 1 and len(hyps[0].tokens) <= 5
    model.train()
    out = model(wav, torch.tensor([samples]), torch.tensor([[5]]), torch.tensor([1]))
    assert bool(torch.isfinite(out["loss"])), out


@pytest.mark.parametrize("subsampling", ["conv2d", "conv1d"])
def test_a_batch_of_short_clips_gives_each_clip_what_it_gets_alone(subsampling):
    """Several short clips batched together (transcribe --batch-seconds 2, or a small training
    batch): no error, and each clip gets as many encoder frames as on its own; with the conv2d
    stem (trained models) the frames are the same. The conv1d stem (Whisper, always 30 s windows)
    pads inside its convolutions, so a clip's last frame there reads its neighbour's padding."""
    model = tiny_model(subsampling)
    lengths = [1, 100, 480, 800, 1000]
    torch.manual_seed(1)
    clips = [torch.randn(n) * 0.1 for n in lengths]
    batch = torch.zeros(len(clips), max(lengths))
    for row, clip in zip(batch, clips):
        row[:len(clip)] = clip
    memory, mem_lengths, _ = model.encode(batch, torch.tensor(lengths))
    for row, clip in enumerate(clips):
        alone, alone_lengths, _ = model.encode(clip[None], torch.tensor([len(clip)]))
        n = int(alone_lengths[0])
        assert int(mem_lengths[row]) == n and bool(torch.isfinite(memory[row]).all())
        if subsampling == "conv2d":
            torch.testing.assert_close(memory[row, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_normal_lengths_are_unchanged_by_the_short_input_padding():
    """From the receptive field on, the stems compute exactly their plain convolutions."""
    torch.manual_seed(2)
    conv2d, conv1d = Conv2dSubsampling(80, 32, 8), Conv1dSubsampling(80, 32)
    for frames in (7, 8, 9, 50, 333):
        x = torch.randn(2, frames, 80)
        y = conv2d.conv(x.unsqueeze(1))
        b, c, t, f = y.shape
        plain = conv2d.norm(conv2d.proj(y.transpose(1, 2).reshape(b, t, c * f)))
        assert torch.equal(conv2d(x), plain)
        assert t == int(conv2d.output_lengths(torch.tensor(frames)))
        plain1 = conv1d.act(conv1d.conv2(conv1d.act(conv1d.conv1(x.transpose(1, 2))))).transpose(1, 2)
        assert torch.equal(conv1d(x), plain1)
