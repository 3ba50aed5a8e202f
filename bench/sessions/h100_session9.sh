#!/usr/bin/env bash
# Ninth GPU session's single-GPU job (2026-11-22), issue 8: run.sh as committed (4-layer model.json) with SEED=1,
# alone on the GPU: does the 4-layer run's 92% multi-needle hold for another seed, and how long does the default
# run take when nothing else shares the GPU? Started detached:
#   setsid nohup bash bench/sessions/h100_session9.sh /tmp/s9 > /tmp/s9.log 2>&1 < /dev/null &
set -u
OUT=${1:?usage: h100_session9.sh OUT}
mkdir -p "$OUT"
SEED=1 WORKERS=12 bash bench/learning_proof/run.sh /tmp/lpS "$OUT/keepS" > "$OUT/S.log" 2>&1
echo "S rc=$? $(date +%T)"
tr '\r' '\n' < "$OUT/S.log" | grep -v "step/s\|it/s\]" > /tmp/lpS/run.log
tar czf "$OUT/S.tgz" --exclude='data_*' --exclude=checkpoints --exclude=init_model --exclude=train_1024/final_model \
  --exclude=train_2048/final_model --exclude=train_4096/final_model -C /tmp lpS
echo "== done $(date +%T)"
