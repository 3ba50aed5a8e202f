#!/usr/bin/env bash
# The learning proof on ONE GPU (about 10 minutes on an H100): a small Llama trained from scratch by train.py
# learns 8K-token retrieval.
#
#   bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]     # KEEP_DIR: the 8 files worth keeping, flat
#   python -m bench.learning_proof.report publish --run OUT_DIR|KEEP_DIR   # docs/RESULTS.md + docs/learning_proof/
#
# 1. make_data per stage length: data_<LEN>/ (documents up to LEN tokens); the last stage's also holds
#    ppl_eval.jsonl, and init_model/ is written once
# 2. eval.py on the untrained model           -> OUT/eval_before/  (chance: ~0%)
# 3. train.py stage by stage, each resuming from the previous stage's final_model (--model): STAGES lists
#    LEN:STEPS pairs, shortest first. The copy mechanism retrieval needs (an induction-style lookup) forms fast
#    at short range (bench/learning_proof/sweep.py); each later stage doubles-to-quadruples the length it must
#    reach. Stages are OUT/train_<LEN>/, the last is OUT/train/; OUT/stages.txt lists them in order, and
#    OUT/probe.jsonl has each stage's teacher-forced retrieval at LEN and 2 x LEN (sweep.py --probe).
# 4. eval.py on the trained model             -> OUT/eval_after/
# 5. report summarize                         -> OUT/summary.json, OUT/*.png, OUT/section.md, OUT/timing.txt
#
# Environment (defaults are the GPU run): PYTHON, STAGES (512:2000,1024:800,2048:800,4096:800,8192:2000),
# REPEAT (share of repeat documents, 0.2), NUMBERS (share of number documents, 0.3), LR (train.yaml's),
# LIGER (train.py --liger), STAGE_TOKENS (tokens of documents generated per stage, 16M; MIN_DOCS 1000 to 30000
# documents), LENGTHS (1024,2048,4096,8192),
# SAMPLES (12 per cell), PROBE_SAMPLES (16 prompts per probe after each stage), PPL_DOCS (16), MODEL_CONFIG (bench/learning_proof/model.json), WORKERS (8),
# ROW_TOKENS (tokens per step, 65536: rows of LEN tokens, ROW_TOKENS / LEN of them).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]}
KEEP=${2:-}
PY=${PYTHON:-python3}
STAGES=${STAGES:-512:2000,1024:800,2048:800,4096:800,8192:2000}
REPEAT=${REPEAT:-0.2}
NUMBERS=${NUMBERS:-0.3}
LR=${LR:-}
LIGER=${LIGER:-}
STAGE_TOKENS=${STAGE_TOKENS:-16000000}
MIN_DOCS=${MIN_DOCS:-1000}
ROW_TOKENS=${ROW_TOKENS:-65536}
LENGTHS=${LENGTHS:-1024,2048,4096,8192}
SAMPLES=${SAMPLES:-12}
PROBE_SAMPLES=${PROBE_SAMPLES:-16}
PPL_DOCS=${PPL_DOCS:-16}
MODEL_CONFIG=${MODEL_CONFIG:-bench/learning_proof/model.json}
WORKERS=${WORKERS:-8}
export TOKENIZERS_PARALLELISM=true  # train.py only sets it when unset
IFS=, read -r -a STAGE_LIST <<< "$STAGES"
MAX_LEN=${STAGE_LIST[-1]%%:*}
mkdir -p "$OUT"
: > "$OUT/timing.txt"
: > "$OUT/stages.txt"
t0=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - t0 ))" >> "$OUT/timing.txt"; echo "== [$(( $(date +%s) - t0 )) s] $1 done"; }

for st in "${STAGE_LIST[@]}"; do
  L=${st%%:*}
  docs=$(( STAGE_TOKENS / L )); docs=$(( docs < MIN_DOCS ? MIN_DOCS : docs > 30000 ? 30000 : docs ))
  extra=(--ppl-docs 1); [ "$L" = "$MAX_LEN" ] && extra=(--ppl-docs "$PPL_DOCS" --init-model "$OUT/init_model" --model-config "$MODEL_CONFIG")
  "$PY" -m bench.learning_proof.make_data --out "$OUT/data_$L" --docs "$docs" --max-len "$L" --min-len $(( L / 4 )) \
    --repeat "$REPEAT" --numbers "$NUMBERS" --calib-docs 0 --workers "$WORKERS" "${extra[@]}"
done
stamp data

EVAL=(eval.py --tasks passkey,multi_needle,ppl --filler bank --lengths "$LENGTHS" --depths 0,0.25,0.5,0.75,1
      --samples "$SAMPLES" --needles 4 --max-new-tokens 6 --seed 12345 --ppl-data "$OUT/data_$MAX_LEN/ppl_eval.jsonl"
      --ppl-seq-len "$MAX_LEN" --ppl-docs "$PPL_DOCS" --ppl-buckets linear:8)
"$PY" "${EVAL[@]}" --model "$OUT/init_model" --output-dir "$OUT/eval_before"
stamp eval_before

TRAIN=(train.py --config bench/learning_proof/train.yaml --overwrite ${LR:+--lr "$LR"} ${LIGER:+--liger "$LIGER"})
START="$OUT/init_model"
n=${#STAGE_LIST[@]}
for i in "${!STAGE_LIST[@]}"; do
  L=${STAGE_LIST[$i]%%:*}; S=${STAGE_LIST[$i]##*:}
  dir="$OUT/train_$L"; [ "$i" -eq $(( n - 1 )) ] && dir="$OUT/train"
  echo "== stage $(( i + 1 ))/$n: $S steps on $L-token rows ($(( ROW_TOKENS / L )) per step)"
  "$PY" "${TRAIN[@]}" --max-seq-len "$L" --micro-batch-size $(( ROW_TOKENS / L )) --model "$START" \
    --data "$OUT/data_$L/train.jsonl" --output-dir "$dir" --max-steps "$S"
  rm -rf "$dir/checkpoints"  # the DeepSpeed checkpoint: final_model/ is what the next stage and eval read
  # where the lookup stands after this stage, at its length and twice it (teacher-forced, OUT/probe.jsonl)
  "$PY" -m bench.learning_proof.sweep --out "$OUT" --probe "$dir/final_model" --probe-label "$L" \
    --probe-lengths "$L,$(( 2 * L ))" --eval-samples "$PROBE_SAMPLES" --device auto
  echo "$(basename "$dir")" >> "$OUT/stages.txt"
  START="$dir/final_model"
  stamp "train_$L"
done

"$PY" "${EVAL[@]}" --model "$OUT/train/final_model" --output-dir "$OUT/eval_after"
stamp eval_after

"$PY" -m bench.learning_proof.report summarize --run "$OUT"
stamp report
[ -n "$KEEP" ] && "$PY" -m bench.learning_proof.report collect --run "$OUT" --to "$KEEP"
cat "$OUT/section.md"
