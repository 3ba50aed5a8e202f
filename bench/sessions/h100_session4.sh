#!/usr/bin/env bash
# (Ran against run.sh as of its commit; run.sh's STEPS/SHORT_SHARE/SHORT_LEN interface has since become STAGES.)
# Fourth GPU session's single-GPU job (2026-11-22), issue 8's learning proof, third attempt. Started detached:
#   setsid nohup bash bench/sessions/h100_session4.sh /tmp/s4 > /tmp/s4.log 2>&1 &
# and followed by calls that copy /tmp/s4 back. Each part writes to /tmp/s4 before the next starts.
#  1. bench/learning_proof/sweep.py: 8 recipes side by side on the one GPU at 512 tokens (<= SWEEP_S seconds of
#     training each, same wall clock for all), teacher-forced retrieval every 250 steps -> sweep/
#  2. run.sh (train.py, then eval.py) with the sweep's best recipe, STEPS fixed (no calibration): STEPS*SHORT_SHARE
#     steps on 512-token rows, the rest on 8K rows -> lpkeep/ (+ lp.log)
# Nothing else runs on the GPU meanwhile (gpu_procs_*.txt records it): the second attempt's 8K steps were ~6x slower
# than the first's, most likely under an orphaned benchmark worker (bench.run now stops its worker when stopped).
set -u
OUT=${1:?usage: h100_session4.sh OUT}
mkdir -p "$OUT"
apps() { nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$OUT/gpu_procs_$1.txt" 2>&1; }
apps before
echo "== sweep $(date +%T)"
python3 -m bench.learning_proof.sweep --out "$OUT/sweep" --steps "${SWEEP_STEPS:-2500}" --max-seconds "${SWEEP_S:-300}" \
  --workers 2 > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?"
BEST_LINE=$(python3 -m bench.learning_proof.sweep --out "$OUT/sweep" --best | tail -1)
echo "$BEST_LINE"
eval "$BEST_LINE"
export REPEAT NUMBERS LR MODEL_CONFIG
apps after_sweep
echo "== run.sh $(date +%T)"
STEPS=${STEPS:-3000} SHORT_SHARE=${SHORT_SHARE:-0.6} bash bench/learning_proof/run.sh /tmp/lp "$OUT/lpkeep" \
  > "$OUT/lp.log" 2>&1
echo "learning proof rc=$?"
grep -E "^== |Error" "$OUT/lp.log" | grep -v Warning | tail -25
echo "== done $(date +%T)"
