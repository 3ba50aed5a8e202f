#!/usr/bin/env bash
# One 4xH200 session (2026-11-22): the 8B ladder at 48 and 16 GiB caps and the SP rows, run back to back in the
# background (`setsid nohup bash bench/sessions/4xh200_ladder.sh &`), results under $RESULTS (default /tmp/results).
# Budgets are per worker process and include the model init; a killed worker keeps the rows it measured.
set -u
R=${RESULTS:-/tmp/results}
mkdir -p "$R"
run() { echo "=== $(date +%T) $*"; python3 -m bench.run --results-dir "$R" "$@"; echo "=== $(date +%T) rc=$?"; }
run --shape llama3.1-8b --gpus 4 --cap 48 --layers 8 --techniques baseline,liger,fork_offload \
    --lengths 16K,32K,64K,128K,256K --search --search-limit 2M --budget-s 270 --master-port 29511 \
    -- --search-techniques fork_offload
run --profile 4xh200-8b-48g-sp --budget-s 270 --master-port 29512
run --shape llama3.1-8b --gpus 4 --cap 16 --layers 8 --techniques baseline,fork_offload \
    --lengths 8K,16K,32K,64K --search --search-limit 1M --budget-s 150 --master-port 29513 \
    -- --search-techniques fork_offload
run --profile 4xh200-8b-16g-sp --budget-s 150 --master-port 29514
echo "=== $(date +%T) all done"
