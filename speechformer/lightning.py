"""The LightningModule: losses, optimiser and schedule, validation WER/CER, checkpoint contents.

Checkpoints carry, besides Lightning's own state, a ``"speechformer"`` entry of plain
types only (the model config as a dict, the tokenizer as plain data, the validation
scores), so one ``.ckpt`` maps waveforms to text and loads with
``torch.load(..., weights_only=True)``.

``init_from`` starts from an existing model (an imported Whisper folder, an exported
model or a checkpoint) instead of random weights: that is fine-tuning.

Checkpoints also carry the random generators' state, so a killed run resumes drawing exactly
what it would have drawn (docs/reliability.md, "Exact resume"). And since every ``speechformer
fit`` goes through here: :func:`quiet_lightning_notices` silences the notices of Lightning that
are not about the user's run, and Lightning's default progress bar and model summary get two
wrong figures removed (``Epoch 4/-2``, ``Total FLOPs: 0``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

from .checkpoint import random_state, remove_orphan_temp_files, set_random_state
from .decoding import DecodeOptions, decode
from .fastpath import flush_denormals, keep_compiled_kernels, keep_freed_memory, tune_for_training
from .flops import measure_peak_tflops, training_flops
from .frontend import WHISPER_WINDOW_SECONDS, feature_sums
from .metrics import score
from .model import ModelConfig, SpeechTransformer
from .options import TranscribeOptions, set_fields
from .text import normalize_text
from .tokenizer import load_tokenizer


#: Notices every ``speechformer fit`` printed that say nothing about the user's run: (warning
#: message, category) pairs. LightningCLI's "args and sys.argv" (``speechformer`` passes its own
#: arguments on), the deprecation inside Lightning's own ``_pytree`` (with newer torch), the
#: "tensorboardX has been removed" note of the default logger.
_NOISE_WARNINGS = (
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency", UserWarning),
)
#: ...and Lightning's advertisements for its cloud services, logged (not warned) at every fit
_NOISE_LOG_PREFIXES = ("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud",)
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                           "lightning_utilities.core.rank_zero")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE_LOG_PREFIXES)


def quiet_lightning_notices() -> None:
    """Silence exactly the notices listed above (by message and category), nothing else."""
    for message, category in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _not_noise not in logger.filters:
            logger.addFilter(_not_noise)


class _ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without ``Epoch 4/-2`` when training by ``max_steps``
    (``max_epochs`` is then -1, and it printed ``max_epochs - 1``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return description


class _ModelSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column and total: Lightning counts FLOPs only
    for a module with an ``example_input_array`` (which depends on the audio length; ours has
    none), so it printed ``Total FLOPs: 0``. The training log has the measured ``tflops``/``mfu``."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        print("\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))


def _fix_lightning_displays(trainer: L.Trainer) -> None:
    """Give Lightning's own default progress bar and model summary (exactly those classes, with
    their settings: a user's subclass is left alone) the corrected displays above."""
    for callback in getattr(trainer, "callbacks", ()):  # a stand-in trainer may have none
        if type(callback) is RichProgressBar:
            callback.__class__ = _ProgressBar
        elif type(callback) in (ModelSummary, RichModelSummary):
            callback.__class__ = _ModelSummary


def _refuse_resume_of_separate_projections(checkpoint: dict[str, Any]) -> None:
    """A training checkpoint from before the attention projections were fused holds the optimiser's
    moments per ``query``/``key``/``value`` tensor, which Lightning would pair with the wrong
    parameters. Its weights convert (``model.init_from``); its optimiser state does not: say so
    instead of resuming wrongly or with a traceback."""
    if not checkpoint.get("optimizer_states"):
        return
    old = next((k for k in checkpoint.get("state_dict", {}) if k.endswith(("attn.key.weight", "attn.value.weight"))),
               None)  # the fused layout has attn.qkv (self) and attn.query + attn.kv (cross) only
    if old is not None:
        raise ValueError("the checkpoint was written by a speechformer before the fused attention projections "
                         f"(it holds {old}): its optimiser state cannot be resumed; finish the run with the version "
                         "that wrote it, or start a new run from its weights with --model.init_from CKPT")


