#!/usr/bin/env bash
# One 2xH200 session (2026-11-22; the 4-GPU host was not lent): the 8B ladder (8 of 32 layers) at 48 and 16 GiB
# caps and the sequence-parallel rows (Ulysses over both GPUs), back to back in the background:
#   RESULTS=/tmp/results setsid nohup bash bench/sessions/2xh200_ladder.sh > /tmp/chain.log 2>&1 &
# Budgets are per worker process and include the model init; a killed worker keeps the rows it measured.
set -u
R=${RESULTS:-/tmp/results}
mkdir -p "$R"
run() { echo "=== $(date +%T) $*"; python3 -m bench.run --results-dir "$R" "$@"; echo "=== $(date +%T) rc=$?"; }
common=(--shape llama3.1-8b --gpus 2 --layers 8)
run "${common[@]}" --cap 48 --techniques baseline,liger,fork_offload --lengths 16K,32K,64K,128K,256K \
    --search --search-limit 2M --budget-s 150 --master-port 29511 -- --search-techniques fork_offload
run "${common[@]}" --cap 48 --techniques sp_tiled --lengths 128K,512K \
    --search --search-limit 8M --budget-s 130 --master-port 29512 -- --search-techniques sp_tiled
run "${common[@]}" --cap 16 --techniques baseline,fork_offload --lengths 8K,16K,32K,64K \
    --search --search-limit 1M --budget-s 90 --master-port 29513 -- --search-techniques fork_offload
run "${common[@]}" --cap 16 --techniques sp_tiled --lengths 64K,128K \
    --search --search-limit 4M --budget-s 90 --master-port 29514 -- --search-techniques sp_tiled
echo "=== $(date +%T) all done"
