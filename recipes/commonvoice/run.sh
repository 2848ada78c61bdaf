#!/usr/bin/env bash
# Common Voice (one language of one release): from the unpacked release to scored WER on dev and test.
#
#   bash run.sh --release /data/cv-corpus-17.0-2024-03-15/cy      # the language folder (train.tsv, clips/)
#   bash run.sh --release DIR --vocab-size 300 --config conf/transformer.yaml
#   bash run.sh --stage 3 --stop-stage 3                           # only training (resumes from last.ckpt)
#
# Common Voice is downloaded by the user from https://commonvoice.mozilla.org (it needs an
# email address), so there is no --download. Every stage is one command a user could type.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR
source ../common/stages.sh   # log, run_stage, common_option and the stage_* commands

stage=0
stop_stage=100
release=""                 # Common Voice language folder (required for stage 0)
config=conf/transformer.yaml
data=data
vocab_size=500
stats_utterances=20000
beam_size=10
num_average=5
jobs=8

while [[ $# -gt 0 ]]; do
  case "$1" in
    --release) release=$2; shift 2 ;;
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
  [[ -n $release ]] || { echo "run.sh: stage 0 needs --release DIR (the folder holding train.tsv and clips/)" >&2; exit 2; }
  log "stage 0: manifests for train, dev, test -> $data (MP3 headers are read, nothing is converted)"
  speechformer prepare commonvoice "$release" --out "$data" --splits train,dev,test --jobs "$jobs"
fi

corpus_stages "$data/train.jsonl" "$data/dev.jsonl" dev test
