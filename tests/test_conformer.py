"""The Conformer encoder and rotary positions: each part behaves as its idea says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speechformer.flops import forward_flops
from speechformer.model import (ConformerLayer, ModelConfig, MultiHeadAttention, RotaryEmbedding, SpeechTransformer,
                               capture_attention)


def conformer_config(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
                encoder="conformer", encoder_positions="rotary", conv_kernel_size=7)
    base.update(kw)
    return ModelConfig(**base)


def test_rotary_scores_depend_only_on_the_position_difference():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16), torch.randn(16)
    n = 40
    qs = rope(q.expand(n, 16).contiguous())  # the same query vector at positions 0..n-1
    ks = rope(k.expand(n, 16).contiguous())
    scores = qs @ ks.T  # scores[p, s]
    for shift in (1, 7, 25):
        torch.testing.assert_close(scores[shift:, shift:], scores[:n - shift, :n - shift], atol=1e-4, rtol=1e-4)
    # ... and they do depend on it (positions are seen), and the rotation keeps vector norms
    assert float((scores[0, :] - scores[0, 0]).abs().max()) > 1e-2
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(n), atol=1e-5, rtol=1e-5)
    # offset = a shifted window of the same positions
    torch.testing.assert_close(rope(q.expand(5, 16).contiguous(), offset=3), qs[3:8], atol=1e-6, rtol=1e-6)


def test_rotary_attention_fused_path_equals_written_out_formula_and_is_order_aware():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, rotary=True).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    with torch.inference_mode():
        fused = mha(x, mask=mask)
        with capture_attention([mha]):
            explicit = mha(x, mask=mask)
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
        perm = torch.randperm(9)
        permuted = mha(x[:, perm])
        plain = mha(x)
    assert not torch.allclose(plain[:, perm], permuted, atol=1e-3)  # positions are seen without an added table


def test_conformer_layer_is_a_macaron_of_half_feed_forwards():
    """With attention, convolution and the second feed-forward silenced, a block is
    LayerNorm(x + ½ FF1(LN(x))): the first feed-forward is a half step, then the final norm."""
    torch.manual_seed(0)
    layer = ConformerLayer(32, 4, 64, 0.0, 0.0, True, 1e-5, kernel_size=5).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        for lin in (layer.attn.out, layer.conv.pointwise2, layer.ff2.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        y = layer(x)
        expected = layer.out_norm(x + 0.5 * layer.ff1(layer.ff1_norm(x)))
        torch.testing.assert_close(y, expected)
        # the second feed-forward is a half step as well, after the convolution
        layer.ff2.fc2.weight.copy_(torch.randn_like(layer.ff2.fc2.weight) * 0.1)
        y2 = layer(x)
        h = x + 0.5 * layer.ff1(layer.ff1_norm(x))
        torch.testing.assert_close(y2, layer.out_norm(h + 0.5 * layer.ff2(layer.ff2_norm(h))))


def test_without_the_final_norm_a_block_is_a_pure_residual_update():
    """conformer_final_norm=False: the block only adds to its input (a pre-LN residual path runs
    through the whole stack), so with every sub-block silenced it is the identity."""
    torch.manual_seed(0)
    layer = ConformerLayer(32, 4, 64, 0.0, 0.0, True, 1e-5, kernel_size=5, final_norm=False).eval()
    assert not any(n.startswith("out_norm") for n, _ in layer.named_parameters())
    x = torch.randn(2, 8, 32) * 7.0
    with torch.no_grad():
        for lin in (layer.ff1.fc2, layer.attn.out, layer.conv.pointwise2, layer.ff2.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        y = layer(x)
    torch.testing.assert_close(y, x)  # with the final norm it would be LayerNorm(x), of size ~1
    model = SpeechTransformer(conformer_config(conformer_final_norm=False))
    assert all(isinstance(layer.out_norm, torch.nn.Identity) for layer in model.encoder_layers)


def test_convolution_module_sees_only_a_kernel_wide_neighbourhood():
    torch.manual_seed(0)
    layer = ConformerLayer(32, 4, 64, 0.0, 0.0, True, 1e-5, kernel_size=5).eval()
    with torch.no_grad():
        layer.attn.out.weight.zero_()
        layer.attn.out.bias.zero_()
        x = torch.randn(1, 20, 32)
        changed = x.clone()
        changed[0, 10] += torch.randn(32)  # (a constant shift would vanish in the LayerNorms)
        a = layer(x)
        b = layer(changed)
    moved = (a - b).abs().amax(-1)[0] > 1e-6
    assert moved.nonzero().flatten().tolist() == list(range(8, 13))  # frame 10 and 2 either side


@pytest.mark.parametrize("conv_norm", ["layer", "batch"])
def test_conformer_shapes_and_padding_does_not_change_an_utterance_encoding(conv_norm):
    torch.manual_seed(0)
    model = SpeechTransformer(conformer_config(conv_norm=conv_norm)).eval()
    if conv_norm == "batch":  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    wav = torch.randn(1, 8000)
    alone, la = model.encode(wav, torch.tensor([8000]))
    padded = torch.cat([wav, torch.zeros(1, 8000)], 1)
    batch = torch.cat([padded, torch.randn(1, 16000)], 0)
    together, lb = model.encode(batch, torch.tensor([8000, 16000]))
    n = int(la[0])
    assert alone.shape == (1, n, 32) and together.shape == (2, int(lb[1]), 32) and int(lb[0]) == n
    torch.testing.assert_close(together[0, :n], alone[0], atol=1e-4, rtol=1e-3)
    # without the padding mask the padded frames would leak in through the convolution
    layer = model.encoder_layers[0]
    x = torch.randn(2, 30, 32)
    x[0, 20:] = 5.0
    mask = (torch.arange(30)[None] < torch.tensor([20, 30])[:, None])[:, None, None]
    with torch.no_grad():
        masked = layer(x, mask)
        leaky = layer.conv(x, None)
        x[0, 20:] = -5.0
        masked2 = layer(x, mask)
        leaky2 = layer.conv(x, None)
    torch.testing.assert_close(masked[0, :20], masked2[0, :20], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[0, 15:20], leaky2[0, 15:20], atol=1e-3)


def test_conformer_trains_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = SpeechTransformer(conformer_config(ctc_weight=0.3))
    assert isinstance(m.encoder_layers[0], ConformerLayer)
    assert not any(n.startswith("encoder_positions") for n, _ in m.named_buffers())  # rotary: no table
    wav, wl = torch.randn(2, 8000), torch.tensor([8000, 7000])
    tokens, tl = torch.randint(4, 40, (2, 5)), torch.tensor([5, 3])
    out = m(wav, wl, tokens, tl)
    out["loss"].backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = float(out["loss"])
    for _ in range(30):
        opt.zero_grad()
        loss = m(wav, wl, tokens, tl)["loss"]
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_sinusoidal_plus_rotary_adds_the_table_and_rotates_the_lookups():
    """`sinusoidal+rotary`: rotary offsets inside self-attention, and absolute sinusoids added to
    the encoder's input, so the memory the decoder reads still says where each frame is."""
    both = SpeechTransformer(conformer_config(encoder_positions="sinusoidal+rotary"))
    rotary = SpeechTransformer(conformer_config())
    assert all(layer.attn.rotary is not None for layer in both.encoder_layers)
    assert all(layer.attn.rotary is not None for layer in rotary.encoder_layers)
    x = torch.zeros(1, 10, 32)
    assert torch.equal(rotary.encoder_positions(x), x)  # rotary alone adds nothing to the stream
    added = both.encoder_positions(x)[0]
    assert not torch.equal(added, x[0]) and len({tuple(r.tolist()) for r in added}) == 10  # one row per frame
    with pytest.raises(ValueError, match="encoder_positions"):
        conformer_config(encoder_positions="relative")


