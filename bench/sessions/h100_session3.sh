#!/usr/bin/env bash
# Third GPU session's single-GPU call (2026-11-22), OUT=$1; each part writes to $OUT before the next starts, so a
# call cut short keeps what finished.
#  1. issue 4: the 3B ladder's missing rung, `fork_offload`, appended to the same run id as the rest of that ladder
#     (its earlier worker was killed by the host's OOM killer at the `liger` rung's 128K: pinned memory cached by
#     upstream's offload across rungs); a fresh worker holds only this rung.
#     (2026-11-22 it ran with RUNG_TIMEOUT=230, too short for the 80 s init + 128K: that try was killed.)
#  2. issue 8: the learning proof (bench/learning_proof/run.sh), if LP=1.
set -u
OUT=${1:?usage: h100_session3.sh OUT}
RUN=2026-11-22_h100_llama3.2-3b_1x_nocap
timeout ${RUNG_TIMEOUT:-420} python3 -m bench.run --profile 1xgpu-3b --resume "$RUN" --techniques fork_offload \
  --budget-s "${RUNG_BUDGET:-230}" > /tmp/rung.log 2>&1
echo "3B rung rc=$?"
grep -E "\[bench |rows|resume" /tmp/rung.log | tail -12
tar czf "$OUT/rung.tgz" bench/results/$RUN.json bench/results/raw/$RUN.jsonl /tmp/rung.log 2>/dev/null
[ "${LP:-0}" = 1 ] || exit 0
bash bench/learning_proof/run.sh /tmp/lp /tmp/lpkeep > /tmp/lp.log 2>&1
echo "learning proof rc=$?"
tar czf "$OUT/learning_proof.tgz" -C /tmp/lpkeep . 2>/dev/null
cp /tmp/lp.log "$OUT/learning_proof.log"
grep -E "^== |error|Error" /tmp/lp.log | grep -v Warning | tail -25
