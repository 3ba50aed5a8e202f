#!/usr/bin/env bash
# One H100 session (2026-11-22), OUT=$1:
#  1. issue 3's GPU row: train.py on the Llama-3.1-8B shape at 8 of 32 layers, 64K tokens per sample, ZeRO-3 with
#     parameters and optimizer on CPU, the fork's offloaded checkpointing, Liger, varlen attention, bf16;
#     long documents from the Python standard library's sources; metrics.jsonl -> $OUT/train8b_metrics.jsonl
#  2. issue 8's learning proof (bench/learning_proof/run.sh), its files packed into $OUT/learning_proof.tgz
set -u
OUT=${1:?usage: h100_train_and_proof.sh OUT}
python3 - <<'PY'
import glob, json, sysconfig
c = json.load(open("longctx/default_data/llama3.1-8b.json"))
c["num_hidden_layers"] = 8
json.dump(c, open("/tmp/llama8b_8l.json", "w"))
text = "".join(open(p, errors="ignore").read() for p in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py")))
with open("/tmp/long.jsonl", "w") as f:
    for i in range(6):
        f.write(json.dumps({"text": text[i * 400_000:(i + 1) * 400_000]}) + "\n")
PY
timeout 240 python3 train.py --deepspeed ds_configs/zero3_offload.json --model /tmp/llama8b_8l.json \
  --data /tmp/long.jsonl --max-seq-len 65536 --offload-gradient-checkpointing --liger on --max-steps 4 \
  --eval-fraction 0 --log-interval 1 --lr 1e-5 --output-dir /tmp/r8 --no-save-final-model > /tmp/r8.log 2>&1
echo "train.py rc=$?"
cp /tmp/r8/metrics.jsonl "$OUT/train8b_metrics.jsonl" 2>/dev/null
grep -E "ledger|attention|precision|liger|Liger|error|Error" /tmp/r8.log | grep -v Warning | head -12
python3 -c "
import json
for l in open('/tmp/r8/metrics.jsonl'):
    r = json.loads(l); print({k: r[k] for k in r if k in ('step','loss','step_time_s','tokens_per_s','tflops','mfu','peak_gpu_mem_gb','host_rss_gb','hfu')})
" 2>&1 | tail -5
TRAIN_SECONDS=${TRAIN_SECONDS:-150} bash bench/learning_proof/run.sh /tmp/lp /tmp/lpkeep > /tmp/lp.log 2>&1
echo "learning proof rc=$?"
tar czf "$OUT/learning_proof.tgz" -C /tmp/lpkeep . 2>/dev/null
cp /tmp/lp.log "$OUT/learning_proof.log"
grep -E "^== |accuracy|Accuracy|ppl|error|Error" /tmp/lp.log | grep -v Warning | tail -25