def adamw_warmup_cosine(named_parameters: Any, lr: float, weight_decay: float, betas: tuple[float, float],
                        warmup_steps: int, total_steps: int, min_lr_ratio: float) -> dict[str, Any]:
    """AdamW (no weight decay on biases, norms and embeddings) with a linear warmup, then a
    cosine decay to ``min_lr_ratio`` of the peak: what ``configure_optimizers`` returns, for the
    acoustic model and the language model alike."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    # Not fused (torch's default for the device: per-tensor on CPU, foreach on CUDA). The fused
    # AdamW steps equal these to rounding, step for step, yet every model trained with it ended
    # worse: after 3 epochs of the synthetic recipe 41.7 and 47.8% greedy valid WER against 31.2
    # and 33.4% (two seeds, no clipping), and with clipping three full runs at 14-15% against
    # 4-6% (benchmarks/README.md, "Hardware tuning"). Not understood; until it is, never fused.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    warmup = min(warmup_steps, max(1, total_steps // 2))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _decoding_key(field: str) -> str:
    """A decoding option as the training config names it."""
    return f"model.decoding.{field}"


class SpeechModule(L.LightningModule):
    """Trains a :class:`SpeechTransformer` with label-smoothed CE + weighted CTC."""

    def __init__(self, model: ModelConfig | None = None, tokenizer: str = "", lr: float = 1e-3,
                 weight_decay: float = 0.01, warmup_steps: int = 500, min_lr_ratio: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.98), stats_utterances: int = 500,
                 decoding: DecodeOptions | None = None, init_from: str = "", freeze_encoder: bool = False,
                 peak_tflops: float = 0.0, max_bad_steps: int = 20, compile: bool = False,
                 feature_stats: str = "") -> None:
        """``model`` sizes a new model; ``init_from`` (a model folder or checkpoint) starts
        from trained weights instead, and ``model`` is then ignored. ``freeze_encoder``
        trains only the decoder (the encoder runs without gradients). ``peak_tflops`` is the
        device's peak for the MFU in the training log (0: measured at the start of fit).
        A batch whose loss is NaN or infinite is skipped (weights and optimiser state untouched)
        and counted; ``max_bad_steps`` such batches in a row stop training with a checkpoint.
        ``compile`` runs each encoder/decoder layer through ``torch.compile`` (worth it on GPUs;
        on this 2-core CPU it measured no faster, see benchmarks/README.md).
        ``feature_stats`` is a ``speechformer compute-stats`` JSON file: the global feature
        mean/variance are taken from it instead of from ``stats_utterances`` training utterances.
        ``decoding`` is how validation decodes for its WER (the config's ``model.decoding:``
        section, the fields of :class:`~speechformer.decoding.DecodeOptions`: ``beam_size``,
        ``decoder: joint`` with ``ctc_weight``, ``length_penalty`` ...), over the model's defaults."""
        super().__init__()
        for name, value in (("lr", lr), ("stats_utterances", stats_utterances)):
            if not value > 0:
                raise ValueError(f"model.{name} must be positive, got {value}")
        for name, value in (("weight_decay", weight_decay), ("warmup_steps", warmup_steps),
                            ("min_lr_ratio", min_lr_ratio), ("peak_tflops", peak_tflops)):
            if not value >= 0:
                raise ValueError(f"model.{name} must be at least 0, got {value}")
        if max_bad_steps < 1:
            raise ValueError(f"model.max_bad_steps must be at least 1, got {max_bad_steps}")
        if decoding is not None:  # the values now; what the model can do once it is built
            TranscribeOptions(decoding).check(name=_decoding_key)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        if init_from:
            from .transcribe import load_model

            bundle = load_model(init_from)
            if self.tokenizer is None:
                self.tokenizer = bundle.tokenizer
            elif self.tokenizer.payload() != bundle.tokenizer.payload():
                raise ValueError(f"model.init_from {init_from} was trained with another tokenizer than "
                                 f"{tokenizer}; point data.tokenizer at {init_from}")
            config = bundle.model.config
            self.model = bundle.model.train()
        else:
            config = model or ModelConfig()
            if self.tokenizer is not None:
                config.vocab_size = self.tokenizer.vocab_size
                config.bos_id, config.eos_id = self.tokenizer.bos_id, self.tokenizer.eos_id
                if self.tokenizer.blank_id is not None:
                    config.blank_id = self.tokenizer.blank_id
            self.model = SpeechTransformer(config)
        self.config = config
        self.freeze_encoder = freeze_encoder
        if compile:
            self.model.compile_layers()
        self.peak_tflops = peak_tflops
        self._step_start = 0.0
        if freeze_encoder:
            for p in self.model.encoder_parameters():
                p.requires_grad_(False)
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.min_lr_ratio, self.betas = min_lr_ratio, tuple(betas)
        self.stats_utterances = stats_utterances
        self.feature_stats = feature_stats
        self.decoding = self._validation_decoding(decoding)
        self.max_bad_steps = max_bad_steps
        self.skipped_batches = 0
        self._bad_in_a_row = 0
        self._drop_gradients = False
        self._resumed_random_state: dict[str, Any] | None = None  # applied at the first batch after a resume
        self.max_input_seconds = WHISPER_WINDOW_SECONDS if config.is_whisper else 0.0  # longer audio is chunked
        self._val_outputs: list[tuple[list[str], list[str], list[str]]] = []

    def _validation_decoding(self, decoding: DecodeOptions | None) -> DecodeOptions:
        """How validation decodes: the settings ``model.decoding`` gives over the model family's
        defaults (:meth:`~speechformer.transcribe.ModelBundle.default_options`, as transcribe
        uses them), checked now by the same rules, a refusal naming ``model.decoding.FIELD``."""
        from .transcribe import ModelBundle

        bundle = ModelBundle(self.model, self.tokenizer)
        options = bundle.default_options(**(set_fields(decoding) if decoding is not None else {}))
        options.check(bundle if self.tokenizer is not None else None, name=_decoding_key)
        return options.decode

    # ----------------------------------------------------------------- setup
    def on_fit_start(self) -> None:
        # the hardware tuning of training (speechformer/fastpath.py), switched on here, at fit:
        # subnormal floats read as zero, freed memory kept for the next step's tensors, oneDNN's
        # kernels kept for every batch shape, and on CPU the byte-mask dropout, written-out
        # attention and the depthwise convolution's own backward
        flush_denormals()
        keep_freed_memory()
        keep_compiled_kernels()
        tune_for_training(self.model)
        self._remove_orphan_checkpoint_writes()
        if self.peak_tflops <= 0:
            precision = str(self.trainer.precision) if self.trainer is not None else "32"
            dtype = "bfloat16" if "bf16" in precision else "float16" if "16" in precision else "float32"
            self.peak_tflops = measure_peak_tflops(self.device.type, dtype)
            print(f"speechformer: measured matmul peak {self.peak_tflops:.2f} TFLOP/s ({dtype}, "
                  f"{self.device.type}); MFU is logged against it (set model.peak_tflops to override)")

    def _remove_orphan_checkpoint_writes(self) -> None:
        """A run killed while writing a checkpoint leaves its temporary file (``.last.ckpt.*.tmp``)
        beside the checkpoints; remove those, before this run writes any."""
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        folders = {cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        for folder in sorted(folders):
            for path in remove_orphan_temp_files(folder):
                print(f"speechformer: removed {path}, an unfinished checkpoint write of an interrupted run")

    # ----------------------------------------------------------------- MFU
    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._resumed_random_state is not None:
            # here, not when the checkpoint is loaded: between the two, Lightning and on_fit_start
            # draw random numbers that the uninterrupted run drew before the checkpoint was written
            set_random_state(self._resumed_random_state, self.device)
            self._resumed_random_state = None
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Model FLOPs utilisation of the step, as nanoGPT logs it: FLOPs of forward and
        backward counted from the config and the padded batch shape, over the step's wall
        time, over the peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._step_start
        frontend = self.model.frontend
        frames = (frontend.n_frames if self.config.is_whisper
                  else batch["wav"].shape[1] // frontend.hop_length + 1)
        tokens = batch["tokens"].shape[1] + len(self.prompt or [0])
        flops = training_flops(self.config, batch["wav"].shape[0], frames, tokens)
        tflops = flops / max(seconds, 1e-9) / 1e12
        bs = len(batch["ids"])
        self.log("tflops", tflops, batch_size=bs)
        if self.peak_tflops > 0:
            self.log("mfu", tflops / self.peak_tflops, prog_bar=True, batch_size=bs)

    def setup(self, stage: str) -> None:
        """Before the first fit: global mean/variance of the training features."""
        if stage != "fit":
            return
        if self.trainer is not None:
            _fix_lightning_displays(self.trainer)
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is None or not hasattr(dm, "train_dataset"):
            raise RuntimeError("training needs a SpeechDataModule with a train manifest")
        train = dm.train_dataset()
        self.max_input_seconds = max(self.max_input_seconds, max(train.durations))
        if not self.model.frontend.has_stats:
            if self.feature_stats:
                from .prepare.stats import load_feature_stats

                load_feature_stats(self.feature_stats, self.model.frontend)
                print(f"speechformer: feature statistics from {self.feature_stats}")
            else:
                self.compute_feature_stats(train)

    @torch.no_grad()
    def compute_feature_stats(self, dataset: Any) -> None:
        frontend = self.model.frontend
        if getattr(dataset, "speed_perturb", None):  # statistics of the audio as recorded
            dataset = type(dataset)(dataset.utts, None, dataset.sample_rate)
        n = min(len(dataset), self.stats_utterances)
        step = max(1, len(dataset) // n)
        total, total_sq, count = feature_sums(frontend, (dataset[i]["wav"] for i in range(0, step * n, step)))
        frontend.set_stats(total.float(), total_sq.float(), count)
        print(f"speechformer: feature statistics from {n} utterances ({count} frames)")

    # ----------------------------------------------------------------- steps
    @property
    def prompt(self) -> list[int] | None:
        return self.tokenizer.prompt if self.tokenizer is not None else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.set_grad_enabled(not self.freeze_encoder):
            memory, mem_lengths = self.model.encode(batch["wav"], batch["wav_lengths"])
        out = self.model.losses(memory, mem_lengths, batch["tokens"], batch["token_lengths"], self.prompt)
        bs = len(batch["ids"])
        bad = not bool(torch.isfinite(out["loss"].detach()))
        if self.trainer is not None and self.trainer.world_size > 1:  # every rank skips together
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            return self._skip_batch(batch, out["loss"])
        self._bad_in_a_row = 0
        self.log("train_loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({f"train_{k}": v for k, v in out.items() if k != "loss"}, batch_size=bs)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        return out["loss"]

    def _skip_batch(self, batch: dict[str, Any], loss: torch.Tensor) -> torch.Tensor | None:
        """A NaN/inf loss: count it, say which utterances, leave the weights alone.

        One process returns ``None`` (Lightning then runs no backward and no update). Under
        DDP every rank must still run backward (its gradient all-reduce is collective), so
        the loss is returned and its gradients are dropped before the optimiser step.
        """
        self.skipped_batches += 1
        self._bad_in_a_row += 1
        self.log("skipped_batches", float(self.skipped_batches), batch_size=len(batch["ids"]))
        ids = batch["ids"]
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        rank_zero_warn(f"speechformer: step {self.global_step}: loss is {float(loss.detach())} on the batch of "
                       f"{shown}; batch skipped, weights unchanged ({self.skipped_batches} skipped so far)")
        if self._bad_in_a_row >= self.max_bad_steps:
            saved = self._save_rescue_checkpoint()
            raise FloatingPointError(
                f"{self._bad_in_a_row} batches in a row had a NaN/inf loss (last: {shown}); training stopped. "
                f"The weights from before the problem are in {saved}. Lower model.lr, raise warmup_steps or set "
                "trainer.gradient_clip_val, check those utterances with `speechformer data validate`, then resume "
                f"with --ckpt_path {saved}")
        if self.trainer is not None and self.trainer.world_size > 1:
            self._drop_gradients = True
            return loss
        return None

    def _save_rescue_checkpoint(self) -> str:
        """The current state: every bad step was skipped, so it is the state before the problem."""
        from pathlib import Path

        trainer = self.trainer
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        path = folder / "before-nonfinite.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        return str(path)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_gradients:  # a skipped batch under DDP: parameters without gradients are not updated
            self._drop_gradients = False
            for p in self.model.parameters():
                p.grad = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # one encoder pass serves both the losses and the decoding
        memory, mem_lengths = self.model.encode(batch["wav"], batch["wav_lengths"])
        out = self.model.losses(memory, mem_lengths, batch["tokens"], batch["token_lengths"], self.prompt)
        bs = len(batch["ids"])
        self.log("val_loss", out["loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val_accuracy", out["accuracy"], batch_size=bs, sync_dist=True)
        hyps = decode(self.model, memory, mem_lengths, self.decoding, self.tokenizer.rules())
        self._val_outputs.append((batch["ids"], batch["texts"], [self.tokenizer.decode(h.tokens) for h in hyps]))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        ids = [i for o in self._val_outputs for i in o[0]]
        refs = [r for o in self._val_outputs for r in o[1]]
        hyps = [h for o in self._val_outputs for h in o[2]]
        self._val_outputs.clear()
        report = score(ids, refs, hyps)
        n_chars = max(1, sum(len(normalize_text(r)) for r in refs))
        # errors and words summed over ranks so every rank logs the same corpus-level WER
        counts = torch.tensor([report.wer * report.num_ref_words, report.num_ref_words,
                               report.cer * n_chars, n_chars],
                              dtype=torch.float64, device=self.device)
        counts = self.all_gather(counts)
        if counts.dim() > 1:
            counts = counts.sum(0)
        self.log("val_wer", float(counts[0] / counts[1].clamp_min(1)), prog_bar=True, sync_dist=False)
        self.log("val_cer", float(counts[2] / counts[3].clamp_min(1)), sync_dist=False)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ----------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self.model.named_parameters(), self.lr, self.weight_decay, self.betas,
                                   self.warmup_steps, self._total_steps(), self.min_lr_ratio)

    def _total_steps(self) -> int:
        """Optimiser steps of the whole run, for the learning-rate schedule.

        Counted from our own sampler rather than ``trainer.estimated_stepping_batches``: that
        builds the training loader while the optimiser is configured, before a resumed run's
        loop state is restored, and Lightning then never hands the loader its saved place in
        the epoch (a mid-epoch resume would start the epoch over).
        """
        trainer = self.trainer
        if trainer is None:
            return 10_000
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_batches_per_epoch"):
            return max(1, int(trainer.estimated_stepping_batches))
        per_epoch = dm.train_batches_per_epoch()
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            per_epoch = min(per_epoch, limit)
        elif limit is not None:
            per_epoch = int(per_epoch * float(limit))
        per_epoch = math.ceil(per_epoch / max(1, trainer.accumulate_grad_batches))
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        return max(1, per_epoch * epochs)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metrics = self.trainer.callback_metrics if self.trainer is not None else {}
        checkpoint["speechformer"] = {
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.payload() if self.tokenizer is not None else None,
            "val_wer": float(metrics["val_wer"]) if "val_wer" in metrics else None,
            "val_loss": float(metrics["val_loss"]) if "val_loss" in metrics else None,
            "max_input_seconds": self.max_input_seconds,
            "skipped_batches": self.skipped_batches,
            # every generator training draws from, as they are after the step just taken, so a resumed
            # run draws the dropout and SpecAugment masks the uninterrupted run drew (the data order
            # is a function of data.seed and the epoch: see DurationBatchSampler)
            "random_state": {"global": random_state(self.device), "specaugment": self.model.specaug.random_state()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _refuse_resume_of_separate_projections(checkpoint)
        meta = checkpoint.get("speechformer", {})
        self.max_input_seconds = max(self.max_input_seconds, float(meta.get("max_input_seconds") or 0.0))
        self.skipped_batches = int(meta.get("skipped_batches") or 0)
        saved = meta.get("random_state")
        if saved is not None:
            self._resumed_random_state = saved["global"]
            self.model.specaug.set_random_state(saved["specaugment"])
