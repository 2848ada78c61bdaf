"""The fast training step keeps the numbers: each speed change against the plain computation on
the same weights (outputs and gradients), and old checkpoints still load (benchmarks/README.md,
"Training step: changes")."""

from __future__ import annotations

import copy
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
def test_training_step_with_the_fast_path_equals_the_plain_path(monkeypatch, bf16):
    """``fastpath.tune_for_training`` (the CPU attention kernel: in-place score scaling and masking)
    and the model's in-place ReLU give the loss and every parameter gradient of the plain model
    (fused SDPA, out-of-place ReLU) on the same weights and batch (padded frames, causal decoder,
    CTC), in fp32 and under bf16 autocast. The plain model really is plain: its attention runs the
    fused kernel, and building it tuned nothing."""
    from speechformer import fastpath

    attention_module = sys.modules["speechformer.model.attention"]  # (the package exports a function of that name)
    torch.manual_seed(0)
    plain = SpeechTransformer(ModelConfig(**TINY)).train()
    fast = fastpath.tune_for_training(copy.deepcopy(plain))
    batch = (torch.randn(3, 50, 20), torch.tensor([50, 37, 22]), torch.randint(4, 40, (3, 5)), torch.tensor([5, 3, 4]))
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in fast.modules())
    written_out = []
    for m in fast.modules():
        if isinstance(m, MultiHeadAttention):
            assert m.kernel is fastpath.cpu_training_attention
            m.kernel = lambda *a: written_out.append(1) or fastpath.cpu_training_attention(*a)
    fast_loss, fast_grads = _loss_and_grads(fast, batch, bf16)
    assert written_out  # the fast side ran the CPU kernel
    sdpa_calls = []
    real_sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    for m in plain.modules():
        if isinstance(m, torch.nn.ReLU):
            monkeypatch.setattr(m, "inplace", False)
    plain_loss, plain_grads = _loss_and_grads(plain, batch, bf16)
    n_attention = sum(isinstance(m, MultiHeadAttention) for m in plain.modules())
    assert len(sdpa_calls) == n_attention  # every attention call of the plain model: the fused kernel
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast_loss, plain_loss, **tol)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)


