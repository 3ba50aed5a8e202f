#!/usr/bin/env bash
# SmolLM2-135M-Instruct, 8K -> 32K, full-parameter, then eval before/after: the full-length run, not run on a GPU yet
# (the H200 run published in docs/RESULTS.md is gpu_run.sh with train_h200.yaml; see README.md).
# Usage (from the repository root, in the venv):  bash recipes/smollm2_32k/run.sh
set -euo pipefail
NGPU=${NGPU:-1}
EVAL_LONG="--tasks passkey,multi_needle,ppl --lengths 4096,8192,16384,32768 --samples 10 --needles 4
           --ppl-data data/smollm2-32k/eval_texts --ppl-seq-len 32768 --ppl-docs 16"
EVAL_SHORT="--tasks ppl --lengths 2048 --ppl-data data/smollm2-32k/eval_texts --ppl-seq-len 2048 --ppl-docs 64"

# 1. the model, native (8K, theta 1e5) and with the 32K config (theta 856,000: the NTK-aware factor for 64K, headroom)
python -m longctx.models.from_gguf --out models/smollm2-135m
python -m longctx.models.from_gguf --out models/smollm2-135m-32k --max-position-embeddings 32768 --rope-factor 8  # RoPE made for 64K: see README
# 2. the data: stdlib + /usr/share/doc groups up to 32K tokens, held-out groups, 20% short documents
python -m longctx.models.long_text_data --tokenizer models/smollm2-135m-32k --target-len 32768 --out data/smollm2-32k
# 3. before: the native model and the extended config, untrained
for m in smollm2-135m smollm2-135m-32k; do
  python eval.py --model models/$m $EVAL_LONG --output-dir runs/smollm2-32k/eval-before-$m
  python eval.py --model models/$m $EVAL_SHORT --output-dir runs/smollm2-32k/eval-short-before-$m
done
# 4. the fine-tune
deepspeed --num_gpus "$NGPU" train.py --config recipes/smollm2_32k/train.yaml --resume auto
# 5. after
python eval.py --model runs/smollm2-32k/final_model $EVAL_LONG --output-dir runs/smollm2-32k/eval-after
python eval.py --model runs/smollm2-32k/final_model $EVAL_SHORT --output-dir runs/smollm2-32k/eval-short-after
