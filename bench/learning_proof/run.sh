#!/usr/bin/env bash
# The learning proof on ONE GPU (about 6 minutes on an H100): a small Llama trained from scratch by train.py
# learns 8K-token retrieval.
#
#   bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]     # KEEP_DIR: the 8 files worth keeping, flat
#   python -m bench.learning_proof.report publish --run OUT_DIR|KEEP_DIR   # docs/RESULTS.md + docs/learning_proof/
#
# 1. make_data: data_short/ (documents up to SHORT_LEN), data/ (up to MAX_LEN), ppl_eval.jsonl, init_model/
# 2. eval.py on the untrained model           -> OUT/eval_before/  (chance: ~0%)
# 3. calibrate: 12 train.py steps on calib.jsonl (MAX_LEN rows), to size the run to TRAIN_SECONDS
# 4. stage 1, train.py on SHORT_LEN rows (the same tokens per step) for SHORT_SHARE of the steps: the copy
#    mechanism (induction heads) forms fast at short range  -> OUT/train_short/final_model
#    stage 2, train.py from stage 1 on MAX_LEN rows for the rest: the same lookup stretched to MAX_LEN
#                                              -> OUT/train/final_model
# 5. eval.py on the trained model             -> OUT/eval_after/
# 6. report summarize                         -> OUT/summary.json, OUT/*.png, OUT/section.md, OUT/timing.txt
#
# Environment (defaults are the GPU run): PYTHON, TRAIN_SECONDS (180), STEPS (fixed total: no calibration),
# MAX_LEN (8192), SHORT_LEN (512; >= MAX_LEN: no stage 1), SHORT_SHARE (0.5), REPEAT (share of repeat documents,
# 0.2), NUMBERS (share of number documents, 0.3), LR (train.yaml's), LIGER (train.py --liger), DOCS (4000), SHORT_DOCS (30000), LENGTHS (1024,2048,4096,8192), SAMPLES (12 per cell), PPL_DOCS (16),
# MODEL_CONFIG (bench/learning_proof/model.json), WORKERS (8), ROWS (8: MAX_LEN rows per step).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]}
KEEP=${2:-}
PY=${PYTHON:-python3}
TRAIN_SECONDS=${TRAIN_SECONDS:-180}
STEPS=${STEPS:-}
MAX_LEN=${MAX_LEN:-8192}
SHORT_LEN=${SHORT_LEN:-512}
SHORT_SHARE=${SHORT_SHARE:-0.5}
REPEAT=${REPEAT:-0.2}
NUMBERS=${NUMBERS:-0.3}
LR=${LR:-}
LIGER=${LIGER:-}
ROWS=${ROWS:-8}
DOCS=${DOCS:-4000}
SHORT_DOCS=${SHORT_DOCS:-30000}
LENGTHS=${LENGTHS:-1024,2048,4096,8192}
SAMPLES=${SAMPLES:-12}
PPL_DOCS=${PPL_DOCS:-16}
MODEL_CONFIG=${MODEL_CONFIG:-bench/learning_proof/model.json}
WORKERS=${WORKERS:-8}
export TOKENIZERS_PARALLELISM=true  # train.py only sets it when unset
mkdir -p "$OUT"
: > "$OUT/timing.txt"
t0=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - t0 ))" >> "$OUT/timing.txt"; echo "== [$(( $(date +%s) - t0 )) s] $1 done"; }

"$PY" -m bench.learning_proof.make_data --out "$OUT/data" --docs "$DOCS" --max-len "$MAX_LEN" --ppl-docs "$PPL_DOCS" \
  --repeat "$REPEAT" --numbers "$NUMBERS" --workers "$WORKERS" --init-model "$OUT/init_model" --model-config "$MODEL_CONFIG"
if [ "$SHORT_LEN" -lt "$MAX_LEN" ]; then
  "$PY" -m bench.learning_proof.make_data --out "$OUT/data_short" --docs "$SHORT_DOCS" --max-len "$SHORT_LEN" \
    --min-len $(( SHORT_LEN / 4 )) --repeat "$REPEAT" --numbers "$NUMBERS" --ppl-docs 1 --calib-docs 0 --workers "$WORKERS"
fi
stamp data

EVAL=(eval.py --tasks passkey,multi_needle,ppl --filler bank --lengths "$LENGTHS" --depths 0,0.25,0.5,0.75,1
      --samples "$SAMPLES" --needles 4 --max-new-tokens 6 --seed 12345 --ppl-data "$OUT/data/ppl_eval.jsonl"
      --ppl-seq-len "$MAX_LEN" --ppl-docs "$PPL_DOCS" --ppl-buckets linear:8)
"$PY" "${EVAL[@]}" --model "$OUT/init_model" --output-dir "$OUT/eval_before"
stamp eval_before

TRAIN=(train.py --config bench/learning_proof/train.yaml --overwrite ${LR:+--lr "$LR"} ${LIGER:+--liger "$LIGER"})
LONG=(--max-seq-len "$MAX_LEN" --micro-batch-size "$ROWS")
if [ -z "$STEPS" ]; then
  "$PY" "${TRAIN[@]}" "${LONG[@]}" --model "$OUT/init_model" --data "$OUT/data/calib.jsonl" --output-dir "$OUT/calibrate" \
    --max-steps 12 --log-interval 1 --no-save-final-model
  STEPS=$("$PY" -m bench.learning_proof.report steps --metrics "$OUT/calibrate/metrics.jsonl" --seconds "$TRAIN_SECONDS")
  rm -rf "$OUT/calibrate/checkpoints"
  echo "== training for $STEPS steps (~$TRAIN_SECONDS s)"
  stamp calibrate
fi
START="$OUT/init_model"
if [ "$SHORT_LEN" -lt "$MAX_LEN" ]; then  # stage 1: as many tokens per step, in SHORT_LEN rows
  S1=$("$PY" -c "print(max(1, round($STEPS * $SHORT_SHARE)))")
  STEPS=$(( STEPS > S1 ? STEPS - S1 : 1 ))
  echo "== stage 1: $S1 steps on $SHORT_LEN-token rows; stage 2: $STEPS steps on $MAX_LEN-token rows"
  "$PY" "${TRAIN[@]}" --max-seq-len "$SHORT_LEN" --micro-batch-size $(( ROWS * MAX_LEN / SHORT_LEN )) --model "$START" \
    --data "$OUT/data_short/train.jsonl" --output-dir "$OUT/train_short" --max-steps "$S1"
  rm -rf "$OUT/train_short/checkpoints"
  START="$OUT/train_short/final_model"
  stamp train_short
fi
"$PY" "${TRAIN[@]}" "${LONG[@]}" --model "$START" --data "$OUT/data/train.jsonl" --output-dir "$OUT/train" --max-steps "$STEPS"
rm -rf "$OUT/train/checkpoints"  # the DeepSpeed checkpoint: final_model/ is what eval reads
stamp train

"$PY" "${EVAL[@]}" --model "$OUT/train/final_model" --output-dir "$OUT/eval_after"
stamp eval_after

"$PY" -m bench.learning_proof.report summarize --run "$OUT"
stamp report
[ -n "$KEEP" ] && "$PY" -m bench.learning_proof.report collect --run "$OUT" --to "$KEEP"
cat "$OUT/section.md"
