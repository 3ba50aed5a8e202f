#!/usr/bin/env bash
# Seventh GPU session's single-GPU job (2026-11-22), issue 8's learning proof, sixth attempt. Started detached:
#   setsid nohup bash bench/sessions/h100_session7.sh /tmp/s7 > /tmp/s7.log 2>&1 < /dev/null &
# Two run.sh side by side on the one GPU (a 2.6M-parameter model leaves most of it idle), same stages, seed and
# data; they differ only in the model: A is bench/learning_proof/model.json, B the same with tied input and
# output embeddings (a copy head then only has to map a token's embedding onto itself). Attempt 5 found the
# first digit chunk of an answer mostly right and later chunks wrong (CPU, attempt 4's model: " 40739" ->
# " 40721"), so the copy's precision, not only its reach, is in question.
# Each run's OUT, its first stage's and its final model come back as OUT/<run>.tgz.
set -u
OUT=${1:?usage: h100_session7.sh OUT}
mkdir -p "$OUT"
python3 - "$OUT/model_tied.json" <<'PY'
import json, sys
cfg = json.load(open("bench/learning_proof/model.json"))
cfg["tie_word_embeddings"] = True
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
WORKERS=6 bash bench/learning_proof/run.sh /tmp/lpA "$OUT/keepA" > "$OUT/A.log" 2>&1 &
A=$!
sleep 20  # A's first data and init first: the two do not start their stages in lockstep
MODEL_CONFIG="$OUT/model_tied.json" WORKERS=6 bash bench/learning_proof/run.sh /tmp/lpB "$OUT/keepB" > "$OUT/B.log" 2>&1 &
B=$!
wait $A; echo "A rc=$? $(date +%T)"
pack() {  # RUN NAME: everything small of the run, the first stage's and the final model (16 MiB a file back)
  tar czf "$OUT/$2.tgz" --exclude='data_*' --exclude=checkpoints --exclude=init_model --exclude=train_1024/final_model \
    --exclude=train_2048/final_model --exclude=train_4096/final_model -C "$(dirname "$1")" "$(basename "$1")"
}
pack /tmp/lpA A
wait $B; echo "B rc=$? $(date +%T)"
pack /tmp/lpB B
echo "== done $(date +%T)"
