#!/usr/bin/env bash
# Eighth GPU session's single-GPU job (2026-11-22), issue 8's learning proof after attempt 6 (97% passkey, 24%
# multi-needle). Started detached:
#   setsid nohup bash bench/sessions/h100_session8.sh /tmp/s8 > /tmp/s8.log 2>&1 < /dev/null &
# Two run.sh side by side on the one GPU, the same stages and data as attempt 6:
#  R: attempt 6's recipe with another seed (SEED=1: another init, data and order): is 97% a lucky seed?
#  D: 4 layers instead of 2 (seed 0): multi-needle sat at ~1/4 at every stage, as if the lookup finds a needle
#     but not by its key; does depth give it the key match?
# Each run's OUT, its first stage's and its final model come back as OUT/<run>.tgz.
set -u
OUT=${1:?usage: h100_session8.sh OUT}
mkdir -p "$OUT"
python3 - "$OUT/model_4layers.json" <<'PY'
import json, sys
cfg = json.load(open("bench/learning_proof/model.json"))
cfg["num_hidden_layers"] = 4
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
PY
SEED=1 WORKERS=6 bash bench/learning_proof/run.sh /tmp/lpR "$OUT/keepR" > "$OUT/R.log" 2>&1 &
R=$!
sleep 20
MODEL_CONFIG="$OUT/model_4layers.json" WORKERS=6 bash bench/learning_proof/run.sh /tmp/lpD "$OUT/keepD" > "$OUT/D.log" 2>&1 &
D=$!
pack() {  # RUN NAME: everything small of the run, the first stage's and the final model (16 MiB a file back)
  tar czf "$OUT/$2.tgz" --exclude='data_*' --exclude=checkpoints --exclude=init_model --exclude=train_1024/final_model \
    --exclude=train_2048/final_model --exclude=train_4096/final_model -C "$(dirname "$1")" "$(basename "$1")"
}
wait $R; echo "R rc=$? $(date +%T)"
pack /tmp/lpR R
wait $D; echo "D rc=$? $(date +%T)"
pack /tmp/lpD D
echo "== done $(date +%T)"
