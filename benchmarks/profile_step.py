#!/usr/bin/env python3
"""Where one training step (forward + backward + AdamW) spends its time, by kind of work.

Shapes: the synthetic recipe's model (recipes/synthetic/conf/train.yaml: a Conformer, d 192, 6 enc /
3 dec, feed-forward halves 384, 80 ms frames from a 32-channel stem, CTC weight 0.5, vocab 256) on 30
utterances of 2.7 s; ``recipe-transformer``, its transformer (conf/transformer.yaml: FFN 768, 40 ms
frames, stem 64 channels) on the same batch; and the s2t-small shape of ``train_step.py`` (d 256,
12 / 6, FFN 2048, stem 128, vocab 5000, no CTC) on 8 x 10 s.
Features are precomputed (as in ``train_step.py``); ``--frontend`` also runs the recipe's
log-mel frontend on waveforms inside the step, as ``speechformer fit`` does.

Each aten op's *self* time (torch.profiler, CPU) is put into one category: matmuls, the
convolution stem, casts (``copy_`` under ``_to_copy``: autocast's fp32 <-> bf16), layout copies
(every other ``copy_``/``clone``/``cat``), attention softmax/masking, layer norm, losses (log-softmax,
NLL, CTC), the optimiser (everything under ``Optimizer.step``), other element-wise ops and
reductions. Time outside any aten op (the step's wall time less the ops' self time) is Python,
dispatch and the autograd engine; its share per module class is the self time of a
``record_function`` region opened around each module's forward.

    python benchmarks/profile_step.py [--shape recipe s2t-small] [--precision bf16 fp32] [--frontend]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table  # noqa: E402

SHAPES = {
    # the synthetic recipe (recipes/synthetic/conf/train.yaml) and a batch like its 80-second batches
    "recipe": dict(model=dict(vocab_size=256, d_model=192, n_heads=4, d_ff=384, n_encoder_layers=6,
                              n_decoder_layers=3, subsampling_channels=32, subsampling_layers=3, encoder="conformer",
                              encoder_positions="sinusoidal+rotary", encoder_input_scale=True,
                              conformer_final_norm=False, conv_kernel_size=15, conv_norm="layer", dropout=0.0,
                              ctc_weight=0.5, label_smoothing=0.1, specaug_freq_masks=0, specaug_time_masks=0),
                   batch=30, frames=270, tokens=16),
    # the recipe's transformer (recipes/synthetic/conf/transformer.yaml, the default before 2026-12-02)
    "recipe-transformer": dict(model=dict(vocab_size=256, d_model=192, n_heads=4, d_ff=768, n_encoder_layers=6,
                                          n_decoder_layers=3, subsampling_channels=64, dropout=0.0, ctc_weight=0.5,
                                          label_smoothing=0.1, specaug_freq_masks=0, specaug_time_masks=0),
                               batch=30, frames=270, tokens=16),
    # benchmarks/train_step.py (issue 4's s2t-small comparison with HF Speech2Text)
    "s2t-small": dict(model=dict(vocab_size=5000, d_model=256, n_heads=4, d_ff=2048, n_encoder_layers=12,
                                 n_decoder_layers=6, dropout=0.1, activation_dropout=0.0, subsampling_channels=128,
                                 ctc_head=False, ctc_weight=0.0, label_smoothing=0.0, specaug_freq_masks=0,
                                 specaug_time_masks=0),
                      batch=8, frames=1000, tokens=40),
}

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv",
          "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm"}
CONV = ("convolution", "conv2d", "conv1d", "conv_depthwise")
LAYOUT = {"aten::clone", "aten::contiguous", "aten::cat", "aten::_unsafe_view", "aten::reshape", "aten::transpose",
          "aten::permute", "aten::view", "aten::as_strided", "aten::t", "aten::expand", "aten::empty_like",
          "aten::empty", "aten::empty_strided", "aten::resize_", "aten::stack", "aten::split", "aten::chunk",
          "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::narrow", "aten::detach",
          "aten::alias", "aten::unbind", "aten::split_with_sizes", "aten::zeros", "aten::zeros_like",
          "aten::new_zeros", "aten::fill_", "aten::zero_", "aten::full", "aten::ones", "aten::new_empty",
          "aten::new_empty_strided", "aten::lift_fresh", "aten::index_select", "aten::constant_pad_nd",
          "aten::pad", "aten::masked_fill_"}
SOFTMAX = {"aten::_softmax", "aten::softmax", "aten::_softmax_backward_data", "aten::masked_fill",
           "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::tril", "aten::logical_not",
           "aten::bitwise_not"}
NORM = {"aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::layer_norm"}
LOSS = ("log_softmax", "nll_loss", "ctc_loss", "cross_entropy")


def category(name: str, ancestors: list[str]) -> str:
    """The kind of work of an op with this name, called from inside ``ancestors`` (outermost first)."""
    if any(a.startswith("Optimizer.step") or a == "optimizer" for a in ancestors):
        return "optimiser (AdamW)"
    if not name.startswith(("aten::", "mkldnn::")):
        return "Python / dispatch / autograd engine"
    if name in MATMUL:
        return "matmul (mm, addmm, bmm)"
    if any(c in name for c in CONV):
        return "convolution (stem)"
    if name in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::_copy_from"):
        return "casts (autocast fp32<->bf16)" if any(a in ("aten::_to_copy", "aten::to") for a in ancestors + [name]) \
            else "layout copies (copy_, clone, cat)"
    if name in LAYOUT:
        return "layout copies (copy_, clone, cat)"
    if any(k in name for k in LOSS):
        return "losses (log-softmax, NLL, CTC)"
    if name in SOFTMAX:
        return "attention softmax / mask / sdpa"
    if name in NORM:
        return "layer norm"
    if name in ("aten::relu", "aten::relu_", "aten::threshold_backward", "aten::gelu", "aten::gelu_backward",
                "aten::clamp_min", "aten::threshold"):
        return "activation (ReLU/GELU fwd+bwd)"
    return "other element-wise / reductions"


class ModuleRegions:
    """Opens a ``record_function`` region named after each module's class around its forward."""

    def __init__(self, model) -> None:
        import torch

        self.handles, self.stack = [], []
        for module in model.modules():
            label = f"module::{type(module).__name__}"

            def pre(_m, _args, label=label):
                region = torch.profiler.record_function(label)
                region.__enter__()
                self.stack.append(region)

            def post(_m, _args, _out):
                self.stack.pop().__exit__(None, None, None)

            self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def build(shape: str, seed: int = 0):
    import torch

    from speechformer.fastpath import tune_for_training
    from speechformer.model import ModelConfig, SpeechTransformer

    spec = SHAPES[shape]
    torch.manual_seed(seed)
    model = tune_for_training(SpeechTransformer(ModelConfig(**spec["model"])).train())  # as fit does
    b, frames, tokens = spec["batch"], spec["frames"], spec["tokens"]
    vocab = spec["model"]["vocab_size"]
    data = dict(feats=torch.randn(b, frames, 80), frames=torch.full((b,), frames),
                wav=torch.randn(b, (frames - 1) * 160) * 0.1, wav_lengths=torch.full((b,), (frames - 1) * 160),
                tokens=torch.randint(4, vocab, (b, tokens)), token_lengths=torch.full((b,), tokens))
    return model, data


