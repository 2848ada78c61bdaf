#!/usr/bin/env python3
"""Does the data loader keep up with the training step?

On the synthetic corpus (generated here, or ``--manifest``): the training DataLoader of
``SpeechDataModule`` alone (read + resample + tokenise + collate; features are computed inside
the model, batched, on the step's device) in audio-seconds per wall-second, with 0, 1 and 2
worker processes; the synthetic recipe's training step (forward + backward + AdamW, bf16
autocast) on the same batches; and a real training loop (loader + step) in which the time the
step waits for its next batch is measured. The loader starves the step when its throughput is
below the step's, i.e. when the wait is a large part of the loop.

    python benchmarks/loader.py [--quick] [--utterances 400] [--manifest M.jsonl] [--threads 2]

Target: loader throughput above the step's (ratio > 1) and the step's wait under 5% of the loop
with the recipe's loader setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, markdown_table, record  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="80 utterances (not recorded)")
    p.add_argument("--utterances", type=int, default=400)
    p.add_argument("--manifest", default=None)
    p.add_argument("--max-batch-seconds", type=float, default=80.0, help="the synthetic recipe's batch")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.utterances = 80

    import torch

    from speechformer.data import SpeechDataModule, read_manifest
    from speechformer.fastpath import flush_denormals, tune_for_training
    from speechformer.model import ModelConfig, SpeechTransformer
    from speechformer.tokenizer import train_tokenizer

    torch.set_num_threads(args.threads)
    flush_denormals()  # as fit and transcribe do (speechformer/fastpath.py)
    work = Path(tempfile.mkdtemp(prefix="sf_loader_"))
    if args.manifest:
        manifest = Path(args.manifest)
    else:
        sys.path.insert(0, str(ROOT / "data_prep"))
        import synthetic

        synthetic.generate_corpus(work, num_train=args.utterances, num_valid=2, num_test=2, seed=5, jobs=2)
        manifest = work / "train.jsonl"
    utts = read_manifest(manifest)
    hours = sum(u.duration for u in utts) / 3600
    train_tokenizer([u.text for u in utts], 128, work / "tok")

    def loader(workers: int):  # type: ignore[no-untyped-def]
        dm = SpeechDataModule(train_manifest=str(manifest), tokenizer=str(work / "tok"), num_workers=workers,
                              max_batch_seconds=args.max_batch_seconds, check_audio=False)
        return dm.train_dataloader()

    def audio_seconds(batch) -> float:  # type: ignore[no-untyped-def]
        return float(batch["wav_lengths"].sum()) / 16000

    # 1. the loader alone (after one untimed pass: files in the page cache, resampling kernels built)
    for _ in loader(0):
        pass
    loader_rate = {}
    for workers in (0, 1, 2):
        dl = loader(workers)
        start, seconds = time.perf_counter(), 0.0
        for batch in dl:
            seconds += audio_seconds(batch)
        loader_rate[workers] = seconds / (time.perf_counter() - start)
        del dl

    # 2. the step alone, on the same batches held in memory
    model = SpeechTransformer(ModelConfig(
        vocab_size=128, d_model=192, n_heads=4, d_ff=768, n_encoder_layers=6, n_decoder_layers=3,
        subsampling_channels=64, dropout=0.0, ctc_weight=0.5, specaug_freq_masks=0, specaug_time_masks=0)).train()
    tune_for_training(model)  # as fit does
    model.frontend.set_stats(torch.zeros(80), torch.ones(80), 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(batch) -> None:  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch["wav"], batch["wav_lengths"], batch["tokens"], batch["token_lengths"])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches = list(loader(0))
    step(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    step_rate = sum(map(audio_seconds, batches)) / (time.perf_counter() - start)

    # 3. the real loop: how long does the step wait for data?
    waits = {}
    for workers in (0, 1):
        it = iter(loader(workers))
        waited, total, start = 0.0, 0.0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waited += time.perf_counter() - t0
            step(batch)
        total = time.perf_counter() - start
        waits[workers] = (waited / total * 100, total)

    rows = [[f"loader, {w} worker(s)", loader_rate[w], loader_rate[w] / step_rate] for w in (0, 1, 2)]
    rows.append(["training step (recipe model, bf16)", step_rate, 1.0])
    body = (f"{manifest.name if args.manifest else 'synthetic corpus'}: {len(utts)} utterances, {hours:.2f} h, "
            f"batches of {args.max_batch_seconds:g} padded seconds, {args.threads} threads.\n\n"
            + markdown_table(["stage", "audio s / s", "x the step"], rows)
            + "\n\n" + markdown_table(["training loop", "waiting for data %", "epoch s"],
                                      [[f"num_workers={w}", waits[w][0], waits[w][1]] for w in (0, 1)])
            + "\n\n" + markdown_table(["ratio", "x", "target"], [
                ["loader (0 workers) / step throughput", loader_rate[0] / step_rate, "> 1"],
                ["step waiting for data, recipe setting (0 workers), %", waits[0][0], "< 5"]]))
    record("loader", body, args.quick)
    print(f"median batch: {statistics.median(audio_seconds(b) for b in batches):.1f} audio s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
