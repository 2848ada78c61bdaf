"""Regenerate the golden decoding files (run only on purpose: the golden test exists to notice
that decoding changed, so regenerating them after a change defeats it).

    # 1. the small model (once) and its test audio
    python tests/data/golden/make_golden.py model --corpus recipes/synthetic/data/synthetic
    python tests/data/golden/make_golden.py audio --corpus recipes/synthetic/data/synthetic
    # 2. the transcripts every decoder gives today (commit them with the code that made them)
    python tests/data/golden/make_golden.py record

``model`` trains a deliberately weak speechformer model (d_model 48, 2+2 layers, 64 BPE pieces)
that learns 16 training utterances of the synthetic corpus by heart (200 steps, a few minutes on
2 free CPU cores); ``audio`` copies two of those and four unseen test utterances as 16 kHz FLAC
files. On the unseen ones its transcripts are wrong in different ways, so greedy, beam, joint and
CTC decoding disagree and the golden file can tell them apart. ``record`` writes
``golden.json``: for every model and decoder, each file's token ids and text, decoded as one
batch by :func:`decode_all` (the same function the test calls).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODEL_DIR = HERE / "model"


def _absolute(line: str, corpus: Path) -> str:
    u = json.loads(line)
    return json.dumps({**u, "audio": str((corpus / u["audio"]).resolve())})


class _Progress:
    """Prints the step and loss now and then (the trainer's own bar is off)."""

    def __new__(cls):  # a Lightning callback, built lazily so the module imports without Lightning
        import lightning as L

        class Progress(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step % 25 == 0:
                    print(f"step {trainer.global_step} loss {float(outputs['loss']):.3f}", flush=True)

        return Progress()


def make_model(corpus: Path, steps: int, train_utterances: int) -> None:
    import lightning as L
    import torch

    from speechformer.data import SpeechDataModule, read_manifest
    from speechformer.lightning import SpeechModule
    from speechformer.model import ModelConfig
    from speechformer.tokenizer import train_tokenizer

    work = HERE / "_work"  # scratch, not committed
    work.mkdir(exist_ok=True)
    train = work / "train.jsonl"  # the corpus's first train_utterances (a weak model is the point)
    lines = (corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()[:train_utterances]
    train.write_text("".join(_absolute(line, corpus) + "\n" for line in lines), encoding="utf-8")
    utts = read_manifest(train)
    train_tokenizer([u.text for u in utts], 64, work / "tokenizer")
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(2)
    config = ModelConfig(d_model=48, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2,
                         subsampling_channels=16, dropout=0.0, ctc_weight=0.3, label_smoothing=0.0)
    module = SpeechModule(model=config, tokenizer=str(work / "tokenizer"), lr=3e-3, warmup_steps=20,
                          stats_utterances=16)
    data = SpeechDataModule(train_manifest=str(train), valid_manifest=str(train),
                            tokenizer=str(work / "tokenizer"), max_batch_seconds=60.0, num_workers=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=str(work), use_distributed_sampler=False, gradient_clip_val=5.0,
                        enable_checkpointing=True,
                        callbacks=[_Progress(), L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=str(work / "ckpt"), save_last=True, save_top_k=-1)])
    trainer.fit(module, datamodule=data)
    export(work / "ckpt" / "last.ckpt")


def export(ckpt: Path) -> None:
    from speechformer.transcribe import export_model, load_model

    export_model(load_model(ckpt), MODEL_DIR)


def copy_audio(corpus: Path, n_audio: int, n_train: int) -> None:
    """The first ``n_audio`` test utterances and the first ``n_train`` training utterances of the
    corpus (which the model has learnt by heart) as 16-bit FLAC files."""
    import soundfile as sf

    from speechformer.data import read_manifest

    audio = HERE / "audio"
    audio.mkdir(exist_ok=True)
    for u in read_manifest(corpus / "test.jsonl")[:n_audio] + read_manifest(corpus / "train.jsonl")[:n_train]:
        wav, rate = sf.read(u.audio, dtype="float32")
        assert rate == 16000, u.audio
        sf.write(audio / f"{u.id}.flac", wav, rate, subtype="PCM_16")
        print(u.id, u.text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="train the small model (a checkpoint per epoch) and export the last")
    m.add_argument("--corpus", type=Path, required=True, help="a synthetic corpus folder (train/valid/test.jsonl)")
    m.add_argument("--steps", type=int, default=200)
    m.add_argument("--train-utterances", type=int, default=16)
    e = sub.add_parser("export", help="export another checkpoint of the training as the model")
    e.add_argument("--ckpt", type=Path, required=True)
    a = sub.add_parser("audio", help="copy the corpus's first test utterances as FLAC")
    a.add_argument("--corpus", type=Path, required=True)
    a.add_argument("--n-audio", type=int, default=4)
    a.add_argument("--n-train", type=int, default=2)
    r = sub.add_parser("record", help="decode with today's code and write golden.json")
    r.add_argument("--family", choices=["speechformer", "whisper"], action="append",
                   help="only this model's entries (repeatable; default: both)")
    r.add_argument("--kathleen", type=Path, default=None,
                   help="Kathleen's folder, if not where the tests look (../shared/data/kathleen_arctic_a)")
    args = parser.parse_args()
    if args.cmd == "model":
        make_model(args.corpus, args.steps, args.train_utterances)
    elif args.cmd == "export":
        export(args.ckpt)
    elif args.cmd == "audio":
        copy_audio(args.corpus, args.n_audio, args.n_train)
    else:
        from test_decoding_golden import GOLDEN, KATHLEEN, record

        record(GOLDEN, tuple(args.family or ("speechformer", "whisper")), args.kathleen or KATHLEEN)


if __name__ == "__main__":
    main()