def conv1d_convolution_module(m, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The Conformer's convolution module as written before the time-major layout: channels
    second, every convolution an ``nn.Conv1d`` call (the formula the layout must keep)."""
    y = F.glu(m.pointwise1(x.transpose(1, 2)), dim=1).masked_fill(pad[:, None, :], 0.0)
    y = m.depthwise(y)
    y = m.norm(y.transpose(1, 2)).transpose(1, 2) if isinstance(m.norm, torch.nn.LayerNorm) else m.norm(y)
    return m.pointwise2(m.act(y)).transpose(1, 2)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_conformer_convolution_module_time_major_and_its_cpu_kernel_equal_the_conv1d_formula(bf16, norm):
    """The convolution module on [B, T, D] frames (pointwise convolutions as linear layers on the
    Conv1d weights, the depthwise one channels-last) and, after ``tune_for_training``, its CPU
    depthwise kernel with its own backward, give the output and the input, weight and bias
    gradients of the Conv1d formula on [B, D, T], padded frames included; fp32 and bf16 autocast."""
    from speechformer import fastpath
    from speechformer.model import ConvolutionModule

    torch.manual_seed(0)
    module = ConvolutionModule(24, 7, norm=norm).train()
    x = torch.randn(3, 19, 24)
    pad = torch.arange(19)[None, :] >= torch.tensor([19, 12, 5])[:, None]
    # each tensor within a fraction of its own norm (bf16 rounding, amplified by BatchNorm's
    # training-mode statistics, puts a few elements of a gradient near zero off by 0.08)
    limit = 2e-2 if bf16 else 1e-5

    def run(forward):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = forward(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return [y.detach().float(), xi.grad] + [p.grad.clone() for p in module.parameters()]

    reference = run(lambda xi: conv1d_convolution_module(module, xi, pad))
    plain = run(lambda xi: module(xi, pad))
    assert fastpath.tune_for_training(module) is module
    assert module.depthwise_kernel is fastpath.cpu_training_depthwise_conv
    calls = []
    module.depthwise_kernel = lambda *a: calls.append(1) or fastpath.cpu_training_depthwise_conv(*a)
    tuned = run(lambda xi: module(xi, pad))
    assert calls
    names = ["output", "input"] + [name for name, _ in module.named_parameters()]
    for got in (plain, tuned):
        assert len(got) == len(reference) == len(names)
        for name, a, b in zip(names, got, reference):
            if norm == "batch" and name == "depthwise.bias":
                continue  # zero in exact arithmetic (BatchNorm takes away a per-channel shift): rounding noise on both
            assert a.shape == b.shape and float((a - b).norm() / b.norm()) < limit, name
    from speechformer.model.layers import depthwise_conv

    with torch.no_grad():  # without gradients the CPU kernel is the plain one
        w, b = module.depthwise.weight, module.depthwise.bias
        assert torch.equal(fastpath.cpu_training_depthwise_conv(x, w, b), depthwise_conv(x, w, b))


def test_tuning_swaps_only_kernels_keeps_the_state_dict_and_falls_back_where_it_does_not_pay():
    """``tune_for_training`` replaces each dropout module by a byte-mask dropout of the same p and
    gives each attention module the CPU kernel, in place, with the same state dict; the CPU kernel
    is the fused one without gradients (inference, validation) and with attention dropout."""
    from speechformer import fastpath

    torch.manual_seed(0)
    model = SpeechTransformer(ModelConfig(**(TINY | dict(dropout=0.1, activation_dropout=0.2))))
    drop_p = sorted(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fastpath.tune_for_training(model) is model
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert sorted(m.p for m in model.modules() if isinstance(m, fastpath.ByteMaskDropout)) == drop_p
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    with torch.no_grad():
        assert torch.equal(fastpath.cpu_training_attention(q, k, v, None, True), fastpath.fused_attention(q, k, v, None, True))
    torch.manual_seed(1)
    with_dropout = fastpath.cpu_training_attention(q, k, v, None, False, 0.5)
    torch.manual_seed(1)
    assert torch.equal(with_dropout, fastpath.fused_attention(q, k, v, None, False, 0.5))


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


def flushes_denormals() -> bool:
    """Whether this process reads subnormal floats as zero (``torch.set_flush_denormal`` has no getter)."""
    return float(torch.tensor([1e-40], dtype=torch.float32) * 1.0) == 0.0


@pytest.fixture
def denormals_kept():
    """Subnormal floats kept for the test; the process's setting restored afterwards."""
    before = flushes_denormals()
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(before)


_FAULTS = '''
import resource, sys, torch
from speechformer.fastpath import keep_freed_memory, tune_for_training
from speechformer.model import ModelConfig, SpeechTransformer
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = tune_for_training(SpeechTransformer(ModelConfig(
    vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=1, subsampling_channels=32,
    specaug_freq_masks=0, specaug_time_masks=0)).train())  # the stem's first output: 8 x 32 x 199 x 39 floats, 8 MB
feats, frames = torch.randn(8, 400, 80), torch.full((8,), 400)
tokens, token_lengths = torch.randint(4, 40, (8, 10)), torch.full((8,), 10)
def step():
    memory, lengths = model.encode_features(feats, frames)[:2]
    model.losses(memory, lengths, tokens, token_lengths)["loss"].backward()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # the heap settles in the first steps
    step()
before = faults()
for _ in range(4):
    step()
print((faults() - before) // 4)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (mallopt) is Linux's")
def test_keep_freed_memory_stops_the_page_faults_of_a_training_step():
    """A training step frees its large activations and allocates them again at the next step: by
    default glibc gives them back to the kernel, and the next step faults every page in again;
    after ``keep_freed_memory`` (what ``fit`` calls) the pages stay with the process."""
    import subprocess

    def faults_per_step(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 2_000  # measured 5,800-9,700 pages of 4 KiB a step (23-38 MB)
    assert kept < default / 10  # measured 0-330


_KERNELS = '''
import sys, torch
from speechformer.fastpath import keep_compiled_kernels
if sys.argv[1] == "keep":
    assert keep_compiled_kernels(4096)
torch.set_num_threads(1)
conv = torch.nn.Conv2d(4, 4, 3)
with torch.no_grad():
    for _ in range(2):
        print("=== pass", flush=True)
        for length in range(16, 16 + 1200):  # more shapes than oneDNN's default cache of 1,024 kernels
            conv(torch.zeros(2, 4, length, 8))
'''


def test_keep_compiled_kernels_compiles_each_shape_once():
    """oneDNN compiles a kernel per tensor shape; by default it keeps 1,024, so a run that sees
    more shapes (a training run's batches do) compiles them again on every pass; after
    ``keep_compiled_kernels`` (what ``fit`` calls) the second pass compiles nothing."""
    import os
    import subprocess

    def compiled(mode: str) -> tuple[int, int]:
        from speechformer.fastpath import ONEDNN_CACHE_VARIABLES

        env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_VARIABLES}
        env["ONEDNN_VERBOSE"] = "profile_create"  # a line for each kernel oneDNN creates
        out = subprocess.run([sys.executable, "-c", _KERNELS, mode], capture_output=True, text=True, check=True,
                             env=env).stdout
        first, second = out.split("=== pass")[1:]
        return first.count("create:cache_miss"), second.count("create:cache_miss")

    default, kept = compiled("default"), compiled("keep")
    if default[0] == 0:
        pytest.skip("this torch's convolutions do not run on oneDNN here")
    assert default[0] >= 1200 and default[1] >= 1200  # every shape compiled again on the second pass
    assert kept[0] == default[0] and kept[1] == 0


def test_hardware_tuning_is_switched_on_by_the_entry_points_not_by_building(untrained_model, denormals_kept,
                                                                            monkeypatch):
    """Building a model, a training module or a Transcriber changes nothing process-wide and tunes
    nothing of the model but what the Transcriber is told (``cpu_fast_path``: the decoder's linears
    prepacked); ``fit`` (``SpeechModule.on_fit_start``) and ``transcribe``/``evaluate``
    (``cli._load_transcriber``) switch the tuning on."""
    import argparse

    from speechformer import fastpath
    from speechformer.cli import _load_transcriber, build_parser
    from speechformer.lightning import SpeechModule
    from speechformer.transcribe import Transcriber

    module = SpeechModule(model=ModelConfig(**TINY), peak_tflops=1.0)
    bundle = load_model(untrained_model["model"])
    transcriber = Transcriber(bundle, bundle.default_options(cpu_fast_path=False))
    plain = [m for m in [*module.model.modules(), *transcriber.model.modules()]
             if isinstance(m, (fastpath.ByteMaskDropout, fastpath.PackedLinear))
             or (isinstance(m, MultiHeadAttention) and m.kernel is not fastpath.fused_attention)]
    assert not plain and not flushes_denormals()
    packed = Transcriber(load_model(untrained_model["model"]))  # the default: prepacked on CPU, if oneDNN is there
    assert any(isinstance(m, fastpath.PackedLinear) for m in packed.model.decoder_layers.modules()) \
        == fastpath.onednn_available()
    assert not any(isinstance(m, fastpath.PackedLinear) for m in packed.model.encoder_layers.modules())
    assert not flushes_denormals()

    class Trainer:  # what on_fit_start reads of a trainer
        precision, is_global_zero, checkpoint_callbacks = "32", True, []

    import speechformer.lightning

    kept = []
    monkeypatch.setattr(speechformer.lightning, "keep_freed_memory", lambda: kept.append("memory") or True)
    monkeypatch.setattr(speechformer.lightning, "keep_compiled_kernels", lambda: kept.append("kernels") or True)
    module.trainer = Trainer()
    module.on_fit_start()
    assert flushes_denormals() and kept == ["memory", "kernels"]
    assert all(m.kernel is fastpath.cpu_training_attention for m in module.model.modules()
               if isinstance(m, MultiHeadAttention))
    assert not any(isinstance(m, torch.nn.Dropout) for m in module.model.modules())

    torch.set_flush_denormal(False)
    args = build_parser().parse_args(["evaluate", "--model", str(untrained_model["model"]), "--manifest", "m.jsonl",
                                      "--out", "report"])
    assert isinstance(args, argparse.Namespace) and isinstance(_load_transcriber(args), Transcriber)
    assert flushes_denormals()


def test_the_training_optimiser_is_never_the_fused_adamw():
    """The fused AdamW stepped equal to rounding but trained worse models, with and without
    clipping (benchmarks/README.md, "Hardware tuning"): fit and lm train build the unfused one,
    whatever the trainer's clipping, with the no-decay group for biases, norms and embeddings."""
    from speechformer.lightning import adamw_warmup_cosine

    model = SpeechTransformer(ModelConfig(**TINY))
    opt = adamw_warmup_cosine(model.named_parameters(), 1e-3, 0.01, (0.9, 0.98), 10, 100, 0.1)["optimizer"]
    assert not opt.defaults.get("fused")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and any(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.embedding.weight for p in no_decay["params"])
