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

if run_stage 1; then
  log "stage 1: BPE tokenizer ($vocab_size pieces)"
  stage_tokenizer "$data/train.jsonl"
fi

if run_stage 2; then
  log "stage 2: global feature mean/variance"
  stage_stats "$data/train.jsonl"
fi

if run_stage 3; then
  log "stage 3: training $config (resumes from $exp/checkpoints/last.ckpt if present)"
  stage_fit "$data/train.jsonl" "$data/dev.jsonl" --model.feature_stats "$exp/feature_stats.json"
fi

if run_stage 4; then
  log "stage 4: average the best $num_average checkpoints, export an inference directory"
  stage_average_export
fi

if run_stage 5; then
  for set in dev test; do
    log "stage 5: evaluate $set (beam $beam_size)"
    stage_evaluate "$exp/model" "$data/$set.jsonl" "$set"
  done
  print_wer_table "WER of $exp/model (beam $beam_size); reports in $exp/eval_*/" dev test
fi
