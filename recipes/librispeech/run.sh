#!/usr/bin/env bash
# LibriSpeech: from a local corpus root to scored WER on test-clean and test-other.
#
#   bash run.sh --corpus /data/corpora                   # 100 h: train-clean-100, conf/transformer_100h.yaml
#   bash run.sh --corpus /data/corpora --download        # fetch the subsets first (about 60 GB for 960 h)
#   bash run.sh --corpus /data/corpora --config conf/conformer_960h.yaml --train-set train-960 --vocab-size 5000
#   bash run.sh --stage 3 --stop-stage 3                 # only training (re-running resumes from last.ckpt)
#
# --corpus is the folder that holds LibriSpeech/ (as the OpenSLR archives unpack). Every stage is
# one command a user could type; this script only strings them together. See README.md for the
# hardware each config is sized for.
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
corpus=""                  # folder holding LibriSpeech/ (required for stage 0)
download=false
config=conf/transformer_100h.yaml
train_set=train-clean-100  # or train-960 (= train-clean-100 + train-clean-360 + train-other-500)
data=data                  # manifests (stage 0)
vocab_size=300
stats_utterances=20000     # evenly spaced training utterances for the feature mean/variance
beam_size=10
num_average=5
jobs=8

while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage|--stop_stage) stop_stage=$2; shift 2 ;;
    --corpus) corpus=$2; shift 2 ;;
    --download) download=true; shift ;;
    --config) config=$2; shift 2 ;;
    --train-set) train_set=$2; shift 2 ;;
    --vocab-size) vocab_size=$2; shift 2 ;;
    --beam-size) beam_size=$2; shift 2 ;;
    --num-average) num_average=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

exp=exp/$(basename "$config" .yaml)   # as in the config's checkpoint dirpath
test_sets="dev-clean dev-other test-clean test-other"
log() { echo "[$(date +%H:%M:%S)] $*"; }
run_stage() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }
start=$(date +%s)

if run_stage 0; then
  [[ -n $corpus ]] || { echo "run.sh: stage 0 needs --corpus DIR (the folder holding LibriSpeech/)" >&2; exit 2; }
  if [[ $train_set == train-960 ]]; then train_subsets=train-clean-100,train-clean-360,train-other-500
  else train_subsets=$train_set; fi
  subsets=$train_subsets,${test_sets// /,}
  log "stage 0: manifests for $subsets -> $data"
  dl=(); $download && dl=(--download)
  speechformer prepare librispeech "$corpus" --out "$data" --subsets "$subsets" --jobs "$jobs" "${dl[@]}"
  if [[ $train_set == train-960 ]]; then   # same folder, so the relative audio paths stay valid
    cat "$data"/train-clean-100.jsonl "$data"/train-clean-360.jsonl "$data"/train-other-500.jsonl > "$data/train-960.jsonl"
  fi
  cat "$data/dev-clean.jsonl" "$data/dev-other.jsonl" > "$data/dev.jsonl"   # validation: both dev sets
fi

if run_stage 1; then
  log "stage 1: BPE tokenizer ($vocab_size pieces) on $train_set"
  speechformer tokenizer train --manifest "$data/$train_set.jsonl" --vocab-size "$vocab_size" --out "$exp/tokenizer"
fi

if run_stage 2; then
  log "stage 2: global feature mean/variance from $stats_utterances utterances of $train_set"
  speechformer compute-stats "$data/$train_set.jsonl" --out "$exp/feature_stats.json" \
    --max-utterances "$stats_utterances" --jobs "$jobs"
fi

if run_stage 3; then
  log "stage 3: training $config (resumes from $exp/checkpoints/last.ckpt if present)"
  speechformer fit --config "$config" \
    --data.train_manifest "$data/$train_set.jsonl" --data.valid_manifest "$data/dev.jsonl" \
    --data.tokenizer "$exp/tokenizer" --model.feature_stats "$exp/feature_stats.json" \
    --trainer.default_root_dir "$exp" --ckpt_path last
fi

if run_stage 4; then
  log "stage 4: average the best $num_average checkpoints, export an inference directory"
  speechformer average --ckpt-dir "$exp/checkpoints" --num "$num_average" --out "$exp/averaged.ckpt"
  speechformer export --model "$exp/averaged.ckpt" --out "$exp/model"
fi

if run_stage 5; then
  for set in $test_sets; do
    log "stage 5: evaluate $set (beam $beam_size)"
    speechformer evaluate --model "$exp/model" --manifest "$data/$set.jsonl" --beam-size "$beam_size" \
      --out "$exp/eval_$set" --name "$set" --quiet > "$exp/eval_$set.log"
  done
  echo
  echo "WER of $exp/model (beam $beam_size); reports in $exp/eval_*/"
  head -n 2 "$exp/eval_dev-clean.log"
  for set in $test_sets; do sed -n 3p "$exp/eval_$set.log"; done
  echo "total time: $(( $(date +%s) - start )) s"
fi
