"""Where does an 8K varlen step of the proof model spend its time? fwd+bwd of the model on 64K packed tokens
(cu_seqlens of 8K documents) through longctx_varlen, timed, with the profiler's top CUDA kernels."""
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from longctx import attention  # noqa: E402

cfg = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/learning_proof/model.json").read_text())
seq = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
config._attn_implementation = attention.register_varlen()
model = AutoModelForCausalLM.from_config(config).cuda().to(torch.bfloat16)
T = 65536
ids = torch.randint(3, 2000, (1, T), device="cuda")
pos = torch.arange(seq, device="cuda").repeat(T // seq)[None]
cu = torch.arange(0, T + 1, seq, device="cuda", dtype=torch.int32)
kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": seq, "max_length_k": seq}


def step():
    out = model(input_ids=ids, position_ids=pos, labels=ids, **kw)
    out.loss.backward()


for _ in range(3):
    step()
torch.cuda.synchronize()
t = time.time()
for _ in range(5):
    step()
torch.cuda.synchronize()
print(f"seq {seq}: {(time.time() - t) / 5:.4f} s per fwd+bwd of {T} tokens", flush=True)
q = torch.randn(T, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(T, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(T, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
kern = attention.torch_varlen_attn()
for gqa in (True, False):
    kk, vv = (k, v) if gqa else (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    for _ in range(2):
        attention.call_varlen(kern, q, kk, vv, cu, seq, None).sum().backward()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(5):
        attention.call_varlen(kern, q, kk, vv, cu, seq, None).sum().backward()
    torch.cuda.synchronize()
    print(f"varlen_attn alone, kv heads {kk.shape[1]}: {(time.time() - t) / 5 * 1000:.1f} ms fwd+bwd", flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
