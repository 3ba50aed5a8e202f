#!/usr/bin/env bash
# The learning proof on ONE GPU (about 7 minutes on an H100): a small Llama trained from scratch by train.py
# learns 8K-token retrieval.
#
#   bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]     # KEEP_DIR: the 8 files worth keeping, flat
#   python -m bench.learning_proof.report publish --run OUT_DIR|KEEP_DIR   # docs/RESULTS.md + docs/learning_proof/
#
# 1. make_data: train.jsonl (needle + recall documents up to 8K tokens), ppl_eval.jsonl, init_model/
# 2. eval.py on the untrained model           -> OUT/eval_before/  (chance: ~0%)
# 3. calibrate: 12 train.py steps on calib.jsonl, to size the run to TRAIN_SECONDS
# 4. train.py from init_model (bf16, varlen attention, packed 8K rows)  -> OUT/train/final_model
# 5. eval.py on the trained model             -> OUT/eval_after/
# 6. report summarize                         -> OUT/summary.json, OUT/*.png, OUT/section.md, OUT/timing.txt
#
# Environment (defaults are the GPU run): PYTHON, TRAIN_SECONDS (210), STEPS (fixed count: no calibration),
# MAX_LEN (8192), DOCS (6000), LENGTHS (1024,2048,4096,8192), SAMPLES (12 per cell), PPL_DOCS (16),
# MODEL_CONFIG (bench/learning_proof/model.json), WORKERS (8).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]}
KEEP=${2:-}
PY=${PYTHON:-python3}
TRAIN_SECONDS=${TRAIN_SECONDS:-210}
STEPS=${STEPS:-}
MAX_LEN=${MAX_LEN:-8192}
DOCS=${DOCS:-6000}
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
  --workers "$WORKERS" --init-model "$OUT/init_model" --model-config "$MODEL_CONFIG"
stamp data

EVAL=(eval.py --tasks passkey,multi_needle,ppl --filler bank --lengths "$LENGTHS" --depths 0,0.25,0.5,0.75,1
      --samples "$SAMPLES" --needles 4 --max-new-tokens 6 --seed 12345 --ppl-data "$OUT/data/ppl_eval.jsonl"
      --ppl-seq-len "$MAX_LEN" --ppl-docs "$PPL_DOCS" --ppl-buckets linear:8)
"$PY" "${EVAL[@]}" --model "$OUT/init_model" --output-dir "$OUT/eval_before"
stamp eval_before

TRAIN=(train.py --config bench/learning_proof/train.yaml --model "$OUT/init_model" --max-seq-len "$MAX_LEN" --overwrite)
if [ -z "$STEPS" ]; then
  "$PY" "${TRAIN[@]}" --data "$OUT/data/calib.jsonl" --output-dir "$OUT/calibrate" --max-steps 12 --log-interval 1 --no-save-final-model
  STEPS=$("$PY" -m bench.learning_proof.report steps --metrics "$OUT/calibrate/metrics.jsonl" --seconds "$TRAIN_SECONDS")
  rm -rf "$OUT/calibrate/checkpoints"
  echo "== training for $STEPS steps (~$TRAIN_SECONDS s)"
  stamp calibrate
fi
"$PY" "${TRAIN[@]}" --data "$OUT/data/train.jsonl" --output-dir "$OUT/train" --max-steps "$STEPS"
rm -rf "$OUT/train/checkpoints"  # the DeepSpeed checkpoint: final_model/ is what eval reads
stamp train

"$PY" "${EVAL[@]}" --model "$OUT/train/final_model" --output-dir "$OUT/eval_after"
stamp eval_after

"$PY" -m bench.learning_proof.report summarize --run "$OUT"
stamp report
[ -n "$KEEP" ] && "$PY" -m bench.learning_proof.report collect --run "$OUT" --to "$KEEP"
cat "$OUT/section.md"
