"""GPU measurements in one short run: training throughput and MFU (bf16, SDPA flash), the data
loader against the step, batched decoding throughput, and Lightning fit on the GPU.

    python benchmarks/gpu.py [--quick] [--out results.json]

Each section is independent (a failure is reported and the rest still run). Figures go to
stdout and, as JSON, to --out. benchmarks/gpu.sh wraps this for the device machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechformer.flops import training_flops  # noqa: E402
from speechformer.model import ModelConfig, SpeechTransformer  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0  # spec sheet, dense bf16 (no sparsity)
RESULTS: dict = {}
OUT_PATH = ""
DEVICE = "cuda"


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def section(name):
    def wrap(fn):
        def run(*a, **k):  # noqa: ANN202
            log(f"\n== {name} ==")
            t = time.perf_counter()
            try:
                RESULTS[name] = fn(*a, **k)
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"({name}: {time.perf_counter() - t:.1f} s)")
            if OUT_PATH:
                Path(OUT_PATH).write_text(json.dumps(RESULTS, indent=2))
        run.__wrapped__ = fn
        return run
    return wrap


def config_100m(vocab: int = 5000) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=640, n_heads=10, d_ff=2560, n_encoder_layers=12,
                       n_decoder_layers=6, subsampling_channels=640, dropout=0.1)


@section("matmul_peak")
def matmul_peak(quick: bool) -> dict:
    n = 8192 if DEVICE == "cuda" else 1024
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    dt = timed(lambda: a @ b, 3, 10)
    tflops = 2 * n ** 3 / dt / 1e12
    log(f"bf16 {n}^3 matmul: {tflops:.0f} TFLOP/s")
    return {"bf16_matmul_tflops": round(tflops, 1)}


@section("train_step")
def train_step(quick: bool, compile_model: bool = False) -> dict:
    out = {}
    cfg = config_100m()
    model = SpeechTransformer(cfg).to(DEVICE)
    model.frontend.set_stats(torch.zeros(80), torch.ones(80) * 100, 1)
    params = model.num_parameters()
    log(f"model: {params / 1e6:.1f}M parameters")
    batch, seconds, tokens = (64, 15.0, 60) if DEVICE == "cuda" else (2, 3.0, 10)
    samples = int(seconds * 16000)
    wav = torch.randn(batch, samples, device=DEVICE) * 0.1
    wl = torch.full((batch,), samples, device=DEVICE)
    tok = torch.randint(4, cfg.vocab_size, (batch, tokens), device=DEVICE)
    tl = torch.full((batch,), tokens, device=DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    frames = samples // 160 + 1
    flops = training_flops(cfg, batch, frames, tokens + 1)
    peak = RESULTS.get("matmul_peak", {}).get("bf16_matmul_tflops")

    def make_step(forward):
        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = forward(wav, wl, tok, tl)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    # built one after the other: `model.compile` (the training flag) compiles the layers in place
    variants = [("eager", lambda: make_step(model))]
    if compile_model:
        variants.append(("compiled_layers", lambda: make_step(model.compile_layers())))  # SpeechModule(compile=True)
    for name, build in variants:
        fn = build()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t0
        dt = timed(fn, 3, 5 if quick else 15)
        achieved = flops / dt / 1e12
        row = {"params_m": round(params / 1e6, 1), "batch": f"{batch} x {seconds:.0f} s, {tokens} tokens",
               "step_s": round(dt, 4), "first_step_s": round(first, 1),
               "audio_s_per_s": round(batch * seconds / dt), "model_tflops": round(achieved, 1),
               "mfu_vs_spec": round(achieved / H200_BF16_DENSE_TFLOPS, 3),
               "mfu_vs_measured_matmul": round(achieved / peak, 3) if peak else None,
               "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if DEVICE == "cuda" else None}
        log(f"{name}: {json.dumps(row)}")
        out[name] = row
    return out


@section("sdpa_backends")
def sdpa_backends(quick: bool) -> dict:
    """Which fused kernel attention gets, and what it costs, at encoder shape (B=64, T=375)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(64 if DEVICE == "cuda" else 2, 10, 375, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    res = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                def f():
                    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
                res[backend.name] = round(timed(f, 3, 10) * 1e3, 3)
        except Exception as err:  # noqa: BLE001
            res[backend.name] = f"unavailable: {str(err).splitlines()[0][:80]}"
    log(f"fwd+bwd ms: {res}")
    return res


def _make_corpus(folder: Path, n: int) -> tuple[Path, Path]:
    import random

    import numpy as np
    import soundfile as sf

    from speechformer.tokenizer import train_tokenizer
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    rows = []
    for i in range(n):
        dur = rng.uniform(2.0, 15.0)
        x = (np.random.default_rng(i).standard_normal(int(dur * 16000)) * 0.1).astype("float32")
        path = folder / f"u{i}.wav"
        sf.write(path, x, 16000)
        rows.append({"id": f"u{i}", "audio": path.name, "duration": round(len(x) / 16000, 3),
                     "text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer([r["text"] for r in rows], 128, folder / "tok")
    return manifest, folder / "tok"


@section("dataloader")
def dataloader(quick: bool, workdir: Path) -> dict:
    from speechformer.data import SpeechDataModule
    manifest, tok = _make_corpus(workdir, 256 if quick else 1024) if DEVICE == "cuda" else _make_corpus(workdir, 24)
    res = {}
    for workers in ((2, 8) if DEVICE == "cuda" else (0, 2)):
        dm = SpeechDataModule(train_manifest=str(manifest), tokenizer=str(tok), max_batch_seconds=960,
                              num_workers=workers)
        dl = dm.train_dataloader()
        t = time.perf_counter()
        seconds = 0.0
        n = 0
        for batch in dl:
            seconds += float(batch["wav_lengths"].sum()) / 16000
            n += 1
        dt = time.perf_counter() - t
        res[f"workers_{workers}"] = {"batches": n, "audio_s_per_s": round(seconds / dt)}
        log(f"workers={workers}: {n} batches, {seconds / dt:.0f} audio-s/s (incl. worker start)")
    step = RESULTS.get("train_step", {}).get("eager", {}).get("audio_s_per_s")
    if step:
        res["loader_over_step"] = round(list(res.values())[-1]["audio_s_per_s"] / step, 2)
        log(f"loader/step throughput ratio (8 workers): {res['loader_over_step']}")
    return res


@section("decoding")
def decoding(quick: bool) -> dict:
    from speechformer.decoding import DecodeOptions, decode
    cfg = config_100m()
    model = SpeechTransformer(cfg).to(DEVICE).eval()
    res = {}
    sizes = (1, 16, 64) if DEVICE == "cuda" else (1, 16)
    for batch in sizes:
        wav = torch.randn(batch, 10 * 16000, device=DEVICE) * 0.1
        wl = torch.full((batch,), 10 * 16000, device=DEVICE)
        for beam in (1, 5):
            opts = DecodeOptions(beam_size=beam, max_len=100 if DEVICE == "cuda" else 5)  # random weights: fixed length

            def f():
                with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
                    memory, lengths = model.encode(wav, wl)
                    return decode(model, memory, lengths, opts)
            hyps = f()
            dt = timed(f, 1, 2 if quick else 3)
            ntok = sum(len(h) + 1 for h in hyps)
            res[f"b{batch}_beam{beam}"] = {"s": round(dt, 3), "tokens_per_s": round(ntok / dt)}
            log(f"batch {batch} beam {beam}: {dt:.3f} s, {ntok / dt:.0f} tokens/s")
    for batch in sizes[1:]:
        g, b = res[f"b{batch}_beam1"]["s"], res[f"b{batch}_beam5"]["s"]
        res[f"beam5_over_greedy_b{batch}"] = round(b / g, 2)
    return res


@section("lightning_fit_gpu")
def lightning_fit(quick: bool, workdir: Path) -> dict:
    import lightning as L

    from speechformer.data import SpeechDataModule
    from speechformer.lightning import SpeechModule
    manifest = workdir / "train.jsonl"
    cfg = ModelConfig(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=4, n_decoder_layers=2)
    module = SpeechModule(model=cfg, tokenizer=str(workdir / "tok"), warmup_steps=10)
    dm = SpeechDataModule(train_manifest=str(manifest), valid_manifest=str(manifest), tokenizer=str(workdir / "tok"),
                          max_batch_seconds=300, num_workers=4)
    trainer = L.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=40 if DEVICE == "cuda" else 4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=2,
                        val_check_interval=20 if DEVICE == "cuda" else 2, use_distributed_sampler=False, default_root_dir=str(workdir))
    t = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log(f"fit 40 steps: {time.perf_counter() - t:.1f} s, metrics {metrics}")
    return {"seconds": round(time.perf_counter() - t, 1), "metrics": metrics}


@section("cpu_gpu_parity")
def parity(quick: bool) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, d_model=128, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2,
                      dropout=0.0)
    model = SpeechTransformer(cfg).eval()
    wav = torch.randn(3, 32000) * 0.1
    wl = torch.tensor([32000, 20000, 9000])
    tok = torch.randint(4, 100, (3, 12))
    with torch.no_grad():
        mem_c, ml = model.encode(wav, wl)
        log_c = model.decode(tok, mem_c, model.memory_mask(ml, mem_c.shape[1]))
        g = model.to(DEVICE)
        mem_g, mlg = g.encode(wav.to(DEVICE), wl.to(DEVICE))
        log_g = g.decode(tok.to(DEVICE), mem_g, g.memory_mask(mlg, mem_g.shape[1]))
    diff = float((log_g.cpu() - log_c).abs().max() / log_c.abs().max())
    log(f"fp32 logits CPU vs GPU max relative diff: {diff:.2e}")
    return {"max_rel_diff": diff}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="gpu_results.json")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd step (slow to build)")
    args = p.parse_args()
    global OUT_PATH
    OUT_PATH = args.out
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (--device cpu for a dry run of the code)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    RESULTS["machine"] = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none", "torch": torch.__version__,
                          "python": platform.python_version(), "cpus": os.cpu_count()}
    log(json.dumps(RESULTS["machine"]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parity(args.quick)
        matmul_peak(args.quick)
        train_step(args.quick)
        sdpa_backends(args.quick)
        decoding(args.quick)
        dataloader(args.quick, work)
        lightning_fit(args.quick, work)
        if args.compile:
            section("train_step_compiled")(train_step.__wrapped__)(args.quick, True)
        Path(args.out).write_text(json.dumps(RESULTS, indent=2))
    log(f"\nresults -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
