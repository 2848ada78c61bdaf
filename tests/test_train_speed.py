"""The fast training step keeps the numbers: each speed change against the plain computation on
the same weights (outputs and gradients), and old checkpoints still load (benchmarks/README.md,
"Training step: changes")."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from speechformer.model import ModelConfig, MultiHeadAttention, SpeechTransformer
from speechformer.transcribe import ModelBundle, export_model, load_model

TINY = dict(vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, n_mels=20,
            subsampling_channels=8, dropout=0.0, specaug_freq_masks=0, specaug_time_masks=0)


def separate_projections(state: dict[str, torch.Tensor], key_bias: bool = True) -> dict[str, torch.Tensor]:
    """A state dict in the layout written before the projections were fused: query/key/value."""
    old = {}
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".")
        module, _, proj = prefix.rpartition(".")
        if proj in ("qkv", "kv"):
            parts = ("query", "key", "value") if proj == "qkv" else ("key", "value")
            for part, chunk in zip(parts, value.chunk(len(parts))):
                if not (part == "key" and leaf == "bias" and not key_bias):
                    old[f"{module}.{part}.{leaf}"] = chunk.clone()
        else:
            old[name] = value
    return old


def reference_attention(x, source, w, mask=None):
    """Multi-head attention written out with three separate projections (the layout before fusion)."""
    h = 4
    q, k, v = (F.linear(t, w[f"{n}.weight"], w.get(f"{n}.bias")) for t, n in
               ((x, "query"), (source, "key"), (source, "value")))
    b, tq, d = q.shape

    def split(t):
        return t.view(b, -1, h, d // h).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-2, -1) / math.sqrt(d // h)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ split(v)
    return F.linear(y.transpose(1, 2).reshape(b, tq, d), w["out.weight"], w["out.bias"])


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("key_bias", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_fused_projections_equal_separate_ones_in_outputs_and_gradients(cross, key_bias, training):
    """An old-layout attention state dict loads into the fused module; outputs, input gradients and
    weight gradients equal three separate projections on the same weights (training: the CPU
    written-out path; inference: the fused kernel)."""
    torch.manual_seed(0)
    d = 32
    names = ["query", "key", "value", "out"]
    w = {f"{n}.weight": torch.randn(d, d) * 0.2 for n in names}
    w |= {f"{n}.bias": torch.randn(d) * 0.1 for n in names if key_bias or n != "key"}
    mha = MultiHeadAttention(d, 4, key_bias=key_bias, cross=cross).train(training)
    mha.load_state_dict(w)  # strict: every old key is converted, nothing is missing
    x = torch.randn(2, 5, d, requires_grad=True)
    source = torch.randn(2, 7, d, requires_grad=True) if cross else x
    mask = torch.ones(2, 1, 1, source.shape[1], dtype=torch.bool)
    mask[1, ..., 3:] = False
    y = mha(x, source=source if cross else None, mask=mask)
    ref_w = {k: v.clone().requires_grad_() for k, v in w.items()}
    ref = reference_attention(x, source, ref_w, mask)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    inputs = [x, source] if cross else [x]
    got = torch.autograd.grad(y, inputs + list(mha.parameters()), grad)
    want = torch.autograd.grad(ref, inputs + list(ref_w.values()), grad)
    for a, b in zip(got[:len(inputs)], want[:len(inputs)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grads = dict(zip([n for n, _ in mha.named_parameters()], got[len(inputs):]))
    ref_grads = dict(zip(ref_w, want[len(inputs):]))
    fused = "kv" if cross else "qkv"
    parts = ["key", "value"] if cross else ["query", "key", "value"]
    zeros = torch.zeros(d)
    torch.testing.assert_close(grads[f"{fused}.weight"], torch.cat([ref_grads[f"{p}.weight"] for p in parts]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[f"{fused}.bias"],  # no key bias: its rows get no gradient at all
                               torch.cat([ref_grads.get(f"{p}.bias", zeros) for p in parts]), atol=1e-5, rtol=1e-5)
    if cross:
        torch.testing.assert_close(grads["query.weight"], ref_grads["query.weight"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("whisper", [False, True])
def test_old_layout_state_dict_and_export_load_with_identical_outputs(tmp_path, whisper):
    """A model saved before the fusion (separate query/key/value, Whisper without key biases) loads
    from a state dict and from an exported model.safetensors, and computes exactly what the model
    it was saved from computes."""
    torch.manual_seed(0)
    if whisper:
        config = ModelConfig.whisper(n_mels=20, n_audio_ctx=30, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
                                     n_vocab=40, n_text_ctx=16, n_text_state=32, n_text_head=4, n_text_layer=2)
    else:
        config = ModelConfig(**TINY)
    model = SpeechTransformer(config).eval()
    old = separate_projections(model.state_dict(), key_bias=not whisper)
    assert any(k.endswith("attn.query.weight") for k in old) and not any(".qkv." in k for k in old)
    fresh = SpeechTransformer(config).eval()
    fresh.load_state_dict(old)  # strict
    feats, frames = torch.randn(2, 60, 20), torch.tensor([60, 41])
    tokens = torch.randint(4, 40, (2, 6))
    with torch.no_grad():
        memory, lengths = model.encode_features(feats, frames)
        want = model.decode(tokens, memory, model.memory_mask(lengths, memory.shape[1]))
        got_memory, _ = fresh.encode_features(feats, frames)
        got = fresh.decode(tokens, got_memory, fresh.memory_mask(lengths, memory.shape[1]))
    assert torch.equal(got_memory, memory) and torch.equal(got, want)
    # an exported model folder written by the old layout
    out = export_model(ModelBundle(model, None, 30.0, {}), tmp_path / "exported")
    save_file(separate_projections(load_file(str(out / "model.safetensors")), key_bias=not whisper),
              str(out / "model.safetensors"))
    assert "encoder_layers.0.attn.query.weight" in load_file(str(out / "model.safetensors"))
    loaded = load_model(out).model
    assert json.loads((out / "config.json").read_text())["model"]["d_model"] == 32
    with torch.no_grad():
        assert torch.equal(loaded.encode_features(feats, frames)[0], memory)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("assign", [False, True])
def test_no_key_bias_stays_zero_through_training_steps(cross, assign):
    """Whisper's keys have no bias: the fused bias's key rows get no gradient, so AdamW leaves them 0,
    also after a load that replaces the parameters (``assign=True``: exported models, fine-tuning)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, key_bias=False, cross=cross).train()
    mha.load_state_dict(MultiHeadAttention(32, 4, key_bias=False, cross=cross).state_dict(), assign=assign)
    opt = torch.optim.AdamW(mha.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(2, 6, 32)
        mha(x, source=x if cross else None).square().sum().backward()
        opt.step()
        opt.zero_grad()
    bias = mha.kv.bias if cross else mha.qkv.bias
    key = bias[:32] if cross else bias[32:64]
    assert not key.any() and bias.abs().sum() > 0


def _loss_and_grads(model: SpeechTransformer, batch: tuple, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    feats, frames, tokens, token_lengths = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        memory, lengths = model.encode_features(feats, frames)
        loss = model.losses(memory, lengths, tokens, token_lengths)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bf16", [False, True])
def test_training_step_equals_the_plain_path(monkeypatch, bf16):
    """The CPU training step (in-place score scaling and masking, in-place ReLU) gives the loss and
    every parameter gradient of the written-out formula with out-of-place ReLU, on the same weights
    and batch (padded frames, causal decoder, CTC), in fp32 and under bf16 autocast."""
    attention_module = sys.modules["speechformer.model.attention"]  # (the package exports a function of that name)
    torch.manual_seed(0)
    model = SpeechTransformer(ModelConfig(**TINY)).train()
    batch = (torch.randn(3, 50, 20), torch.tensor([50, 37, 22]), torch.randint(4, 40, (3, 5)), torch.tensor([5, 3, 4]))
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.modules())
    fast_loss, fast_grads = _loss_and_grads(model, batch, bf16)
    monkeypatch.setattr(attention_module, "attention_for_training",
                        lambda q, k, v, mask=None: attention_module.attention(q, k, v, mask)[0])
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            monkeypatch.setattr(m, "inplace", False)
    plain_loss, plain_grads = _loss_and_grads(model, batch, bf16)
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast_loss, plain_loss, **tol)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)


def test_resuming_a_checkpoint_with_separate_projections_is_refused_naming_init_from():
    """A training checkpoint written before the fusion has optimiser moments per query/key/value
    tensor: resuming it would pair them with the wrong parameters, so it is refused in words (its
    weights still start a new run: ``model.init_from``); a fused-layout checkpoint resumes."""
    from speechformer.lightning import SpeechModule

    model = SpeechTransformer(ModelConfig(**TINY))
    fused = {f"model.{k}": v for k, v in model.state_dict().items()}
    old = {f"model.{k}": v for k, v in separate_projections(model.state_dict()).items()}
    optimiser = [{"state": {}, "param_groups": []}]
    module = SpeechModule.__new__(SpeechModule)  # the check runs before anything of the module is used
    with pytest.raises(ValueError, match=r"before the fused attention projections.*--model\.init_from"):
        module.on_load_checkpoint({"state_dict": old, "optimizer_states": optimiser})
    from speechformer.lightning import _refuse_resume_of_separate_projections

    _refuse_resume_of_separate_projections({"state_dict": fused, "optimizer_states": optimiser})  # no error
    _refuse_resume_of_separate_projections({"state_dict": old})  # weights only (init_from, export): converted
