# Shared by the recipes' run.sh: `source ../common/stages.sh` after `cd "$(dirname "$0")"`.
#
# Each function below is one speechformer command, written once so that every recipe trains,
# exports and scores the same way; the recipe keeps its options, its corpus stage and the
# order of its stages. The functions read the recipe's settings from these variables:
#
#   stage, stop_stage   the stages to run (run_stage)
#   exp                 the experiment folder: tokenizer/, feature_stats.json, checkpoints/,
#                       averaged.ckpt, model/, eval_NAME/ and eval_NAME.log
#   config              the training config (stage_fit)
#   vocab_size          BPE pieces (stage_tokenizer)
#   stats_utterances    utterances for the feature mean/variance, 0 for all (stage_stats)
#   jobs                worker processes (stage_stats)
#   num_average         checkpoints to average (stage_average_export)
#   beam_size           beam width (stage_evaluate)
#   exp/tokenizer       is also the language model's (stage_lm writes $exp/lm)
#
# The variables above are set by the recipe:
# shellcheck shell=bash disable=SC2154

start=$(date +%s)   # for the total time that print_wer_table reports

log() { echo "[$(date +%H:%M:%S)] $*"; }

# run_stage N: true when stage N is within --stage .. --stop-stage.
run_stage() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }

# common_option "$@": the options every recipe has, for the last branch of its `case`:
# --stage N, --stop-stage N, --help (the comment block at the top of run.sh), anything else
# is an error. The caller shifts 2 (--help and errors exit).
common_option() {
  case "$1" in
    --stage) stage=$2 ;;
    --stop-stage|--stop_stage) stop_stage=$2 ;;
    -h|--help) awk 'NR == 1 { next } !/^#/ { exit } { print }' "$(basename "$0")"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
}

# stage_tokenizer MANIFEST: a BPE tokenizer of $vocab_size pieces -> $exp/tokenizer
stage_tokenizer() {
  speechformer tokenizer train --manifest "$1" --vocab-size "$vocab_size" --out "$exp/tokenizer"
}

# stage_stats MANIFEST: the global feature mean/variance -> $exp/feature_stats.json
stage_stats() {
  speechformer compute-stats "$1" --out "$exp/feature_stats.json" \
    --max-utterances "$stats_utterances" --jobs "$jobs"
}

# stage_fit TRAIN_MANIFEST VALID_MANIFEST [more fit options]: train $config into $exp,
# resuming from $exp/checkpoints/last.ckpt when there is one
stage_fit() {
  speechformer fit --config "$config" \
    --data.train_manifest "$1" --data.valid_manifest "$2" \
    --data.tokenizer "$exp/tokenizer" "${@:3}" \
    --trainer.default_root_dir "$exp" --ckpt_path last
}

# stage_average_export: average the best $num_average checkpoints (by validation WER),
# export the inference directory $exp/model
stage_average_export() {
  speechformer average --ckpt-dir "$exp/checkpoints" --num "$num_average" --out "$exp/averaged.ckpt"
  speechformer export --model "$exp/averaged.ckpt" --out "$exp/model"
}

# stage_evaluate MODEL MANIFEST NAME [more evaluate options]: WER with beam $beam_size;
# the report goes to $exp/eval_NAME/, the printed table to $exp/eval_NAME.log
stage_evaluate() {
  speechformer evaluate --model "$1" --manifest "$2" --beam-size "$beam_size" "${@:4}" \
    --out "$exp/eval_$3" --name "$3" --quiet > "$exp/eval_$3.log"
}

# manifest_text MANIFEST: its transcripts, one a line (held-out text for the language model)
manifest_text() {
  python -c 'import json, sys; print("".join(json.loads(l)["text"] + "\n" for l in open(sys.argv[1]) if l.strip()), end="")' "$1"
}

# stage_lm TEXT VALID_TEXT [more lm train options]: a language model over $exp/tokenizer's pieces
# trained on TEXT -> $exp/lm, and its perplexity on VALID_TEXT
stage_lm() {
  speechformer lm train --text "$1" --valid-text "$2" --tokenizer "$exp/tokenizer" --out "$exp/lm" --quiet "${@:3}"
  speechformer lm perplexity --lm "$exp/lm" --text "$2"
}

# print_wer_table TITLE NAME...: one table of the stage_evaluate results NAME..., and the
# time since the recipe started
print_wer_table() {
  local title=$1 name
  shift
  echo
  echo "$title"
  head -n 2 "$exp/eval_$1.log"   # the table's header
  for name; do sed -n 3p "$exp/eval_$name.log"; done
  echo "total time: $(( $(date +%s) - start )) s"
}

# corpus_stages TRAIN_MANIFEST VALID_MANIFEST TEST_NAME...: stages 1-5 of a corpus recipe
# (librispeech, commonvoice, ljspeech), each one command: BPE tokenizer, feature statistics,
# training with them, average + export, WER of every $data/TEST_NAME.jsonl in one table
corpus_stages() {
  local train=$1 valid=$2 set
  shift 2
  if run_stage 1; then
    log "stage 1: BPE tokenizer ($vocab_size pieces) on $train"
    stage_tokenizer "$train"
  fi
  if run_stage 2; then
    log "stage 2: global feature mean/variance of $train"
    stage_stats "$train"
  fi
  if run_stage 3; then
    log "stage 3: training $config (resumes from $exp/checkpoints/last.ckpt if present)"
    stage_fit "$train" "$valid" --model.feature_stats "$exp/feature_stats.json"
  fi
  if run_stage 4; then
    log "stage 4: average the best $num_average checkpoints, export an inference directory"
    stage_average_export
  fi
  if run_stage 5; then
    for set; do
      log "stage 5: evaluate $set (beam $beam_size)"
      stage_evaluate "$exp/model" "$data/$set.jsonl" "$set"
    done
    print_wer_table "WER of $exp/model (beam $beam_size); reports in $exp/eval_*/" "$@"
  fi
}
