#!/usr/bin/env bash
# The synthetic recipe: a spoken corpus made here, a BPE tokenizer, a Conformer encoder-decoder trained
# with Lightning, checkpoint averaging and export, WER on unseen sentences of an unseen voice.
#
#   bash run.sh                      # everything
#   bash run.sh --stage 2 --stop-stage 2   # only training (re-running resumes from last.ckpt)
#   bash run.sh --stage 1 --config conf/transformer.yaml --exp exp/transformer   # the transformer encoder
#   bash run.sh --stage 4 --decoder attention                       # re-score with the decoder alone
#   bash run.sh --stage 6 --lm true  # a language model on grammar text (never a valid/test sentence)
#
# Every stage is one command a user could type; this script only strings them together.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR
source ../common/stages.sh   # log, run_stage, common_option and the stage_* commands

stage=0
stop_stage=100
config=conf/train.yaml
data=data/synthetic        # corpus (stage 0)
exp=exp/conformer          # tokenizer, checkpoints, logs, model, reports (as in the config's paths)
num_train=8000
vocab_size=256
beam_size=4              # stage 4: beam width of attention and joint decoding
decoder=joint            # stage 4: joint (CTC/attention) | attention | ctc (greedy, no beam)
ctc_weight=0.1           # joint decoding's CTC share, chosen on the validation set (README.md)
lm=false                 # stage 6 (off by default): a language model on grammar text, see README.md
lm_sentences=20000       # its training text: sentences of the grammar, none of them a valid or test sentence
lm_options=(--d-model 128 --d-ff 512 --n-layers 3 --max-epochs 4 --lr 2e-3 --warmup-steps 100)
num_average=1            # averaging the best 2 or 3 epochs did not help (README.md)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    --num-train) num_train=$2; shift 2 ;;
    --beam-size) beam_size=$2; beam_given=true; shift 2 ;;
    --decoder) decoder=$2; shift 2 ;;
    --ctc-weight) ctc_weight=$2; shift 2 ;;
    --lm) lm=$2; shift 2 ;;
    *) common_option "$@"; shift 2 ;;   # --stage, --stop-stage, --help
  esac
done
if [[ $decoder == ctc ]]; then  # greedy over the CTC labels: `speechformer evaluate` refuses a beam there
  if [[ ${beam_given:-} == true && $beam_size != 1 ]]; then
    echo "run.sh: --decoder ctc is greedy decoding, with no beam; drop --beam-size $beam_size" >&2; exit 2
  fi
  beam_size=1
fi

if run_stage 0; then
  log "stage 0: synthetic spoken corpus -> $data"
  python ../../data_prep/synthetic.py --out "$data" --num-train "$num_train" --num-valid 200 --num-test 200
fi

if run_stage 1; then
  log "stage 1: BPE tokenizer ($vocab_size pieces)"
  stage_tokenizer "$data/train.jsonl"
fi

if run_stage 2; then
  log "stage 2: training (resumes from $exp/checkpoints/last.ckpt if present)"
  stage_fit "$data/train.jsonl" "$data/valid.jsonl"
fi

if run_stage 3; then
  log "stage 3: average the best $num_average checkpoints, export an inference directory"
  stage_average_export
fi

if run_stage 4; then
  for set in valid test; do
    log "stage 4: evaluate $set ($decoder, beam $beam_size)"
    if [[ $decoder == joint ]]; then weight=(--ctc-weight "$ctc_weight"); else weight=(); fi
    stage_evaluate "$exp/model" "$data/$set.jsonl" "$set" --decoder "$decoder" "${weight[@]}"
  done
fi

if run_stage 5; then
  log "stage 5: transcribe a sample"
  mapfile -t sample < <(head -n 3 "$data/test.jsonl" | python -c 'import sys, json; print("\n".join(json.loads(l)["audio"] for l in sys.stdin))')
  (cd "$data" && speechformer transcribe --model "$OLDPWD/$exp/model" --format tsv --quiet "${sample[@]}")
fi

if [[ $lm == true ]] && run_stage 6; then
  log "stage 6: language model on $lm_sentences grammar sentences -> $exp/lm"
  python ../../data_prep/synthetic.py --out "$data" --num-train "$num_train" --num-valid 200 --num-test 200 \
    --lm-text "$data/lm/train.txt.gz" --lm-sentences "$lm_sentences"
  mkdir -p "$data/lm"
  manifest_text "$data/valid.jsonl" > "$data/lm/valid.txt"
  stage_lm "$data/lm/train.txt.gz" "$data/lm/valid.txt" "${lm_options[@]}"
fi

if run_stage 4; then
  print_wer_table "WER of $exp/model ($decoder, beam $beam_size); reports in $exp/eval_*/" valid test
fi
