"""Host time of the ways to checkpoint a decoder layer, attention kept or not, measured on the CPU.

A tiny Llama (the tests' shape, 8 layers, one 64-token document) does so little arithmetic that a step's time is
mostly the host's: Python, the dispatcher, autograd, checkpointing's bookkeeping. That is the cost a GPU hides only
while its kernels run longer, so it shows where steps are short (16K rows on an H200). Each way is built by
longctx.modeling.enable_checkpointing as train.py builds it, and all run interleaved, one step at a time, so that
a busy machine slows them alike; the median step is reported.

    python -m bench.keep_attention_host bench/results/<date>_cpu_keep_attention_host.json [--steps 40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from types import SimpleNamespace

import torch

LAYERS, TOKENS = 8, 64
# name: (keep_attention, keep_attention_by, reentrant); None: no checkpointing
WAYS = {
    "no checkpointing": None,
    "plain, reentrant (default under 64K)": (False, "selective", True),
    "plain, non-reentrant": (False, "selective", False),
    "kept by selective checkpointing (default from 64K)": (True, "selective", False),
    "kept by replay, reentrant": (True, "replay", True),
    "kept by replay, non-reentrant": (True, "replay", False),
}


def build(way):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx import attention, attention_replay, modeling
    from longctx.config import DEFAULT_MODEL
    from longctx.resolve import SDPA_PER_DOC

    shape = json.loads(open(DEFAULT_MODEL).read())  # the embedded tiny GQA Llama (hidden 128)
    shape["num_hidden_layers"] = LAYERS
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    impl = attention.register(SDPA_PER_DOC)
    if way is not None and way[0] and way[1] == "replay":
        impl = attention_replay.register(impl)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=impl)
    lm.config.use_cache = False
    lm.train()
    if way is not None:
        keep, by, reentrant = way
        modeling.enable_checkpointing(lm, SimpleNamespace(checkpointing="plain", offload_impl="fork", keep_attention=keep,
                                                          keep_attention_by=by, reentrant=reentrant,
                                                          num_offloaded_layers=0))
    return lm, config


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args(argv)
    import transformers

    from longctx import attention
    from longctx.resolve import SDPA_PER_DOC

    torch.set_num_threads(1)
    models = {name: build(way) for name, way in WAYS.items()}
    config = next(iter(models.values()))[1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, TOKENS), generator=g)
    pos = torch.arange(TOKENS)[None]
    kw = attention.model_kwargs({"cu_seq_lens": torch.tensor([0, TOKENS], dtype=torch.int32), "max_length": TOKENS},
                                SDPA_PER_DOC, ids.device)
    times = {name: [] for name in models}
    for i in range(a.steps + 2):
        for name, (lm, _) in models.items():
            lm.zero_grad(set_to_none=True)
            t = time.perf_counter()
            lm(input_ids=ids, position_ids=pos, **kw).logits.float().sum().backward()
            if i >= 2:  # two warmup steps
                times[name].append(time.perf_counter() - t)
    rows = []
    for name, ts in times.items():
        ts.sort()
        med = ts[len(ts) // 2]
        rows.append({"way": name, "median_step_ms": 1e3 * med, "per_layer_ms": 1e3 * med / LAYERS,
                     "min_step_ms": 1e3 * ts[0], "max_step_ms": 1e3 * ts[-1]})
    base = next(r for r in rows if r["way"].startswith("plain, reentrant"))["per_layer_ms"]
    for r in rows:
        r["per_layer_ms_over_plain_reentrant"] = r["per_layer_ms"] - base
    res = {"schema": "keep_attention_host", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
           "device": f"{cpu_name()}, 1 thread",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "command": "python -m bench.keep_attention_host " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": f"tiny Llama, {LAYERS} layers, one {TOKENS}-token document, fp32, forward + backward",
           "steps": a.steps, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    for r in rows:
        print(f"{r['way']:52s} {r['per_layer_ms']:7.3f} ms/layer ({r['per_layer_ms_over_plain_reentrant']:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
