#!/usr/bin/env bash
# Why is an 8K step of the 2-layer proof model ~0.6 s when attempt 1's larger model took ~0.085 s? Times 25 train.py
# steps at 8K on the same documents for each model config given (default: attempt 1's and the current one).
# Usage: bash bench/learning_proof/diag/steptime.sh DATA.jsonl OUT [MODEL.json ...]
set -u
DATA=${1:?}; OUT=${2:?}; shift 2
MODELS=("$@"); [ ${#MODELS[@]} -gt 0 ] || MODELS=(bench/learning_proof/diag/attempt1_model.json bench/learning_proof/model.json)
mkdir -p "$OUT"
for m in "${MODELS[@]}"; do
  name=$(basename "$m" .json)
  python3 -c "from bench.learning_proof import make_data as d; d.init_model('$m', 'longctx/default_data/tokenizer', __import__('pathlib').Path('$OUT/init_$name'), 1)"
  python3 train.py --config bench/learning_proof/train.yaml --overwrite --model "$OUT/init_$name" --data "$DATA" \
    --output-dir "$OUT/run_$name" --max-steps 25 --log-interval 1 --no-save-final-model > "$OUT/$name.log" 2>&1
  python3 - "$OUT/run_$name/metrics.jsonl" "$name" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
t = [r["step_time_s"] for r in rows[5:]]
print(f"{sys.argv[2]}: median step {statistics.median(t):.3f} s over {len(t)} steps, {statistics.median(r['tokens'] for r in rows):.0f} tokens/step")
PY
done
