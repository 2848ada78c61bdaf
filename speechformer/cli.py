"""The ``speechformer`` command.

``fit``, ``validate`` and ``test`` are Lightning's own (LightningCLI): every Trainer flag
works (``--trainer.devices``, ``--trainer.precision``, ``--trainer.max_epochs``...), and
``--config conf/x.yaml`` sets them from a file. The rest are small argparse commands:
``tokenizer train``, ``average``, ``export``, ``import-whisper``, ``transcribe``, ``evaluate``.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def lightning_main(argv: Sequence[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from .data import SpeechDataModule
    from .lightning import SpeechModule

    class SpeechCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
            parser.link_arguments("data.tokenizer", "model.tokenizer")

    SpeechCLI(
        SpeechModule, SpeechDataModule, args=list(argv),
        trainer_defaults={"use_distributed_sampler": False},
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


def _checkpoint_score(path: Path) -> float | None:
    from .transcribe import load_checkpoint

    meta = load_checkpoint(path).get("speechformer", {})
    return meta.get("val_wer")


def cmd_average(args: argparse.Namespace) -> int:
    """Average the weights of the best N checkpoints (by validation WER)."""
    import torch

    from .transcribe import load_checkpoint

    paths = [Path(p) for p in args.checkpoints]
    if args.ckpt_dir:
        paths += [p for p in sorted(Path(args.ckpt_dir).glob("*.ckpt")) if p.name != "last.ckpt"
                  and not p.name.startswith("last")]
    if not paths:
        print(f"error: no checkpoints found in {args.ckpt_dir or args.checkpoints}", file=sys.stderr)
        return 2
    scored = [(s, p) for p in paths if (s := _checkpoint_score(p)) is not None]
    if len(scored) < len(paths):
        print(f"warning: {len(paths) - len(scored)} checkpoint(s) without a validation WER ignored", file=sys.stderr)
    chosen = [p for _, p in sorted(scored, key=lambda x: (x[0], str(x[1])))[:args.num]]
    if not chosen:
        print("error: no checkpoint has a validation WER to rank by", file=sys.stderr)
        return 2
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(args.out) + ".tmp")
    torch.save(out, tmp)
    tmp.replace(args.out)
    print(f"average: {len(chosen)} checkpoint(s) -> {args.out}")
    for p in chosen:
        print(f"  {p}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .transcribe import export_model, load_model

    bundle = load_model(args.model)
    out = export_model(bundle, args.out)
    print(f"export: {args.model} -> {out} ({bundle.model.num_parameters() / 1e6:.2f}M parameters)")
    return 0


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


def _load_transcriber(args: argparse.Namespace, **kwargs):  # type: ignore[no-untyped-def]
    from .tokenizer import WhisperTokenizer
    from .transcribe import Transcriber, load_model

    bundle = load_model(args.model)
    if args.language or args.task:
        if not isinstance(bundle.tokenizer, WhisperTokenizer):
            raise ValueError("--language/--task apply to Whisper models only")
        data = bundle.tokenizer.payload() | {k: v for k, v in (("language", args.language), ("task", args.task)) if v}
        bundle.tokenizer = WhisperTokenizer.from_payload(data)
    if args.ctc_weight is not None and args.decoder != "joint":
        raise ValueError(f"--ctc-weight applies to --decoder joint (got --decoder {args.decoder})")
    return Transcriber(bundle, device=args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu"),
                       beam_size=args.beam_size, batch_seconds=args.batch_seconds, precision=args.precision,
                       decoder=args.decoder, ctc_weight=0.3 if args.ctc_weight is None else args.ctc_weight, **kwargs)


def _expand_inputs(items: Sequence[str]) -> list[Path]:
    from .audio import expand_audio_paths

    return expand_audio_paths(items)


SUBTITLE_FORMATS = ("srt", "vtt")


def _subtitles(result, fmt: str) -> str:  # type: ignore[no-untyped-def]
    from .timestamps import format_srt, format_vtt, words_to_cues

    cues = words_to_cues(result.words or [], duration=result.duration)
    return format_srt(cues) if fmt == "srt" else format_vtt(cues)


def _format_results(results: list, fmt: str) -> str:
    if fmt in SUBTITLE_FORMATS:  # one file (several need --output-dir: checked before transcribing)
        return "".join(_subtitles(r, fmt) for r in results if r.ok)
    if fmt == "json":
        rows = []
        for r in results:
            if not r.ok:
                rows.append({"path": str(r.path), "error": r.error})
                continue
            row = {"path": str(r.path), "text": r.text, "duration": round(r.duration, 3)}
            if r.words is not None:
                row["words"] = [w.to_dict() for w in r.words]
            rows.append(row)
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt == "tsv":
        lines = ["path\ttext"] + [f"{r.path}\t{r.text}" for r in results if r.ok]
        return "\n".join(lines) + "\n"
    return "".join(f"{r.text}\n" for r in results if r.ok)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from .transcribe import atomic_write_text

    try:
        paths = _expand_inputs(args.inputs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    subtitles = args.format in SUBTITLE_FORMATS
    if subtitles and len(paths) > 1 and not args.output_dir:
        print(f"error: --format {args.format} writes one subtitle file per audio file: give --output-dir for "
              f"{len(paths)} files (or transcribe one file)", file=sys.stderr)
        return 2
    transcriber = _load_transcriber(args, chunk_seconds=args.chunk_seconds,
                                    timestamps=args.timestamps or subtitles)
    failed = 0

    def report(result) -> None:  # type: ignore[no-untyped-def]
        nonlocal failed
        if not result.ok:
            failed += 1
            print(f"error: {result.error}", file=sys.stderr)

    results = transcriber.transcribe(paths, progress=not args.quiet and sys.stderr.isatty(), on_result=report)
    if not (subtitles and len(paths) > 1):
        text = _format_results(results, args.format)
        if args.output and args.output != "-":
            atomic_write_text(args.output, text)
        else:
            sys.stdout.write(text)
    if args.output_dir:
        out = Path(args.output_dir)
        for r in results:
            if r.ok:
                if subtitles:
                    atomic_write_text(out / f"{r.path.stem}.{args.format}", _subtitles(r, args.format))
                else:
                    atomic_write_text(out / (r.path.stem + ".txt"), r.text + "\n")
    if failed:
        print(f"transcribe: {len(results) - failed} of {len(results)} file(s) transcribed, {failed} failed",
              file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import read_manifest
    from .metrics import format_summary, score, write_report
    from .transcribe import AudioItem

    utts = read_manifest(args.manifest)
    transcriber = _load_transcriber(args)
    items = [AudioItem(u.id, u.audio, u.offset, u.duration if u.offset else None) for u in utts]
    results = list(transcriber.transcribe_items(items, progress=not args.quiet and sys.stderr.isatty()))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"error: {r.error} (scored as an empty hypothesis)", file=sys.stderr)
    report = score([u.id for u in utts], [u.text for u in utts], [r.text for r in results])
    paths = write_report(report, args.out)
    name = args.name or Path(args.manifest).stem
    print(format_summary(report, name=name))
    print(f"evaluate: report in {Path(args.out)} ({', '.join(p.name for p in paths.values())})")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speechformer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"Lightning {name} (see `speechformer {name} --help`)", add_help=False)

    tok = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    t = tok_sub.add_parser("train", help="train on the transcripts of one or more manifests")
    t.add_argument("--manifest", action="append", required=True, help="JSONL manifest (repeatable)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="folder for tokenizer.model")
    t.set_defaults(func=cmd_tokenizer_train)

    a = sub.add_parser("average", help="average the best N checkpoints by validation WER")
    a.add_argument("checkpoints", nargs="*", help="checkpoint files")
    a.add_argument("--ckpt-dir", help="folder of checkpoints (last.ckpt is skipped)")
    a.add_argument("--num", type=int, default=5)
    a.add_argument("--out", required=True)
    a.set_defaults(func=cmd_average)

    e = sub.add_parser("export", help="write an inference directory (config.json, model.safetensors, tokenizer)")
    e.add_argument("--model", required=True, help="checkpoint (.ckpt)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)

    w = sub.add_parser("import-whisper", help="convert OpenAI Whisper weights (openai .pt, Hugging Face or "
                       "CTranslate2 folder) into a speechformer model folder")
    w.add_argument("src", help="openai-whisper .pt file, Hugging Face folder, or CTranslate2 folder")
    w.add_argument("--out", required=True, help="model folder to write")
    w.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one next to the weights)")
    w.add_argument("--language", default="en", help="multilingual models: language code (default en)")
    w.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    w.set_defaults(func=cmd_import_whisper)

    def decoding_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, help="exported model directory or .ckpt")
        sp.add_argument("--beam-size", type=int, default=1)
        sp.add_argument("--decoder", choices=("attention", "joint", "ctc"), default="attention",
                        help="attention: the decoder alone (greedy, or beam search with --beam-size); "
                             "joint: beam search scored by the decoder and CTC prefix scores (--ctc-weight); "
                             "ctc: the CTC head alone, greedy (fastest, no decoder pass)")
        sp.add_argument("--ctc-weight", type=float, default=None,
                        help="--decoder joint: weight of the CTC score, 0 (attention only) to 1 (CTC only); "
                             "default 0.3")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--batch-seconds", type=float, default=240.0, help="audio seconds per batch (padded)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: bfloat16 matmuls (CPUs with AMX/AVX512-BF16, GPUs); about 1.7x faster on "
                             "such a CPU, transcripts compared in benchmarks/README.md")
        sp.add_argument("--language", default=None, help="Whisper multilingual models: language code")
        sp.add_argument("--task", choices=("transcribe", "translate"), default=None, help="Whisper: task")

    tr = sub.add_parser("transcribe", help="transcribe audio files, folders and globs")
    decoding_flags(tr)
    tr.add_argument("inputs", nargs="+", help="audio files, folders or glob patterns")
    tr.add_argument("--format", choices=("text", "tsv", "json", "srt", "vtt"), default="text",
                    help="srt/vtt: subtitles from word timestamps (implies --timestamps; several files need "
                         "--output-dir)")
    tr.add_argument("--timestamps", action="store_true",
                    help="word start/end times from a CTC forced alignment (in --format json as \"words\"); "
                         "needs a model with a CTC head (not Whisper)")
    tr.add_argument("--output", default="-", help="output file (default: standard output)")
    tr.add_argument("--output-dir", help="also write one NAME.txt (NAME.srt / NAME.vtt) per transcribed file here")
    tr.add_argument("--chunk-seconds", type=float, default=None,
                    help="cut longer audio at quiet points (default: the longest training utterance)")
    tr.set_defaults(func=cmd_transcribe)

    ev = sub.add_parser("evaluate", help="transcribe a manifest and score WER/CER with an error report")
    decoding_flags(ev)
    ev.add_argument("--manifest", required=True)
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--name", default=None, help="name of the set in the summary table")
    ev.set_defaults(func=cmd_evaluate)
    return p


def _check_flags(args: argparse.Namespace) -> None:
    for flag in ("beam_size", "vocab_size", "num"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be at least 1, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        lightning_main(argv)
        return 0
    args = build_parser().parse_args(argv)
    _check_flags(args)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
