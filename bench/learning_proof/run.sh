#!/usr/bin/env bash
# The learning proof on ONE GPU (about 20 minutes on an H100: 1,201 s measured alone, WORKERS=12): a small Llama
# trained from scratch by train.py learns 8K-token retrieval.
#
#   bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]     # KEEP_DIR: the files worth keeping, flat
#   python -m bench.learning_proof.report publish --run OUT_DIR|KEEP_DIR   # docs/RESULTS.md + docs/learning_proof/
#
# 1. make_data per stage length, in the background while earlier stages train: data_<LEN>/ (documents up to LEN
#    tokens); the first stage's call also writes init_model/, the last stage's the held-out perplexity sets
# 2. train.py stage by stage, each resuming from the previous stage's final_model (--model): STAGES lists
#    LEN:STEPS[:LR] entries, shortest first. The copy mechanism retrieval needs (an induction-style lookup) forms
#    fast at short range (bench/learning_proof/sweep.py); each later stage doubles the length it must reach.
#    Stages are OUT/train_<LEN>/, the last is OUT/train/; OUT/stages.txt lists them in order, and
#    OUT/probe.jsonl has each stage's teacher-forced retrieval at LEN and 2 x LEN (sweep.py --probe).
# 3. eval.py on the untrained and the trained model -> OUT/eval_before/, OUT/eval_after/ (retrieval grid and the
#    recall perplexity set), and per further perplexity set (PPL_SETS) OUT/eval_{before,after}_ppl_<SET>/
# 4. report summarize                         -> OUT/summary.json, OUT/*.png, OUT/section.md, OUT/timing.txt
#
# Environment (defaults are the GPU run): PYTHON,
# STAGES (512:3000:2e-3,1024:1500:1e-3,2048:1500:1e-3,4096:2000:1e-3,8192:5000:1e-3; LR defaults to LR),
# REPEAT (share of repeat documents, 0.2), NUMBERS (share of number documents, 0.3), LR (train.yaml's),
# LIGER (train.py --liger), STAGE_TOKENS (tokens of documents generated per stage, 32M; MIN_DOCS 1000 to 60000
# documents), LENGTHS (1024,2048,4096,8192), SAMPLES (12 per cell), PROBE_SAMPLES (16 prompts per probe after
# each stage), PPL_DOCS (16 per set), PPL_SETS (further perplexity sets: bank,numbers), MODEL_CONFIG
# (bench/learning_proof/model.json), SEED (train.py's and the init's, 0), WORKERS (8),
# ROW_TOKENS (tokens per step, 65536: rows of LEN tokens, ROW_TOKENS / LEN of them).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash bench/learning_proof/run.sh OUT_DIR [KEEP_DIR]}
KEEP=${2:-}
PY=${PYTHON:-python3}
STAGES=${STAGES:-512:3000:2e-3,1024:1500:1e-3,2048:1500:1e-3,4096:2000:1e-3,8192:5000:1e-3}
REPEAT=${REPEAT:-0.2}
NUMBERS=${NUMBERS:-0.3}
LR=${LR:-}
LIGER=${LIGER:-}
STAGE_TOKENS=${STAGE_TOKENS:-32000000}
MIN_DOCS=${MIN_DOCS:-1000}
ROW_TOKENS=${ROW_TOKENS:-65536}
LENGTHS=${LENGTHS:-1024,2048,4096,8192}
SAMPLES=${SAMPLES:-12}
PROBE_SAMPLES=${PROBE_SAMPLES:-16}
PPL_DOCS=${PPL_DOCS:-16}
PPL_SETS=${PPL_SETS:-bank,numbers}
SEED=${SEED:-0}
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

# data for every stage, in stage order, in the background: stage k trains while stage k+1's documents are made
gen_data() {
  local i L docs extra
  for i in "${!STAGE_LIST[@]}"; do
    L=${STAGE_LIST[$i]%%:*}
    docs=$(( STAGE_TOKENS / L )); docs=$(( docs < MIN_DOCS ? MIN_DOCS : docs > 60000 ? 60000 : docs ))
    extra=(--ppl-docs 1)
    [ "$i" -eq 0 ] && extra+=(--init-model "$OUT/init_model" --model-config "$MODEL_CONFIG")
    [ "$L" = "$MAX_LEN" ] && extra+=(--ppl-docs "$PPL_DOCS" --ppl-kinds "recall${PPL_SETS:+,$PPL_SETS}")
    "$PY" -m bench.learning_proof.make_data --out "$OUT/data_$L" --docs "$docs" --max-len "$L" --min-len $(( L / 4 )) \
      --repeat "$REPEAT" --numbers "$NUMBERS" --calib-docs 0 --workers "$WORKERS" --seed $(( SEED + 1 )) "${extra[@]}" \
      || return 1
    touch "$OUT/data_$L/.done"
  done
}
rm -f "$OUT"/data_*/.done
gen_data > "$OUT/data.log" 2>&1 &
GEN=$!
wait_data() {  # until data_$1 is complete; fail if the generator died first
  while [ ! -e "$OUT/data_$1/.done" ]; do
    if ! kill -0 "$GEN" 2>/dev/null && [ ! -e "$OUT/data_$1/.done" ]; then
      echo "data generation failed (see $OUT/data.log):"; tail -20 "$OUT/data.log"; exit 1
    fi
    sleep 1
  done
}
PPL_PIDS=()  # evaluate's background eval.py processes, stopped with the generator if the script exits early
trap 'kill "$GEN" "${PPL_PIDS[@]}" 2>/dev/null || true' EXIT

