"""Profile train.py itself (CPU and CUDA): python bench/learning_proof/diag/train_profile.py TRAIN.PY-ARGS...
Prints the top ops by self CUDA time and by CPU total. For the 8K step that takes ~0.6 s in train.py while the
model's own fwd+bwd takes 20 ms (diag/attn_profile.py)."""
import runpy
import sys

import torch

sys.argv = ["train.py"] + sys.argv[1:]
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts) as prof:
    try:
        runpy.run_path("train.py", run_name="__main__")
    except SystemExit:
        pass
ka = prof.key_averages()
print(ka.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
print(ka.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70))