def test_encoder_input_scale_multiplies_the_audio_frames_by_sqrt_d_model():
    """ESPnet's xscale: the subsampled frames times sqrt(d_model), then the positions."""
    torch.manual_seed(0)
    plain = SpeechTransformer(conformer_config(encoder_positions="sinusoidal"))
    scaled = SpeechTransformer(conformer_config(encoder_positions="sinusoidal", encoder_input_scale=True))
    scaled.load_state_dict(plain.state_dict())
    seen, wav = {}, torch.randn(1, 8000)
    for name, model in (("plain", plain.eval()), ("scaled", scaled.eval())):
        model.encoder_positions.register_forward_hook(lambda mod, args, out, name=name: seen.update({name: args[0]}))
        with torch.no_grad():
            model.encode(wav, torch.tensor([8000]))
    torch.testing.assert_close(seen["scaled"], seen["plain"] * 32 ** 0.5)


def test_the_synthetic_conformer_config_scales_its_input():
    """The recipe's Conformer as measured: input scaled, no block-final LayerNorm."""
    import yaml
    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/synthetic/conf/train.yaml").read_text())
    model = conf["model"]["model"]
    assert model["encoder"] == "conformer" and model["encoder_input_scale"] is True
    assert model["conformer_final_norm"] is False  # with it the CTC loss stalled (README.md)
    assert model["encoder_positions"].endswith("rotary")


def test_conformer_config_is_checked_and_counted():
    with pytest.raises(ValueError, match="conv_kernel_size"):
        conformer_config(conv_kernel_size=4)
    with pytest.raises(ValueError, match="encoder must be"):
        conformer_config(encoder="lstm")
    transformer = conformer_config(encoder="transformer")
    assert forward_flops(conformer_config(), 1, 400, 10) > forward_flops(transformer, 1, 400, 10)
    # a config round-trips through its dict (checkpoints and config.json)
    assert ModelConfig.from_dict(conformer_config().to_dict()) == conformer_config()
