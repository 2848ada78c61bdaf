#!/usr/bin/env bash
# LibriSpeech: from a local corpus root to scored WER on test-clean and test-other.
#
#   bash run.sh --corpus /data/corpora                   # 100 h: train-clean-100, conf/transformer_100h.yaml
#   bash run.sh --corpus /data/corpora --download        # fetch the subsets first (about 60 GB for 960 h)
#   bash run.sh --corpus /data/corpora --config conf/conformer_960h.yaml --train-set train-960 --vocab-size 5000
#   bash run.sh --stage 3 --stop-stage 3                 # only training (re-running resumes from last.ckpt)
#   bash run.sh --stage 6 --lm true --lm-text /data/librispeech-lm-norm.txt.gz   # the language model
#
# --corpus is the folder that holds LibriSpeech/ (as the OpenSLR archives unpack). Every stage is
# one command a user could type; this script only strings them together. See README.md for the
# hardware each config is sized for.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR
source ../common/stages.sh   # log, run_stage, common_option and the stage_* commands

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
lm=false                   # stage 6 (off by default): a language model on the corpus's normalised LM text
lm_text=""                 # librispeech-lm-norm.txt.gz (OpenSLR 11, 800 M words; not downloaded here)
# 40 M sentences: 100k steps of 256 sentences is ~0.6 of an epoch; d 512 x 8 layers, sized for 1 GPU (bf16)
lm_options=(--d-model 512 --n-heads 8 --d-ff 2048 --n-layers 8 --dropout 0.1 --max-positions 512
            --batch-size 256 --max-steps 100000 --lr 1e-3 --warmup-steps 4000 --precision bf16-mixed)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --corpus) corpus=$2; shift 2 ;;
    --download) download=true; shift ;;
    --config) config=$2; shift 2 ;;
    --train-set) train_set=$2; shift 2 ;;
    --vocab-size) vocab_size=$2; shift 2 ;;
    --beam-size) beam_size=$2; shift 2 ;;
    --num-average) num_average=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --lm) lm=$2; shift 2 ;;
    --lm-text) lm_text=$2; shift 2 ;;
    *) common_option "$@"; shift 2 ;;   # --stage, --stop-stage, --help
  esac
done

exp=exp/$(basename "$config" .yaml)   # as in the config's checkpoint dirpath
test_sets="dev-clean dev-other test-clean test-other"

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

# shellcheck disable=SC2086  # one name per test set
corpus_stages "$data/$train_set.jsonl" "$data/dev.jsonl" $test_sets

if [[ $lm == true ]] && run_stage 6; then
  [[ -n $lm_text ]] || { echo "run.sh: stage 6 needs --lm-text FILE (librispeech-lm-norm.txt.gz)" >&2; exit 2; }
  log "stage 6: language model on $lm_text -> $exp/lm"
  mkdir -p "$exp"
  manifest_text "$data/dev.jsonl" > "$exp/lm_valid.txt"   # the dev transcripts: held-out text
  stage_lm "$lm_text" "$exp/lm_valid.txt" "${lm_options[@]}"
fi
