"""The ``speechformer`` command: every sub-command, and what a failure prints.

The parser's description is :data:`DESCRIPTION` (plain text: ``--help`` shows it as written).
Every failure ends as :mod:`speechformer.errors` says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import DEBUG_ENV, DEBUG_FLAG, Command, UserError, debug_requested, run_reporting

LIGHTNING_COMMANDS = ("fit", "validate", "test")

DESCRIPTION = f"""\
Speech to text with transformers: prepare a corpus, train a tokenizer and a model,
transcribe audio, score WER.

fit, validate and test are Lightning's own commands (LightningCLI): every Trainer flag
works (--trainer.devices, --trainer.precision, --trainer.max_epochs ...) and
--config conf/x.yaml sets them from a file; `speechformer fit --help` lists them all.
The other commands are listed below; `speechformer COMMAND --help` describes one.

A command that fails because of its input prints one line, "error: WHAT: reason;
what to do", and exits with status 2; --debug (or {DEBUG_ENV}=1) prints the
traceback too.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default shown as ``(default: X)``.

    The default is left out where the help already says it (a default computed at run time,
    such as "cuda if available") and where it means "not given" (None, False, empty).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == "" or default == [] \
            or default is argparse.SUPPRESS
        if "default" in text or unset or action.required or not (action.option_strings or action.nargs in ("?", "*")):
            return text
        return f"{text} (default: %(default)s)"


class HelpParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`HelpFormatter`; its sub-commands' parsers are too.

    ``options="transcribe"`` gives a sub-command the flags of that command's transcription
    options, made from :class:`~speechformer.options.TranscribeOptions` when the sub-command is
    parsed (reading the dataclasses imports torch, which ``speechformer --help`` and the other
    commands do without); ``options=add_flags`` (a function of the parser) adds other flags
    made from dataclasses, as late."""

    def __init__(self, *args, options: str | Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._options_of = options

    def add_late_flags(self) -> None:
        """Add the flags made from dataclasses (once): when this sub-command is parsed, or its help checked."""
        if callable(self._options_of):
            self._options_of(self)
        elif self._options_of is not None:
            from .options import add_option_flags, command_options

            add_option_flags(self, command_options(self._options_of))
        self._options_of = None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        self.add_late_flags()
        return super().parse_known_args(args, namespace)


def lightning_main(argv: Sequence[str]) -> None:
    from .lightning import SpeechModule, quiet_lightning_notices

    quiet_lightning_notices()  # before Lightning prints its notices
    from lightning.pytorch.cli import LightningCLI

    from .data import SpeechDataModule

    class SpeechCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
            parser.link_arguments("data.tokenizer", "model.tokenizer")

    SpeechCLI(
        SpeechModule, SpeechDataModule, args=list(argv),
        # checkpoints written atomically (a kill never leaves a corrupt last.ckpt), read weights_only
        trainer_defaults={"use_distributed_sampler": False,
                          "plugins": [{"class_path": "speechformer.checkpoint.AtomicCheckpointIO"}]},
        save_config_kwargs={"overwrite": True},
    )


# ---------------------------------------------------------------------------- commands
def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data import read_manifest
    from .tokenizer import train_tokenizer

    texts = [u.text for m in args.manifest for u in read_manifest(m)]
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"tokenizer: {tok.vocab_size} pieces from {len(texts)} transcripts -> {Path(args.out) / 'tokenizer.model'}")
    return 0


def _model_config_and_tokenizer(path: str):  # type: ignore[no-untyped-def]
    """The ModelConfig and tokenizer of a model folder or checkpoint, without building the model."""
    from .model import ModelConfig
    from .tokenizer import MODEL_FILE, WHISPER_FILE, load_tokenizer, tokenizer_from_payload
    from .transcribe import CONFIG_FILE, load_checkpoint

    p = Path(path)
    if p.is_dir():
        if not (p / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{p}: no {CONFIG_FILE}; export a model with `speechformer export`")
        config = ModelConfig.from_dict(json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))["model"])
        has_tokenizer = (p / MODEL_FILE).is_file() or (p / WHISPER_FILE).is_file()
        return config, load_tokenizer(p) if has_tokenizer else None
    meta = load_checkpoint(p).get("speechformer") or {}
    if "config" not in meta:
        raise ValueError(f"{p}: no speechformer metadata; was it written by `speechformer fit`?")
    payload = meta.get("tokenizer") or meta.get("tokenizer_model")
    return ModelConfig.from_dict(meta["config"]), tokenizer_from_payload(payload) if payload else None


def _training_config(path: str) -> tuple[dict, dict]:
    """The ``model`` and ``data`` sections of a ``speechformer fit`` YAML config."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    sections = []
    for name in ("model", "data"):
        section = cfg.get(name) or {} if isinstance(cfg, dict) else {}
        sections.append(section.get("init_args", section) if isinstance(section, dict) else {})
    return sections[0], sections[1]


