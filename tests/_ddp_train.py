"""Two-process DDP training on CPU (gloo), launched by tests/test_ddp.py.

    python tests/_ddp_train.py CORPUS_DIR TOKENIZER_DIR OUT_DIR

Lightning's DDP strategy starts the second process by running this script again with
its rank in the environment. Each rank writes ``OUT_DIR/rank{r}.pt``: the utterance ids of
every batch it trained on (per epoch) and its final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from speechformer.data import SpeechDataModule
from speechformer.lightning import SpeechModule
from speechformer.model import ModelConfig


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[tuple[int, list[str]]] = []
        self.sampler_epochs: list[int] = []  # the epoch the batch sampler was told, per batch
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.initial = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.batches.append((trainer.current_epoch, list(batch["ids"])))
        self.sampler_epochs.append(trainer.train_dataloader.batch_sampler.epoch)

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save({"batches": self.batches, "state": state, "initial": self.initial,
                    "sampler_epochs": self.sampler_epochs, "world_size": trainer.world_size},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(corpus: Path, tokenizer: Path, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    config = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                         subsampling_channels=8, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0)
    module = SpeechModule(model=config, tokenizer=str(tokenizer), lr=1e-3, warmup_steps=2, peak_tflops=1.0,
                          stats_utterances=8)
    data = SpeechDataModule(train_manifest=str(corpus / "train.jsonl"), valid_manifest=str(corpus / "valid.jsonl"),
                            tokenizer=str(tokenizer), max_batch_seconds=8.0, num_workers=0, seed=5)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(out),
                        callbacks=[Record(out)])
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
