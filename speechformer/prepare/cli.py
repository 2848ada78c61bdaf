"""``speechformer prepare CORPUS ...`` and ``speechformer compute-stats``.

:func:`add_commands` hangs both on the main ``speechformer`` parser; the ``data_prep/``
scripts call :func:`main` with the corpus name first, so they and the installed command
are one code path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..cli import HelpParser, command_of
from ..errors import debug_requested, run_reporting
from . import PrepareError


def _splits(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def cmd_librispeech(args: argparse.Namespace) -> int:
    from .librispeech import MIRROR, download, prepare_librispeech

    subsets = _splits(args.subsets) if args.subsets else None
    if args.download:
        if not subsets:
            raise PrepareError("--download needs --subsets (e.g. train-clean-100,dev-clean,test-clean)")
        download(Path(args.root), subsets, args.mirror or MIRROR, check=not args.no_checksum)
    prepare_librispeech(args.root, args.out, subsets, jobs=args.jobs)
    return 0


def cmd_commonvoice(args: argparse.Namespace) -> int:
    from .commonvoice import prepare_commonvoice

    prepare_commonvoice(args.release, args.out, _splits(args.splits), jobs=args.jobs)
    return 0


def cmd_ljspeech(args: argparse.Namespace) -> int:
    from .ljspeech import prepare_ljspeech

    prepare_ljspeech(args.root, args.out, valid=args.valid, test=args.test, jobs=args.jobs)
    return 0


def cmd_kaldi(args: argparse.Namespace) -> int:
    from ..data import write_manifest
    from .kaldi import read_kaldi_dir

    utts = read_kaldi_dir(args.data_dir, args.audio_root, jobs=args.jobs)
    write_manifest(args.out, utts)
    segs = sum(1 for u in utts if u.offset)
    print(f"kaldi: {args.data_dir}: {len(utts)} utterances ({segs} with an offset), "
          f"{sum(u.duration for u in utts) / 3600:.2f} h -> {args.out}")
    return 0


def cmd_to_kaldi(args: argparse.Namespace) -> int:
    from ..data import read_manifest
    from .kaldi import write_kaldi_dir

    utts = read_manifest(args.manifest)
    out = write_kaldi_dir(utts, args.out)
    print(f"to-kaldi: {len(utts)} utterances -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def cmd_compute_stats(args: argparse.Namespace) -> int:
    from ..outputs import check_output_files
    from .stats import compute_stats, write_stats

    check_output_files([args.out], [args.manifest], flag="--out", give="a new .json path")
    stats = compute_stats(args.manifest, args.sample_rate, args.n_mels, args.max_utterances, args.jobs)
    out = write_stats(stats, args.out)
    print(f"compute-stats: {stats['utterances']} utterances, {stats['frames']} frames "
          f"({stats['seconds_of_audio'] / 3600:.2f} h) -> {out}; train with --model.feature_stats {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``prepare`` (with one sub-command per corpus) and ``compute-stats``."""
    prep = sub.add_parser("prepare", help="corpus on disk -> manifests (librispeech, commonvoice, ljspeech, "
                          "kaldi, to-kaldi)")
    corpora = prep.add_subparsers(dest="corpus", required=True, metavar="CORPUS")

    def jobs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--jobs", type=int, default=0, help="threads reading audio headers (default: 4 per core, "
                       "at most 16)")

    ls = corpora.add_parser("librispeech", help="LibriSpeech root -> OUT/SUBSET.jsonl per subset")
    ls.add_argument("root", help="folder holding LibriSpeech/ (or LibriSpeech/ itself)")
    ls.add_argument("--out", required=True, help="folder for the manifests")
    ls.add_argument("--subsets", default="", help="comma-separated, e.g. train-clean-100,dev-clean (default: every "
                    "subset found)")
    ls.add_argument("--download", action="store_true",
                    help="first fetch --subsets from OpenSLR into ROOT (resumable, checksummed)")
    ls.add_argument("--mirror", default="", help="with --download: base URL to fetch from (default: "
                    "https://www.openslr.org/resources/12)")
    ls.add_argument("--no-checksum", action="store_true", help="with --download: skip the SHA-256 check")
    jobs(ls)
    ls.set_defaults(func=cmd_librispeech)

    cv = corpora.add_parser("commonvoice", help="Common Voice language folder (*.tsv, clips/) -> OUT/SPLIT.jsonl")
    cv.add_argument("release", help="the folder holding train.tsv, dev.tsv, test.tsv and clips/")
    cv.add_argument("--out", required=True, help="folder for the manifests")
    cv.add_argument("--splits", default="train,dev,test", help="comma-separated names of the TSV files to read")
    jobs(cv)
    cv.set_defaults(func=cmd_commonvoice)

    lj = corpora.add_parser("ljspeech", help="LJSpeech-1.1 folder -> OUT/{train,valid,test}.jsonl")
    lj.add_argument("root", help="the folder holding metadata.csv and wavs/")
    lj.add_argument("--out", required=True, help="folder for the manifests")
    lj.add_argument("--valid", type=int, default=250, help="clips for valid.jsonl: those before the test ones, by id")
    lj.add_argument("--test", type=int, default=250, help="clips for test.jsonl: the last ones by id")
    jobs(lj)
    lj.set_defaults(func=cmd_ljspeech)

    kd = corpora.add_parser("kaldi", help="Kaldi data dir (wav.scp, text[, segments, utt2spk]) -> manifest")
    kd.add_argument("data_dir", help="Kaldi data dir (wav.scp and text; segments and utt2spk if there)")
    kd.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    kd.add_argument("--audio-root", default=None, help="folder relative wav.scp paths start from "
                    "(default: the current folder, as Kaldi)")
    jobs(kd)
    kd.set_defaults(func=cmd_kaldi)

    tk = corpora.add_parser("to-kaldi", help="manifest -> Kaldi data dir")
    tk.add_argument("manifest", help="JSONL manifest to convert")
    tk.add_argument("--out", required=True, help="data dir to write")
    tk.set_defaults(func=cmd_to_kaldi)

    st = sub.add_parser("compute-stats", help="global log-mel mean/variance of a manifest -> JSON "
                        "(train with --model.feature_stats FILE)")
    st.add_argument("manifest", help="JSONL manifest (the training set)")
    st.add_argument("--out", required=True, help="JSON file to write")
    st.add_argument("--max-utterances", type=int, default=0, help="evenly spaced subset (default: all)")
    st.add_argument("--sample-rate", type=int, default=16000, help="the model's sample rate (Hz)")
    st.add_argument("--n-mels", type=int, default=80, help="the model's number of mel bands")
    st.add_argument("--jobs", type=int, default=0, help="processes reading audio (default: none, in this one)")
    st.set_defaults(func=cmd_compute_stats)


def run(args: argparse.Namespace, debug: bool = False) -> int:
    """Run a parsed command; a :class:`PrepareError` (any user error) becomes one ``error:`` line
    and status 2, as for every speechformer command (:mod:`speechformer.errors`)."""
    return run_reporting(lambda: args.func(args), debug, command_of(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare``'s arguments (``librispeech ROOT --out DIR`` ...), for the data_prep/ scripts."""
    parser = HelpParser(prog="speechformer")
    add_commands(parser.add_subparsers(dest="command", required=True))
    debug, argv = debug_requested(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "compute-stats":
        argv = ["prepare", *argv]
    return run(parser.parse_args(argv), debug)
