"""Launcher-run worker for the Twin-Flow tests (tests/test_twin_flow.py): ZeRO-3, the optimizer offloaded with a
split (offload_optimizer.ratio), through longctx.zero3_optimizer, on a tiny fp32 MLP with fixed weights and data.

    deepspeed --num_gpus 2 tests/twin_flow_worker.py --out DIR [--ratio 0.5] [--stock-lr]

Rank 0 writes DIR/result.pt: each step's loss (the mean over ranks), lr and full weights (gathered), and which
sub-groups the backup AdamW updated. The reference is in the test (reference_run): the same model and batches in
plain torch, one process, torch.optim.AdamW, the same schedule and clipping. --stock-lr leaves out the lr hand-over
(DeepSpeed 0.19.8's behaviour) to show that the comparison catches it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

WIDTHS = (8, 32, 32, 32, 32, 4)       # Linear layers
SUB_GROUP_ELEMENTS = 400              # of all ranks' partitions per sub-group: 4 sub-groups on 1 or 2 ranks
STEPS, WARMUP, TOTAL = 8, 3, 10       # linear warmup then linear decay (still decaying at the last step)
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-2, (0.9, 0.95), 1e-8, 0.01, 0.05
BATCH = 16


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, WIDTHS[0], generator=g), torch.randn(BATCH, WIDTHS[-1], generator=g)


def lr_lambda(step: int) -> float:
    return (step + 1) / WARMUP if step < WARMUP else max(0.0, (TOTAL - step) / (TOTAL - WARMUP))


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def reference_run(world: int, steps: int = STEPS) -> list[dict]:
    """Plain torch, one process: the mean of the ranks' losses, AdamW, LambdaLR, clip_grad_norm_."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    out = []
    for step in range(steps):
        opt.zero_grad()
        loss = sum(loss_fn(model, *batch(step, r)) for r in range(world)) / world
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        out.append({"loss": float(loss.detach()), "lr": lr, "grad_norm": float(norm),
                    "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}})
    return out


def ds_config(world: int, ratio: float) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
            "gradient_clipping": CLIP, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                      "weight_decay": WEIGHT_DECAY}},
            "zero_optimization": {"stage": 3, "sub_group_size": SUB_GROUP_ELEMENTS // world,
                                  "stage3_param_persistence_threshold": 0,
                                  "offload_optimizer": {"device": "cpu", "ratio": ratio,
                                                        "pin_memory": torch.cuda.is_available()}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--stock-lr", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)  # the launcher's
    args = ap.parse_args()

    import deepspeed

    from longctx import opbuild, zero3_optimizer

    on_gpu = torch.cuda.is_available()
    opbuild.probe_cpu_once()  # as train.py's ranks do (longctx.dist.init)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not on_gpu:  # DeepSpeed's shared-memory all-reduce buffer, unlinked once every rank has it mapped
        from longctx.dist import release_deepspeed_shm

        torch.distributed.barrier()
        release_deepspeed_shm(rank)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cfg = ds_config(world, args.ratio)
    opbuild.prepare_cpu_adam(cfg, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                             barrier=torch.distributed.barrier, say=lambda *a, **k: None)
    model = make_model()

    class StockLr(zero3_optimizer.LongctxZeroStage3):
        """The backup AdamW keeps the hyperparameters it was built with, as in DeepSpeed 0.19.8."""

        def _optimizer_step(self, i):
            if i not in self.twin_flow_gpu:
                return super()._optimizer_step(i)
            backup = self.backup_optimizer.param_groups[self.sub_group_to_group_id[i]]
            backup["params"] = [self.fp32_partitioned_groups_flat[i]]
            self.backup_optimizer.step()
            backup["params"] = []

    with zero3_optimizer.installed():
        if args.stock_lr:
            from deepspeed.runtime.zero import stage3

            stage3.DeepSpeedZeroOptimizer_Stage3 = StockLr
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                          lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    zopt = engine.optimizer
    assert type(zopt).__name__ in ("LongctxZeroStage3", "StockLr"), type(zopt)
    rows = []
    for step in range(STEPS):
        x, y = (t.to(engine.device) for t in batch(step, rank))
        loss = loss_fn(engine, x, y)
        engine.backward(loss)
        lr = engine.get_lr()[0]
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
        rows.append({"loss": float(mean) / world, "lr": lr, "weights": weights})
    if rank == 0:
        torch.save({"rows": rows, "gpu_sub_groups": sorted(zopt.twin_flow_gpu), "sub_groups": len(zopt.fp16_groups),
                    "fp32_devices": [str(t.device) for t in zopt.fp32_partitioned_groups_flat]},
                   os.path.join(args.out, "result.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    import train

    main()
    train.exit_now(0)  # as train.py leaves: a library's C++ thread once aborted interpreter teardown (rc -6)
