#!/usr/bin/env bash
# (Ran against run.sh as of its commit; run.sh's STEPS/SHORT_SHARE/SHORT_LEN interface has since become STAGES.)
# Fifth GPU session's single-GPU job (2026-11-22), issue 8's learning proof, fourth attempt. Started detached:
#   setsid nohup bash bench/sessions/h100_session5.sh /tmp/s5 > /tmp/s5.log 2>&1 &
# and followed by calls that copy /tmp/s5 back.
#  1. train.py's 8K step with Liger on and off (15 steps each, the proof's document mix): the third attempt's 8K
#     steps took ~0.8 s though the model's own fwd+bwd on 64K packed tokens takes 20 ms (diag/attn_profile.py).
#  2. run.sh with the sweep's recipe (model.json init 0.02, REPEAT 0.2, NUMBERS 0.3), Liger as measured faster,
#     S1 steps on 512-token rows, then as many 8K steps as fit in S2_SECONDS (at most S2_MAX).
set -u
OUT=${1:?usage: h100_session5.sh OUT}
mkdir -p "$OUT"
python3 -m bench.learning_proof.make_data --out /tmp/d8 --docs 300 --calib-docs 300 --max-len 8192 --ppl-docs 1 \
  --repeat 0.2 --numbers 0.3 --workers 16 --init-model /tmp/m8 > "$OUT/steptime_data.log" 2>&1
for L in on off; do
  python3 train.py --config bench/learning_proof/train.yaml --overwrite --model /tmp/m8 --data /tmp/d8/calib.jsonl \
    --output-dir /tmp/st_$L --max-steps 15 --log-interval 1 --no-save-final-model --liger $L \
    > "$OUT/steptime_liger_$L.log" 2>&1
done
python3 - "$OUT" <<'PY' > "$OUT/steptime.txt"
import json, statistics, sys
t = {}
for L in ("on", "off"):
    rows = [json.loads(x) for x in open(f"/tmp/st_{L}/metrics.jsonl") if x.strip()]
    t[L] = statistics.median(r["step_time_s"] for r in rows[5:])
    print(f"liger {L}: median 8K step {t[L]:.3f} s (steps 6-15)")
best = min(t, key=t.get)
print(f"LIGER={best} T8K={t[best]:.4f}")
PY
cat "$OUT/steptime.txt"
eval "$(tail -1 "$OUT/steptime.txt")"
S1=${S1:-2000}
S2=$(python3 -c "print(max(100, min(${S2_MAX:-2500}, int(${S2_SECONDS:-420} / $T8K))))")
echo "== run.sh: $S1 steps at 512, $S2 at 8K, liger $LIGER $(date +%T)"
STEPS=$(( S1 + S2 )) SHORT_SHARE=$(python3 -c "print($S1 / ($S1 + $S2))") LIGER=$LIGER \
  bash bench/learning_proof/run.sh /tmp/lp5 "$OUT/lpkeep" > "$OUT/lp.log" 2>&1
echo "learning proof rc=$?"
grep -E "^== |Error" "$OUT/lp.log" | grep -v Warning | tail -25
echo "== done $(date +%T)"