def make_step(model, data: dict, precision: str, frontend: bool = False, optimizer=None):
    """One training step as a closure (the same step ``train_step.py`` times)."""
    import torch

    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            # [:2]: step_ab.py also times older revisions, whose encoders returned attention maps too
            if frontend:
                memory, lengths = model.encode(data["wav"], data["wav_lengths"])[:2]
            else:
                memory, lengths = model.encode_features(data["feats"], data["frames"])[:2]
            loss = model.losses(memory, lengths, data["tokens"], data["token_lengths"])["loss"]
        loss.backward()
        with torch.profiler.record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def profile(step, repeats: int) -> tuple[dict[str, float], dict[str, float], float, int]:
    """Per-step ms by category, Python self ms by module class, profiled wall ms per step, op calls."""
    import torch

    by_cat: dict[str, float] = defaultdict(float)
    by_module: dict[str, float] = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - start) / repeats * 1e3
    events = prof.events()
    calls = 0
    for ev in events:
        ancestors, parent = [], ev.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        ancestors.reverse()
        self_ms = ev.self_cpu_time_total / 1e3 / repeats
        if ev.name.startswith("module::"):
            by_module[ev.name[len("module::"):]] += self_ms
        elif ev.name.startswith("autograd::engine"):
            by_module["(backward: autograd engine)"] += self_ms
        if ev.name.startswith(("aten::", "mkldnn::")):
            calls += 1
        by_cat[category(ev.name, ancestors)] += self_ms
    accounted = sum(by_cat.values())
    by_cat["Python / dispatch / autograd engine"] += max(0.0, wall - accounted)  # outside any event
    return dict(by_cat), dict(by_module), wall, calls // repeats


