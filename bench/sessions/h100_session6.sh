#!/usr/bin/env bash
# Sixth GPU session's single-GPU job (2026-11-22), issue 8's learning proof, fifth attempt. Started detached:
#   setsid nohup bash bench/sessions/h100_session6.sh /tmp/s6 > /tmp/s6.log 2>&1 &
#  1. train.py's 8K step (15 steps, the proof's document mix) with --tiled-mlp auto (now off for this model),
#     forced on (what auto did before), and auto with Liger off: is the ~0.64 s step the tiling?
#  2. run.sh with its staged curriculum (512 -> 1K -> 2K -> 4K -> 8K), Liger as measured faster.
set -u
OUT=${1:?usage: h100_session6.sh OUT}
mkdir -p "$OUT"
python3 -m bench.learning_proof.make_data --out /tmp/d8 --docs 300 --calib-docs 300 --max-len 8192 --ppl-docs 1 \
  --repeat 0.2 --numbers 0.3 --workers 16 --init-model /tmp/m8 > "$OUT/steptime_data.log" 2>&1
declare -A FLAGS=([auto]="" [tiled_on]="--tiled-mlp" [auto_liger_off]="--liger off")
for k in auto tiled_on auto_liger_off; do
  python3 train.py --config bench/learning_proof/train.yaml --overwrite --model /tmp/m8 --data /tmp/d8/calib.jsonl \
    --output-dir /tmp/st_$k --max-steps 15 --log-interval 1 --no-save-final-model ${FLAGS[$k]} \
    > "$OUT/steptime_$k.log" 2>&1
done
python3 - <<'PY' > "$OUT/steptime.txt"
import json, statistics
t = {}
for k in ("auto", "tiled_on", "auto_liger_off"):
    rows = [json.loads(x) for x in open(f"/tmp/st_{k}/metrics.jsonl") if x.strip()]
    t[k] = statistics.median(r["step_time_s"] for r in rows[5:])
    print(f"{k}: median 8K step {t[k]:.4f} s (steps 6-15)")
print("LIGER=" + ("off" if t["auto_liger_off"] < t["auto"] else "auto"))
PY
cat "$OUT/steptime.txt"
grep -h "tiled MLP" "$OUT"/steptime_*.log
eval "$(tail -1 "$OUT/steptime.txt")"
echo "== run.sh, liger $LIGER $(date +%T)"
LIGER=$LIGER WORKERS=16 bash bench/learning_proof/run.sh /tmp/lp6 "$OUT/lpkeep" > "$OUT/lp.log" 2>&1
echo "learning proof rc=$?"
grep -E "^== |Error" "$OUT/lp.log" | grep -v Warning | tail -25
echo "== done $(date +%T)"
