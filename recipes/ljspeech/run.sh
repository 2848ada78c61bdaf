#!/usr/bin/env bash
# LJSpeech 1.1 (one speaker, 24 h): from the unpacked corpus to scored WER on the fixed valid and test split.
#
#   bash run.sh --corpus /data/LJSpeech-1.1              # the folder holding metadata.csv and wavs/
#   bash run.sh --corpus DIR --vocab-size 500
#   bash run.sh --stage 3 --stop-stage 3                  # only training (resumes from last.ckpt)
#
# LJSpeech is downloaded by the user from https://keithito.com/LJ-Speech-Dataset/ (one 2.6 GB
# archive); the split is documented in speechformer/prepare/ljspeech.py. Every stage is one command.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR
source ../common/stages.sh   # log, run_stage, common_option and the stage_* commands

stage=0
stop_stage=100
corpus=""                  # LJSpeech-1.1 folder (required for stage 0)
config=conf/transformer.yaml
data=data
vocab_size=256
stats_utterances=0          # 0: all 12,600 training clips
beam_size=10
num_average=5
jobs=8

while [[ $# -gt 0 ]]; do
  case "$1" in
    --corpus) corpus=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --vocab-size) vocab_size=$2; shift 2 ;;
    --beam-size) beam_size=$2; shift 2 ;;
    --num-average) num_average=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    *) common_option "$@"; shift 2 ;;   # --stage, --stop-stage, --help
  esac
done

exp=exp/$(basename "$config" .yaml)

if run_stage 0; then
  [[ -n $corpus ]] || { echo "run.sh: stage 0 needs --corpus DIR (the folder holding metadata.csv and wavs/)" >&2; exit 2; }
  log "stage 0: manifests train (12,600 clips), valid (250), test (250) -> $data"
  speechformer prepare ljspeech "$corpus" --out "$data" --valid 250 --test 250 --jobs "$jobs"
fi

corpus_stages "$data/train.jsonl" "$data/valid.jsonl" valid test
