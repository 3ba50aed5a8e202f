"""GPU benchmark of the fork's offloaded checkpointing against plain and upstream-offloaded checkpointing.

One process, one GPU, a Llama-3.1-8B-shaped decoder stack (default 8 of its 32 layers, random init, bf16) trained
forward + backward at each sequence length with each checkpointing mode, measured side by side:

    plain            activation_checkpointing_enable(): checkpoints on the GPU (non-reentrant, upstream's default)
    plain_reentrant  the same with use_reentrant=True
    fork             offload_gradient_checkpointing_enable(): pinned host memory, side-stream copies, prefetch
    fork_reentrant   the same through the reentrant autograd function (use_reentrant=True)
    upstream         activation_checkpointing_enable(offload=True): upstream 5.23, save_on_cpu on the compute stream

The language-model head is left out (the loss is the mean square of the last hidden state): at 128K its fp32 logits
alone are 67 GB, and it does not depend on the checkpointing mode. So the memory difference between `plain` and
`fork` should be the checkpoints themselves: layers x tokens x hidden x 2 bytes.

    python bench/offload_checkpointing.py --lengths 32768 131072 --out result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date

import torch

GiB = 1 << 30


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=1 << 20, rope_theta=500000.0,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaModel(config).to(torch.bfloat16)
    model.train()
    return model, config


def set_mode(model, mode: str) -> None:
    model.activation_checkpointing_disable()
    if mode == "plain":
        model.activation_checkpointing_enable()
    elif mode == "plain_reentrant":
        model.activation_checkpointing_enable({"use_reentrant": True})
    elif mode == "fork":
        model.offload_gradient_checkpointing_enable()
    elif mode == "fork_reentrant":
        model.offload_gradient_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    elif mode == "upstream":
        model.activation_checkpointing_enable(offload=True)
    else:
        raise ValueError(mode)


def step(model, input_ids) -> None:
    hidden = model(input_ids=input_ids).last_hidden_state
    hidden.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=False)


def measure(model, mode: str, seq_len: int, steps: int) -> dict:
    set_mode(model, mode)
    ids = torch.randint(0, 128256, (1, seq_len), device="cuda")
    row = {"mode": mode, "seq_len": seq_len}
    try:
        step(model, ids)  # warm-up: kernels, pinned-host cache, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row.update(
            status="ok",
            step_s=statistics.median(times),
            step_s_all=times,
            peak_gib=torch.cuda.max_memory_allocated() / GiB,
            peak_above_weights_gib=(torch.cuda.max_memory_allocated() - base) / GiB,
            reserved_gib=torch.cuda.max_memory_reserved() / GiB,
        )
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
    finally:
        del ids
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--modes", nargs="+", default=["plain", "fork", "upstream"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="offload_checkpointing.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    import transformers

    model, config = build_model(args.layers)
    rows = []
    for seq_len in args.lengths:
        for mode in args.modes:
            row = measure(model, mode, seq_len, args.steps)
            row["predicted_checkpoint_gib"] = args.layers * seq_len * config.hidden_size * 2 / GiB
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "offload_checkpointing",
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "gpus": 1,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config": {"shape": "Llama-3.1-8B", "layers": args.layers, "dtype": "bfloat16", "attention": "sdpa",
                   "loss": "mean square of the last hidden state (no LM head)", "steps": args.steps},
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'len':>7} {'mode':>9} {'s/step':>8} {'peak GiB':>9} {'vs ' + args.modes[0]:>9}")
    plain = {r["seq_len"]: r for r in rows if r["mode"] == args.modes[0] and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['seq_len']:>7} {r['mode']:>9} {'OOM':>8}")
            continue
        p = plain.get(r["seq_len"])
        ratio = f"{r['step_s'] / p['step_s']:.3f}x" if p else "-"
        print(f"{r['seq_len']:>7} {r['mode']:>9} {r['step_s']:8.2f} {r['peak_gib']:9.2f} {ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
