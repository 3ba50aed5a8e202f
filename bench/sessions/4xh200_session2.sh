#!/usr/bin/env bash
# Second 4xH200 session (2026-11-22, 30 min of device time for everything): the 8B shape at 8 of 32 layers,
# ordered by what the issues need most. Start detached (`setsid nohup bash bench/sessions/4xh200_session2.sh &`);
# results under $RESULTS (default /tmp/results); a killed worker keeps the rows it measured.
#   1. 48 GiB, Ulysses SP=4: sp_tiled to 1M (the >= 1M target), then sp without tiled MLP (the ablation)
#   2. 48 GiB, data parallel: the ladder with the baseline in the same run, and tiled MLP alone
#   3. 48 GiB, LoRA and LongLoRA at the fixed lengths of 2 (issue 7's row, same run id)
#   4. 16 GiB, SP=4 + tiled MLP to 512K (the >= 512K target)
#   5. 16 GiB, data parallel: baseline and the fork's stack
set -u
R=${RESULTS:-/tmp/results}
mkdir -p "$R"
run() { echo "=== $(date +%T) $*"; python3 -m bench.run --results-dir "$R" "$@"; echo "=== $(date +%T) rc=$?"; }
M8=(--shape llama3.1-8b --gpus 4 --layers 8 --no-search)
run "${M8[@]}" --cap 48 --techniques sp_tiled,sp --lengths 128K,512K,1M --budget-s 620 --master-port 29511
run "${M8[@]}" --cap 48 --techniques baseline,upstream_offload,liger,fork_offload,tiled_mlp --lengths 16K,32K,64K,128K \
    --budget-s 330 --master-port 29512
run "${M8[@]}" --cap 48 --techniques lora,longlora --lengths 16K,32K,64K,128K --budget-s 200 --master-port 29513
run "${M8[@]}" --cap 16 --techniques sp_tiled --lengths 128K,256K,512K --budget-s 330 --master-port 29514
run "${M8[@]}" --cap 16 --techniques baseline,fork_offload --lengths 8K,16K,32K,64K --budget-s 160 --master-port 29515
echo "=== $(date +%T) all done"