def timed(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["recipe", "s2t-small"], choices=list(SHAPES))
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="profiled steps (and timed steps) per column")
    p.add_argument("--frontend", action="store_true", help="the recipe's log-mel frontend inside the step")
    p.add_argument("--modules", type=int, default=8, help="module classes listed in the overhead table")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: freed memory stays in the process (fastpath.keep_freed_memory, as fit does); "
                        "default: glibc's own behaviour")
    args = p.parse_args()

    import torch

    from speechformer.fastpath import flush_denormals, keep_freed_memory

    torch.set_num_threads(args.threads)
    flush_denormals()  # as fit and transcribe do (speechformer/fastpath.py)
    if args.malloc == "keep":
        keep_freed_memory()  # as fit does: process-wide, so for both sides of a comparison
    columns, cats, modules = [], {}, {}
    for shape in args.shape:
        for precision in args.precision:
            model, data = build(shape)
            step = make_step(model, data, precision, args.frontend)
            step()  # warm-up: allocator, kernel selection, optimiser state
            plain = timed(step, args.repeats)
            regions = ModuleRegions(model)
            by_cat, by_module, wall, calls = profile(step, args.repeats)
            regions.remove()
            name = f"{shape} {precision}"
            columns.append(name)
            cats[name] = (by_cat, wall, plain, calls)
            modules[name] = by_module
            model = None
    names = sorted({c for by_cat, *_ in cats.values() for c in by_cat},
                   key=lambda c: -max(cats[n][0].get(c, 0.0) / cats[n][1] for n in columns))
    rows = [[c] + [f"{100 * cats[n][0].get(c, 0.0) / cats[n][1]:.1f}% ({cats[n][0].get(c, 0.0):.0f} ms)"
                   for n in columns] for c in names]
    rows.append(["profiled step, ms"] + [f"{cats[n][1]:.0f}" for n in columns])
    rows.append(["unprofiled step (median), ms"] + [f"{cats[n][2]:.0f}" for n in columns])
    rows.append(["aten op calls per step"] + [str(cats[n][3]) for n in columns])
    print(f"{args.threads} threads, {args.repeats} profiled steps per column"
          f"{', frontend in the step' if args.frontend else ''}; share of the profiled step (ms per step)\n")
    print(markdown_table(["category"] + columns, rows))
    top = sorted({m for d in modules.values() for m in d}, key=lambda m: -max(d.get(m, 0.0) for d in modules.values()))
    rows = [[m] + [f"{modules[n].get(m, 0.0):.1f}" for n in columns] for m in top[:args.modules]]
    print("\nPython self time per module class (forward code outside aten ops), and the autograd engine, ms/step\n")
    print(markdown_table(["module"] + columns, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
