#!/usr/bin/env python
"""Full-parameter long-context fine-tuning with DeepSpeed, end to end.

    deepspeed train.py --deepspeed ds_configs/zero3_offload.json            # the embedded default
    deepspeed --num_gpus 8 train.py --deepspeed ds_configs/zero3_offload.json --config my.yaml
    python train.py --plan --gpus 4 --gpu-mem 48GiB ...                     # the memory plan, no GPU needed
    python train.py --prepare-data --data big.jsonl --max-seq-len 131072    # tokenize once into the data cache

main(): parse the typed config -> either print the memory plan, or run the Trainer: check every input and
resolve every "auto" once (nothing is written before) -> distributed, preflight, run directory -> model and
DeepSpeed engine -> the loop (eval, metrics, checkpoints) -> the consolidated Hugging Face model.

Where things live: longctx/config.py (arguments), resolve.py (every "auto", decided once: resolved.json; its
memory-plan decisions in placement.py, the machine in facts.py), trainer.py (the loop), dist.py (ranks, the process
group, the reduction over ranks), data.py (the run's training data), documents.py (formats, ledger),
tokenization.py (labels, SFT truncation), batching.py (packing, batch schedule), attention.py (kernels), modeling.py
(model, Liger, checkpointing, loss), sequence_parallel.py (Ulysses), tiled_mlp.py (MLP in chunks), dsconfig.py
(ds_config), checkpoint.py (atomic save / exact resume, the final model), metrics.py (metrics.jsonl, progress),
runs.py (run dir), plan*.py + preflight.py (memory plan), lora.py + s2attn.py (LongLoRA mode).
"""

from __future__ import annotations

import os
import sys

from longctx import config as config_mod
from longctx.dist import env as dist_env  # also bench/train_bench.py's: a plain `python` becomes a world of one
from longctx.errors import LongctxError


def main(argv: list[str] | None = None, callbacks=()) -> int:
    rank, world, local_rank = dist_env()
    try:
        cfg = config_mod.parse(argv)
        if cfg.plan:
            from longctx.plan_report import cli_plan

            if rank == 0:
                print(cli_plan(cfg), flush=True)
            return 0
        from longctx import trainer

        if cfg.prepare_data:
            trainer.prepare_data(cfg, rank=rank, world=world)
            return 0
        trainer.run(cfg, rank=rank, world=world, local_rank=local_rank, callbacks=callbacks)
        return 0
    except LongctxError as e:
        # Every rank says it: the launcher stops all ranks once one exits, so a message left to rank 0 alone was
        # lost whenever another rank exited first (seen under load in CI).
        print(f"\nerror{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
        return e.exit_code


def exit_now(rc: int) -> None:
    """Leave with `rc` once the run's outcome is on disk and on the terminal, skipping interpreter teardown.

    After a complete 2-rank CPU run (final model written, summary printed, process group destroyed), one rank once
    aborted in teardown ("terminate called without an active exception", rc -6: a C++ thread of a library left
    joinable at exit), and the launcher reported the finished run as failed. Nothing of ours needs teardown: every
    file is written and closed by then (metrics are appended with a `with` block per row); stdio and logging are
    flushed here."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


if __name__ == "__main__":
    exit_now(main())