def _validation_plan(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """What `data validate` checks against: (model config, tokenizer, [(manifest, is_train)], data options).

    ``--config`` reads a training config as `fit` would (model.model or model.init_from,
    data.tokenizer, data.max_duration, data.speed_perturb; with no manifests given, its train,
    valid and test manifests); ``--model`` and ``--tokenizer`` override its model and tokenizer.
    """
    from .model import ModelConfig
    from .tokenizer import load_tokenizer

    model_section, data = _training_config(args.config) if args.config else ({}, {})
    config = tokenizer = None
    if args.model or model_section.get("init_from"):
        config, tokenizer = _model_config_and_tokenizer(args.model or model_section["init_from"])
    elif args.config:
        config = ModelConfig.from_dict(model_section.get("model") or {})
    if args.tokenizer or (data.get("tokenizer") and not args.model):  # the one training uses: data.tokenizer
        tokenizer = load_tokenizer(args.tokenizer or data["tokenizer"])
    train = data.get("train_manifest") or ""
    manifests = args.manifests or [m for m in (train, data.get("valid_manifest"), data.get("test_manifest")) if m]
    if not manifests:
        raise ValueError("data validate: give one or more manifests (or --config with data.train_manifest)")

    def is_train(m: str) -> bool:
        return not args.config or bool(train) and Path(m).resolve() == Path(train).resolve()

    return config, tokenizer, [(m, is_train(m)) for m in manifests], data


def cmd_data_validate(args: argparse.Namespace) -> int:
    """Every problem of every manifest, one line each with its line number; exit 1 if any.

    Given the model (``--model``, ``--config``), also every utterance it cannot take (longer than
    its position tables, too short for CTC to carry the transcript); given the tokenizer
    (``--tokenizer``, ``--model``, ``--config``), also the characters it does not represent
    (listed with counts and lines; a warning, as in training: a few ``<unk>`` may be acceptable)."""
    from .data import (UtteranceLimits, apply_model_limits, format_lost_characters, format_problems,
                       lost_characters, max_duration_note, scan_manifest)

    config, tokenizer, manifests, data = _validation_plan(args)
    total = 0
    for manifest, train in manifests:
        utts, problems = scan_manifest(manifest, require_text=not args.no_text, check_audio=not args.no_audio)
        if config is not None:
            limits = UtteranceLimits(config, len(tokenizer.prompt) if tokenizer is not None else 1,
                                     (data.get("speed_perturb") or ()) if train else ())
            max_duration = float(data.get("max_duration") or 0) if train else 0.0
            utts, problems, too_long = apply_model_limits(utts, problems, manifest, limits, tokenizer, max_duration)
            if too_long:
                print(f"{manifest}: note: {max_duration_note(too_long, max_duration)}", file=sys.stderr)
        lost = lost_characters(utts, tokenizer) if tokenizer is not None and not args.no_text else {}
        if problems:
            print(format_problems(problems, limit=args.limit))
        if lost:
            print(format_lost_characters(manifest, lost))
        if problems:
            print(f"{manifest}: {len(problems)} problem(s) on {len({p.line for p in problems})} line(s); "
                  f"{len(utts)} good utterance(s)", file=sys.stderr)
        else:
            hours = sum(u.duration for u in utts) / 3600
            warned = f"; {len(lost)} character(s) the tokenizer does not represent (listed above)" if lost else ""
            print(f"{manifest}: OK, {len(utts)} utterances, {hours:.2f} h{warned}", file=sys.stderr)
        total += len(problems)
    return 1 if total else 0


def _checkpoint_score(path: Path) -> float | None:
    from .transcribe import load_checkpoint

    meta = load_checkpoint(path).get("speechformer", {})
    return meta.get("val_wer")


def cmd_average(args: argparse.Namespace) -> int:
    """Average the weights of the best N checkpoints (by validation WER)."""
    import torch

    from .atomic import atomic_write
    from .outputs import check_output_files
    from .transcribe import load_checkpoint

    paths = [Path(p) for p in args.checkpoints]
    if args.ckpt_dir:
        paths += [p for p in sorted(Path(args.ckpt_dir).glob("*.ckpt")) if p.name != "last.ckpt"
                  and not p.name.startswith("last")]
    check_output_files([args.out], paths, flag="--out", give="a new .ckpt path (outside --ckpt-dir)")
    if not paths:
        raise UserError(args.ckpt_dir or " ".join(args.checkpoints) or "average", "no checkpoints found",
                        "give .ckpt files, or --ckpt-dir with the checkpoints `speechformer fit` wrote")
    scored = [(s, p) for p in paths if (s := _checkpoint_score(p)) is not None]
    if len(scored) < len(paths):
        print(f"warning: {len(paths) - len(scored)} checkpoint(s) without a validation WER ignored", file=sys.stderr)
    chosen = [p for _, p in sorted(scored, key=lambda x: (x[0], str(x[1])))[:args.num]]
    if not chosen:
        raise UserError(args.ckpt_dir or " ".join(args.checkpoints), "no checkpoint has a validation WER to rank by",
                        "give checkpoints written by `speechformer fit` with a validation manifest")
    first = load_checkpoint(chosen[0])
    total = {k: v.double().clone() if v.is_floating_point() else v for k, v in first["state_dict"].items()}
    for p in chosen[1:]:
        state = load_checkpoint(p)["state_dict"]
        for k, v in state.items():
            if v.is_floating_point():
                total[k] += v.double()
    averaged = {k: (v / len(chosen)).to(first["state_dict"][k].dtype) if v.is_floating_point() else v
                for k, v in total.items()}
    meta = dict(first["speechformer"])
    meta["source"] = "average of " + ", ".join(p.name for p in chosen)
    out = {"state_dict": averaged, "speechformer": meta}
    atomic_write(args.out, lambda tmp: torch.save(out, tmp))
    print(f"average: {len(chosen)} checkpoint(s) -> {args.out}")
    for p in chosen:
        print(f"  {p}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .outputs import prepare_output_dir
    from .transcribe import export_model, load_model

    if args.quantize and args.format != "onnx":
        raise UserError(f"--quantize {args.quantize}", "quantises ONNX graphs only", "add --format onnx")
    if args.format == "onnx":
        _check_onnx_exporter()
    prepare_output_dir(args.out, [args.model], flag="--out")
    bundle = load_model(args.model)
    if args.format == "onnx":
        from .onnx_export import export_onnx

        out = export_onnx(bundle, args.out, quantize=args.quantize)
    else:
        out = export_model(bundle, args.out)
    print(f"export: {args.model} -> {out} ({args.format}, {bundle.model.num_parameters() / 1e6:.2f}M parameters)")
    return 0


def _check_onnx_exporter() -> None:
    """``--format onnx`` needs onnx and onnxscript (torch's exporter) and onnxruntime: one line if any is absent."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError("--format onnx", f"needs {', '.join(missing)}, not installed",
                        "pip install 'speechformer[onnx]'")


def cmd_import_whisper(args: argparse.Namespace) -> int:
    from .whisper import import_whisper
    from .transcribe import load_model

    out = import_whisper(args.src, args.out, tokenizer=args.tokenizer, language=args.language, task=args.task)
    bundle = load_model(out)
    c = bundle.model.config
    missing = ", no tokenizer: import again with --tokenizer tokenizer.json" if bundle.tokenizer is None else ""
    print(f"import-whisper: {args.src} -> {out} ({bundle.model.num_parameters() / 1e6:.1f}M parameters, "
          f"{c.n_encoder_layers}+{c.n_decoder_layers} layers, d_model {c.d_model}, {c.n_mels} mels, "
          f"vocab {c.vocab_size}{missing})")
    return 0


def _option_name(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Field -> the flag the user typed: ``--format srt`` asks for times as ``--timestamps`` does."""
    from .options import flag_name
    from .outputs import SUBTITLE_FORMATS

    def name(field: str) -> str:
        typed = getattr(args, "timestamps", False)
        if field == "timestamps" and getattr(args, "format", None) in SUBTITLE_FORMATS and not typed:
            return f"--format {args.format}"
        return flag_name(field)

    return name


def _requested_options(args: argparse.Namespace) -> dict:
    """The options the command line asks for, by field name (the flags typed; a subtitle format
    asks for times), refused now if any is out of range, before a model is loaded."""
    from .options import TranscribeOptions, given_options
    from .outputs import SUBTITLE_FORMATS

    given = given_options(args)
    if getattr(args, "format", None) in SUBTITLE_FORMATS:
        given["timestamps"] = True
    TranscribeOptions().replace(**given).check(name=_option_name(args))
    return given


def _load_transcriber(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The model and the options the flags ask for, checked against each other, as a Transcriber."""
    from .fastpath import flush_denormals
    from .onnx_runtime import OnnxTranscriber, is_onnx_folder
    from .transcribe import Transcriber, load_model

    flush_denormals()  # transcribe/evaluate's entry point: process-wide, so here and not in Transcriber
    given = _requested_options(args)
    if is_onnx_folder(args.model):  # encoder.onnx + decoder.onnx + config.json: the onnxruntime transcriber
        if args.device not in (None, "cpu"):
            raise UserError(f"--device {args.device}", "an ONNX model runs on the CPU here", "drop --device")
        return OnnxTranscriber(args.model, name=_option_name(args), **given)
    bundle = load_model(args.model)
    options = bundle.default_options(**given)
    options.check(bundle, name=_option_name(args))
    return Transcriber(bundle, options, args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu"))


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Inputs, then where their results go (both checked before the model loads), then the
    Transcriber: each result is written (and journalled) as it comes."""
    from .outputs import TranscriptWriter
    from .inputs import collect_inputs

    inputs = collect_inputs(args.inputs, args.manifest)
    writer = TranscriptWriter(inputs, args.format, args.output, args.output_dir, resume=args.resume,
                              flush_every=args.flush_every)
    if writer.todo:
        transcriber = _load_transcriber(args)
        for result in transcriber.transcribe_items(writer.todo, progress=not args.quiet and sys.stderr.isatty(),
                                                   window=writer.window):
            writer.add(result)
    return writer.finish()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import read_manifest
    from .metrics import format_summary, score, write_report
    from .outputs import prepare_output_dir
    from .inputs import utterance_items

    utts = read_manifest(args.manifest)
    prepare_output_dir(args.out, [args.manifest], flag="--out")
    transcriber = _load_transcriber(args)
    results = list(transcriber.transcribe_items(utterance_items(utts), progress=not args.quiet and sys.stderr.isatty()))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"error: {r.error} (scored as an empty hypothesis)", file=sys.stderr)
    report = score([u.id for u in utts], [u.text for u in utts], [r.text for r in results])
    paths = write_report(report, args.out)
    name = args.name or Path(args.manifest).stem
    print(format_summary(report, name=name))
    print(f"evaluate: report in {Path(args.out)} ({', '.join(p.name for p in paths.values())})")
    return 1 if failed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    """One utterance, inside the model: spectrogram, attention maps, next-token candidates."""
    try:
        from .explain import explain

        files = explain(args.model, args.audio, args.out, encoder_layer=args.encoder_layer, top_k=args.top_k,
                        device=args.device, **_requested_options(args))
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = json.loads(files["explain.json"].read_text(encoding="utf-8"))
    print(f"explain: {summary['transcript']!r} ({len(files)} files) -> {files['index.html']}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Training curves (loss, WER/CER, learning rate) from a run's CSV log; prints the best epoch."""
    try:
        from .plot import plot_run

        files, best = plot_run(args.exp_dir, args.out)
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(best)
    print(f"plot: {', '.join(str(p) for p in files.values())}")
    return 0


def add_inspection_commands(sub: argparse._SubParsersAction) -> None:
    """``explain`` and ``plot`` (need the ``plot`` extra: matplotlib)."""
    ex = sub.add_parser("explain", help="one utterance inside the model: spectrogram, attention maps, "
                        "next-token candidates, index.html", options="explain")
    ex.add_argument("--model", required=True, help="exported model directory or .ckpt (as transcribe)")
    ex.add_argument("audio", help="one audio file (one utterance)")
    ex.add_argument("--out", required=True, help="folder for the figures, arrays and index.html")
    ex.add_argument("--encoder-layer", type=int, default=-1,
                    help="encoder layer whose self-attention to draw (0-based; -1 is the last)")
    ex.add_argument("--top-k", type=int, default=5, help="next-token candidates per step")
    ex.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    ex.set_defaults(func=cmd_explain)

    pl = sub.add_parser("plot", help="training curves of a run (loss, WER/CER, learning rate) and its best epoch")
    pl.add_argument("exp_dir", help="experiment folder with logs/version_*/metrics.csv (CSVLogger), or a metrics.csv")
    pl.add_argument("--out", default=None, help="folder for the PNGs (default: EXP_DIR/plots)")
    pl.set_defaults(func=cmd_plot)


# ---------------------------------------------------------------------------- lm
def cmd_lm_train(args: argparse.Namespace) -> int:
    from .lm import LMConfig
    from .lm_train import LMTraining, train_lm
    from .outputs import prepare_output_dir

    prepare_output_dir(args.out, [args.text, args.tokenizer] + [args.valid_text] * bool(args.valid_text), flag="--out")
    config = LMConfig(**{n: getattr(args, n) for n in LM_MODEL_FLAGS})
    training = LMTraining(**{n: getattr(args, n) for n in LM_TRAINING_FLAGS},
                          progress=not args.quiet and sys.stderr.isatty())
    summary = train_lm(args.text, args.tokenizer, args.out, config, training, args.valid_text)
    ppl = summary["valid_perplexity"]
    print(f"lm train: {summary['train_sentences']} sentences, {summary['steps']} steps in "
          f"{summary['train_seconds']:.0f} s" + (f", valid perplexity {ppl:.3f}" if ppl is not None else "")
          + f" -> {args.out}")
    return 0


def cmd_lm_complete(args: argparse.Namespace) -> int:
    from .lm import complete, load_lm

    lm = load_lm(args.lm)
    tokens = complete(lm.model, lm.tokenizer.encode(args.prompt), args.max_pieces)
    print(lm.tokenizer.decode(tokens))
    return 0


def cmd_lm_perplexity(args: argparse.Namespace) -> int:
    from .lm import load_lm, perplexity
    from .lm_train import read_sentences

    lm = load_lm(args.lm)
    sentences = read_sentences(args.text, lm.tokenizer, lm.model.config.max_positions - 1)
    print(f"{args.text}: perplexity {perplexity(lm.model, sentences):.3f} per piece "
          f"({len(sentences)} sentences, {sentences.num_pieces() + len(sentences)} pieces with the ends)")
    return 0


#: ``lm train``'s flags, by field of :class:`~speechformer.lm.LMConfig` (the model's sizes) and of
#: :class:`~speechformer.lm_train.LMTraining` (the loop), with their helps; each flag's type and
#: default are the field's own (:func:`_lm_train_flags`), so they are written once.
LM_TRAINING_FLAGS = {
    "max_epochs": "passes over the text",
    "max_steps": "stop after this many steps instead (> 0)",
    "batch_size": "sentences per batch",
    "lr": "peak learning rate (AdamW, warmup then cosine)",
    "warmup_steps": "steps of linear warmup",
    "accelerator": "Lightning accelerator: auto, cpu, gpu",
    "precision": "Lightning precision: 32-true, bf16-mixed, ...",
    "seed": "random seed (weights, data order, dropout)",
}
LM_MODEL_FLAGS = {
    "d_model": "width of the layers",
    "n_heads": "attention heads",
    "d_ff": "feed-forward width",
    "n_layers": "decoder layers (causal self-attention + feed-forward)",
    "dropout": "dropout on embeddings and block outputs",
    "max_positions": "longest sentence in pieces, <s> included",
}


def _lm_train_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of :data:`LM_TRAINING_FLAGS` and :data:`LM_MODEL_FLAGS`, typed and defaulted by
    their dataclass fields (added when ``lm train`` is parsed: the dataclasses import torch)."""
    import dataclasses

    from .lm import LMConfig
    from .lm_train import LMTraining
    from .options import flag_name

    for cls, flags in ((LMTraining, LM_TRAINING_FLAGS), (LMConfig, LM_MODEL_FLAGS)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, text in flags.items():
            parser.add_argument(flag_name(name), type=type(defaults[name]), default=defaults[name], help=text)


def add_lm_commands(sub: argparse._SubParsersAction) -> None:
    """``lm train|complete|perplexity``: the language model (the decoder stack alone, speechformer/lm.py)."""
    lm = sub.add_parser("lm", help="a language model over a tokenizer's pieces: train, complete a prompt, "
                        "perplexity")
    lm_sub = lm.add_subparsers(dest="lm_command", required=True, metavar="COMMAND")
    t = lm_sub.add_parser("train", help="train a language model on text (one sentence a line) with Lightning",
                          options=_lm_train_flags)
    t.add_argument("--text", required=True, help="training text, one sentence a line (.txt or .txt.gz)")
    t.add_argument("--tokenizer", required=True, help="tokenizer folder (the acoustic model's, e.g. EXP/tokenizer)")
    t.add_argument("--out", required=True, help="LM folder to write (config.json, model.safetensors, "
                   "tokenizer.model)")
    t.add_argument("--valid-text", default=None, help="held-out text: its perplexity after every epoch")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_lm_train)
    c = lm_sub.add_parser("complete", help="continue a prompt with the likeliest piece, step by step (greedy)")
    c.add_argument("--lm", required=True, help="LM folder written by `speechformer lm train`")
    c.add_argument("prompt", help="the start of a sentence")
    c.add_argument("--max-pieces", type=int, default=50, help="pieces to add at most")
    c.set_defaults(func=cmd_lm_complete)
    p = lm_sub.add_parser("perplexity", help="perplexity per piece of a text (one sentence a line)")
    p.add_argument("--lm", required=True, help="LM folder written by `speechformer lm train`")
    p.add_argument("--text", required=True, help="text, one sentence a line (.txt or .txt.gz)")
    p.set_defaults(func=cmd_lm_perplexity)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import require_server_packages, serve_command

    require_server_packages()  # before the model loads: one line naming the extra
    return serve_command(args, lambda: _load_transcriber(args))


def add_serve_command(sub: argparse._SubParsersAction, decoding_flags) -> None:  # type: ignore[no-untyped-def]
    """``speechformer serve``: the transcription options of ``transcribe`` are the requests' defaults."""
    sv = sub.add_parser("serve", help="an OpenAI-compatible transcription server (POST /v1/audio/transcriptions) "
                        "batching across requests; needs the serve extra", options="transcribe")
    decoding_flags(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument("--max-batch-seconds", type=float, default=240.0,
                    help="audio seconds the worker gathers from waiting requests into one batch")
    sv.add_argument("--max-wait-ms", type=float, default=50.0,
                    help="how long the oldest waiting request may wait for requests still arriving (being "
                    "uploaded or decoded) to join its batch; with none arriving it does not wait")
    sv.add_argument("--batching", choices=("on", "off"), default="on",
                    help="off: one request at a time (no batching across requests), for comparison")
    sv.add_argument("--queue-size", type=int, default=256, help="requests waiting at most; more get 429")
    sv.add_argument("--timeout-s", type=float, default=600.0, help="a request not transcribed by then gets 504")
    sv.add_argument("--max-upload-mb", type=float, default=25.0, help="larger uploads get 413 (OpenAI's limit)")
    sv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: "
                    "$SPEECHFORMER_API_KEY; none: open); GET /health stays open")
    sv.add_argument("--save-dir", default=None, help="keep each uploaded file here (default: no audio is written "
                    "anywhere)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="uvicorn's log level")
    sv.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = HelpParser(prog="speechformer", description=DESCRIPTION)
    p.add_argument(DEBUG_FLAG, action="store_true",
                   help=f"on an error, print the traceback too (as {DEBUG_ENV}=1 does); accepted anywhere "
                        "on the command line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"Lightning {name} (see `speechformer {name} --help`)", add_help=False)

    tok = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    t = tok_sub.add_parser("train", help="train on the transcripts of one or more manifests")
    t.add_argument("--manifest", action="append", required=True, help="JSONL manifest (repeatable)")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="number of pieces, the 4 reserved ones included (e.g. 500 for 100 hours)")
    t.add_argument("--out", required=True, help="folder for tokenizer.model")
    t.set_defaults(func=cmd_tokenizer_train)

    d = sub.add_parser("data", help="check manifests")
    d_sub = d.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    v = d_sub.add_parser("validate", help="report every problem of a manifest with its line number "
                         "(exit status 1 when there is any)")
    v.add_argument("manifests", nargs="*", help="JSONL manifest(s) (default with --config: its train, valid and "
                   "test manifests)")
    v.add_argument("--config", help="a `speechformer fit` YAML config: check the utterances against its model "
                   "(position tables, CTC) and tokenizer, with its data.max_duration and data.speed_perturb for "
                   "the train manifest, as training will")
    v.add_argument("--model", help="a model folder or checkpoint: check the utterances against its limits and "
                   "tokenizer (overrides the config's)")
    v.add_argument("--tokenizer", help="tokenizer folder: list the transcripts' characters it does not "
                   "represent, with counts and line numbers (overrides the config's)")
    v.add_argument("--no-audio", action="store_true", help="do not open the audio files' headers")
    v.add_argument("--no-text", action="store_true", help="transcripts are optional (audio-only manifests)")
    v.add_argument("--limit", type=int, default=1000, help="print at most this many problems per manifest")
    v.set_defaults(func=cmd_data_validate)

    a = sub.add_parser("average", help="average the best N checkpoints by validation WER")
    a.add_argument("checkpoints", nargs="*", help="checkpoint files")
    a.add_argument("--ckpt-dir", help="folder of checkpoints (last.ckpt is skipped)")
    a.add_argument("--num", type=int, default=5, help="how many of the best checkpoints to average")
    a.add_argument("--out", required=True, help="checkpoint file to write (.ckpt)")
    a.set_defaults(func=cmd_average)

    e = sub.add_parser("export", help="write an inference directory (config.json, model.safetensors, tokenizer)")
    e.add_argument("--model", required=True, help="checkpoint (.ckpt), or a model folder (--format onnx)")
    e.add_argument("--out", required=True, help="model folder to write")
    e.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                   help="safetensors: the PyTorch inference folder; onnx: encoder.onnx + decoder.onnx for "
                   "onnxruntime (docs/deploy.md)")
    e.add_argument("--quantize", choices=("int8",), default=None,
                   help="with --format onnx: dynamic int8 quantisation of the matrix products")
    e.set_defaults(func=cmd_export)

    w = sub.add_parser("import-whisper", help="convert OpenAI Whisper weights (openai .pt, Hugging Face or "
                       "CTranslate2 folder) into a speechformer model folder")
    w.add_argument("src", help="openai-whisper .pt file, Hugging Face folder, or CTranslate2 folder")
    w.add_argument("--out", required=True, help="model folder to write")
    w.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one next to the weights)")
    w.add_argument("--language", default="en", help="multilingual models: language code")
    w.add_argument("--task", choices=("transcribe", "translate"), default="transcribe",
                   help="multilingual models: transcribe, or translate into English")
    w.set_defaults(func=cmd_import_whisper)

    def decoding_flags(sp: argparse.ArgumentParser) -> None:
        """What transcribe and evaluate take besides their options (made from TranscribeOptions)."""
        sp.add_argument("--model", required=True, help="exported model directory or .ckpt, or an ONNX folder "
                        "(`export --format onnx`: run by onnxruntime)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    tr = sub.add_parser("transcribe", help="transcribe audio files, folders and globs", options="transcribe")
    decoding_flags(tr)
    tr.add_argument("inputs", nargs="*", help="audio files, folders or glob patterns")
    tr.add_argument("--manifest", help="transcribe the utterances (or segments) of a JSONL manifest instead")
    tr.add_argument("--format", choices=("text", "tsv", "json", "srt", "vtt"), default="text",
                    help="srt/vtt: subtitles (implies --timestamps: cues from word times, or one per Whisper "
                         "segment; several files need --output-dir)")
    tr.add_argument("--output", default="-", help="output file (default: standard output)")
    tr.add_argument("--output-dir", help="also write one NAME.txt (NAME.srt / NAME.vtt) per transcribed file (or "
                         "manifest id) here")
    tr.add_argument("--resume", action="store_true",
                    help="after a kill: keep the transcripts already finished (journalled beside --output or in "
                         "--output-dir) and only transcribe the rest")
    tr.add_argument("--flush-every", type=int, default=64,
                    help="files decoded together before their transcripts are saved (a kill loses at most these)")
    tr.set_defaults(func=cmd_transcribe)

    add_serve_command(sub, decoding_flags)

    ev = sub.add_parser("evaluate", help="transcribe a manifest and score WER/CER with an error report",
                        options="evaluate")
    decoding_flags(ev)
    ev.add_argument("--manifest", required=True, help="JSONL manifest with the reference transcripts")
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--name", default=None, help="name of the set in the summary table (default: the "
                    "manifest's file name)")
    ev.set_defaults(func=cmd_evaluate)
    add_inspection_commands(sub)
    add_lm_commands(sub)

    from .prepare.cli import add_commands as add_prepare_commands  # prepare CORPUS, compute-stats

    add_prepare_commands(sub)
    return p


def _check_flags(args: argparse.Namespace) -> None:
    for flag in ("vocab_size", "num", "limit", "flush_every", "top_k", "max_epochs", "batch_size", "max_pieces"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')}", f"must be at least 1, got {value}",
                            "give a whole number of 1 or more")


def lightning_command(name: str) -> Command:
    """How fit/validate/test complete a message: bad settings come from flags or the config."""
    return Command(name, hint=f"fix the setting on the command line or in the --config file (`speechformer "
                   f"{name} --help` lists them)", manifest_hint="set data.skip_bad_lines: true to use the good lines")


def command_of(args: argparse.Namespace) -> Command:
    """``tokenizer train``, ``data validate``, ``prepare kaldi``: the command as typed."""
    parts = [args.command] + [getattr(args, k) for k in ("tokenizer_command", "data_command", "lm_command", "corpus")
                              if getattr(args, k, None)]
    return Command(" ".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``speechformer`` command; every failure ends as :mod:`speechformer.errors` says
    (one ``error:`` line for the user's mistakes, a traceback for speechformer's bugs)."""
    debug, argv = debug_requested(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return run_reporting(lambda: lightning_main(argv), debug, lightning_command(argv[0]))
    args = build_parser().parse_args(argv)
    return run_reporting(lambda: _run(args), debug, command_of(args))


def _run(args: argparse.Namespace) -> int:
    _check_flags(args)
    if getattr(args, "device", None):  # --device cuda on a machine without one: refused before any work
        from .transcribe import check_device

        check_device(args.device)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