PPL=(--ppl-seq-len "$MAX_LEN" --ppl-docs "$PPL_DOCS" --ppl-buckets linear:8)
EVAL=(eval.py --tasks passkey,multi_needle,ppl --filler bank --lengths "$LENGTHS" --depths 0,0.25,0.5,0.75,1
      --samples "$SAMPLES" --needles 4 --max-new-tokens 6 --seed 12345 --ppl-data "$OUT/data_$MAX_LEN/ppl_eval.jsonl"
      "${PPL[@]}")
evaluate() {  # MODEL SIDE: the retrieval grid and every perplexity set
  # the perplexity sets alongside the grid, each eval.py in its own process (OUT/eval_SIDE_ppl_SET.log): most of a
  # small model's evaluation is starting Python and loading the model, one thread at a time
  local set pid failed=()
  PPL_PIDS=()
  for set in ${PPL_SETS//,/ }; do
    "$PY" eval.py --tasks ppl --model "$1" --output-dir "$OUT/eval_$2_ppl_$set" \
      --ppl-data "$OUT/data_$MAX_LEN/ppl_$set.jsonl" "${PPL[@]}" > "$OUT/eval_$2_ppl_$set.log" 2>&1 &
    PPL_PIDS+=($!)
  done
  "$PY" "${EVAL[@]}" --model "$1" --output-dir "$OUT/eval_$2"
  for pid in "${PPL_PIDS[@]}"; do wait "$pid" || failed+=("$pid"); done
  PPL_PIDS=()
  for set in ${PPL_SETS//,/ }; do cat "$OUT/eval_$2_ppl_$set.log"; done
  if [ ${#failed[@]} -gt 0 ]; then echo "a perplexity set's eval.py failed (its log is above)"; exit 1; fi
}

TRAIN=(train.py --config bench/learning_proof/train.yaml --overwrite --seed "$SEED" ${LIGER:+--liger "$LIGER"})
START="$OUT/init_model"
n=${#STAGE_LIST[@]}
for i in "${!STAGE_LIST[@]}"; do
  IFS=: read -r L S R <<< "${STAGE_LIST[$i]}"
  R=${R:-$LR}
  dir="$OUT/train_$L"; [ "$i" -eq $(( n - 1 )) ] && dir="$OUT/train"
  wait_data "$L"
  [ "$i" -eq 0 ] && stamp data_first
  echo "== stage $(( i + 1 ))/$n: $S steps on $L-token rows ($(( ROW_TOKENS / L )) per step)${R:+, lr $R}"
  "$PY" "${TRAIN[@]}" ${R:+--lr "$R"} --max-seq-len "$L" --micro-batch-size $(( ROW_TOKENS / L )) --model "$START" \
    --data "$OUT/data_$L/train.jsonl" --output-dir "$dir" --max-steps "$S"
  rm -rf "$dir/checkpoints"  # the DeepSpeed checkpoint: final_model/ is what the next stage and eval read
  # where the lookup stands after this stage, at its length and twice it (teacher-forced, OUT/probe.jsonl)
  "$PY" -m bench.learning_proof.sweep --out "$OUT" --probe "$dir/final_model" --probe-label "$L" \
    --probe-lengths "$L,$(( 2 * L ))" --eval-samples "$PROBE_SAMPLES" --device auto
  echo "$(basename "$dir")" >> "$OUT/stages.txt"
  START="$dir/final_model"
  stamp "train_$L"
done

evaluate "$OUT/init_model" before
stamp eval_before
evaluate "$OUT/train/final_model" after
stamp eval_after

"$PY" -m bench.learning_proof.report summarize --run "$OUT"
stamp report
[ -n "$KEEP" ] && "$PY" -m bench.learning_proof.report collect --run "$OUT" --to "$KEEP"
cat "$OUT/section.md"
