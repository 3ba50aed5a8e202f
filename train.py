#!/usr/bin/env python
"""Full-parameter long-context fine-tuning with DeepSpeed, end to end.

    deepspeed train.py --deepspeed ds_configs/zero3_offload.json            # the embedded default
    deepspeed --num_gpus 8 train.py --deepspeed ds_configs/zero3_offload.json --config my.yaml

main(): parse config -> check every input (nothing is written before) -> build data -> model ->
DeepSpeed engine -> loop (eval, metrics, checkpoints) -> consolidated Hugging Face model.

Loss normalization: each optimizer step minimizes  sum(token CE) / N  over the target tokens of the
whole global batch (all ranks, all micro-batches); N is known in advance from the batch plan. Each
micro-batch backpropagates its CE sum x (world x grad_accum / N), which DeepSpeed's division by
grad_accum and averaging over ranks turns into exactly that. Packing, micro-batching, accumulation
and world size therefore do not change the gradient. The logged loss is the same global mean.

Where things live: longctx/config.py (arguments), data.py (formats, packing, batch plan, ledger),
attention.py (backend), modeling.py (model, Liger, checkpointing, loss), dsconfig.py (ds_config),
checkpoint.py (atomic save / exact resume), metrics.py (metrics.jsonl, progress), runs.py (run dir),
lora.py + s2attn.py (LongLoRA mode: --lora, --s2-attn, --merge).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path

from longctx import config as config_mod
from longctx.errors import LongctxError, TrainingDiverged


def dist_env() -> tuple[int, int, int]:
    """Rank, world size, local rank; a plain `python train.py` becomes a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def main(argv: list[str] | None = None) -> int:
    rank, world, local_rank = dist_env()
    try:
        cfg = config_mod.parse(argv)
        if cfg.plan:
            from longctx import plan

            if rank == 0:
                print(plan.cli_plan(cfg), flush=True)
            return 0
        train(cfg, rank, world, local_rank)
        return 0
    except LongctxError as e:
        if rank == 0:
            print(f"\nerror: {e}", file=sys.stderr, flush=True)
        return e.exit_code


def train(cfg, rank: int, world: int, local_rank: int) -> None:
    import torch

    from longctx import attention, checkpoint, data as data_mod, dsconfig, lora, modeling, runs, s2attn
    from longctx.sequence_parallel import Layout
    from longctx.metrics import Metrics

    say = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    quiet_libraries()

    # ---- 1. every check on the input, before anything is written ------------------------------
    device = attention.Device.detect()
    if device.kind == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    precision = modeling.resolve_precision(cfg.precision, device)
    use_liger = modeling.resolve_liger(cfg.liger, device)
    mode = runs.check_output_dir(cfg)
    tok, tok_path = modeling.load_tokenizer(cfg)
    model_config, kind = modeling.load_model_config(cfg, tok)
    modeling.check_offload(cfg, model_config)
    sp = Layout.from_config(cfg, model_config, rank, world)  # SP group, data-parallel rank, tiling
    attn = attention.choose(cfg.attn_implementation, device, precision=precision, packing=cfg.packing,
                            max_seq_len=cfg.max_seq_len, dense_mask_max_len=cfg.dense_mask_max_len)
    attn = s2attn.wrap_choice(attn, cfg)  # --s2-attn: S2-Attn over the chosen kernel, in training only
    lr = config_mod.resolved_lr(cfg)
    ds_config = sp.ds_config(dsconfig.build(cfg.deepspeed, cfg, world_size=sp.dp_world, precision=precision,
                                            lr=lr, hidden_size=model_config.hidden_size,
                                            on_cuda=device.kind == "cuda"))
    data = data_mod.build(cfg, tok, sp.dp_world)
    resume_from = None
    if cfg.resume:
        if mode == "resume":
            runs.check_resume_compatible(cfg, world)
        resume_from = checkpoint.resolve_resume(cfg.resume, cfg.output_dir)
    plan = data.plan
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    say(f"device {device.name} x{world} | precision {precision} | attention {attn.impl} ({attn.note}) | "
        f"liger {'on' if use_liger else 'off'} | checkpointing "
        f"{'offloaded' if cfg.offload_gradient_checkpointing else 'on' if cfg.gradient_checkpointing else 'off'}")
    say(f"model {cfg.model} ({kind}, {model_config.model_type}) | tokenizer {tok_path} | lr {lr:g}")
    say(f"ds_config {cfg.deepspeed}: ZeRO-{ds_config['zero_optimization'].get('stage', 0)}, train_batch_size "
        f"{ds_config['train_batch_size']} = {cfg.micro_batch_size} x {cfg.grad_accum} x {sp.dp_world}")
    say(sp.describe(attn.impl))
    say(data.ledger.format())
    say(f"steps: {total_steps} ({plan.steps_per_epoch} per epoch)"
        + (f"; resuming from {resume_from}" if resume_from else ""))

    # ---- 2. distributed, run directory -------------------------------------------------------
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.kind == "cuda" else "gloo")
    barrier = torch.distributed.barrier
    if device.kind == "cpu":
        barrier()  # every rank has mapped every peer's buffer: the names can go
        release_deepspeed_shm(rank)
    if cfg.preflight:  # refuse what cannot fit now, not with an OOM hours in (all ranks agree)
        from longctx import plan as plan_mod, preflight

        setup = plan_mod.setup_from_config(cfg, world=world, model_config=model_config, ds_config=ds_config,
                                           precision=precision, use_liger=use_liger,
                                           attention=plan_mod.attention_kind(attn.impl, cfg.packing))
        preflight.run(setup, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)), say)
    if rank == 0:
        runs.create(cfg, mode, {"world_size": world, "device": device.name, "precision": precision,
                                "attention": attn.impl, "liger": use_liger, "lr": lr, "ds_config": ds_config,
                                "total_steps": total_steps, "model_kind": kind})
        (Path(cfg.output_dir) / "ledger.json").write_text(json.dumps(data.ledger.to_dict(), indent=2))
    barrier()

    # ---- 3. model and engine -----------------------------------------------------------------
    from transformers import get_scheduler

    model = modeling.build_model(cfg, model_config, kind, attn_impl=sp.core_attention(attn.impl),
                                 precision=precision, ds_config=ds_config, use_liger=use_liger)
    model = lora.apply(model, cfg, say)  # --lora: adapters + trainable embeddings/norms, the rest frozen
    model, mpu = sp.prepare_model(model, ds_config, varlen=attn.varlen_kwargs)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * total_steps)
    sched_kwargs = {"min_lr_rate": 0.1} if cfg.lr_scheduler == "cosine_with_min_lr" else None
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config, mpu=mpu,
        lr_scheduler=lambda opt: get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=warmup,
                                               num_training_steps=total_steps, scheduler_specific_kwargs=sched_kwargs))
    dev = engine.device
    start_step = 0
    if resume_from is not None:
        client = checkpoint.load(engine, resume_from, rank)
        start_step = int(client["step"])
        say(f"resumed at step {start_step} from {resume_from}")
    zero3 = dsconfig.is_zero3(ds_config)

    # ---- 4. the loop -------------------------------------------------------------------------
    n_layers = model_config.num_hidden_layers
    metrics = Metrics(cfg.output_dir, rank=rank, world=world, model_config=model_config, precision=precision,
                      total_steps=total_steps, start_step=start_step,
                      recompute_layers=n_layers if cfg.gradient_checkpointing else 0,
                      device_name=device.name if device.kind == "cuda" else None, count_flops=not cfg.lora)
    guard = DivergenceGuard(precision, ds_config, cfg.fp16_collapse_patience, engine)
    if data.eval_rows and start_step == 0:
        evaluate(engine, data, cfg, pad_id, attn, sp, dev, max_batches=1)  # the longest eval batch, before step 0
    engine.train()
    for step in range(start_step, total_steps):
        done = step + 1  # optimizer steps completed after this one: the number used in logs and checkpoints
        metrics.start_step()
        n_targets = plan.step_targets(step)
        scale = sp.loss_scale(cfg.grad_accum, n_targets)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m, rows in enumerate(plan.micro_batches(step, sp.dp_rank)):
            batch = sp.collate(data.train_docs, [plan.rows[r] for r in rows], pad_id=pad_id,
                               packing=cfg.packing, max_seq_len=cfg.max_seq_len, flatten=attn.varlen_kwargs)
            loss = engine(input_ids=batch["input_ids"].to(dev), position_ids=batch["position_ids"].to(dev),
                          labels=batch["labels"].to(dev), **attention.model_kwargs(batch, attn, dev))
            if rank == 0 and m == 0 and nan_injected(done):
                loss = loss * float("nan")  # test hook: a fault the guard must catch
            engine.backward(loss * scale)
            engine.step()
            loss_sum += loss.detach().double().cpu()
        step_loss = all_reduce_sum(loss_sum, dev) / n_targets
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        guard.check(engine, done, step_loss, grad_norm, data.step_sample_ids(step))
        train_seconds = metrics.elapsed()

        eval_loss = None
        if data.eval_rows and ((cfg.eval_interval and done % cfg.eval_interval == 0) or done == total_steps):
            eval_loss = evaluate(engine, data, cfg, pad_id, attn, sp, dev)
        metrics.log_samples(done, data.step_sample_ids(step))
        doc_lens = [len(data.train_docs[d]) for r in plan.step_rows(step) for d in plan.rows[r]]
        metrics.end_step(done, epoch=step // plan.steps_per_epoch, loss=step_loss, lr=scheduler.get_last_lr()[0],
                         grad_norm=grad_norm, tokens=sum(doc_lens), doc_lens=doc_lens,
                         skipped_steps=guard.skipped, loss_scale=guard.loss_scale,
                         log=done % cfg.log_interval == 0 or done == total_steps or eval_loss is not None,
                         eval_loss=eval_loss, seconds=train_seconds)
        if (cfg.save_interval and done % cfg.save_interval == 0) or done == total_steps:
            client_state = {"step": done, "epoch": step // plan.steps_per_epoch,
                            "step_in_epoch": done - (step // plan.steps_per_epoch) * plan.steps_per_epoch,
                            "world_size": world, "skipped_steps": guard.skipped}
            checkpoint.save(engine, cfg.output_dir, done, client_state, cfg.keep_last, rank=rank, barrier=barrier)
        checkpoint.pause_for_tests("AFTER_STEP", done, Path(cfg.output_dir), rank)
    metrics.close()

    # ---- 5. the consolidated Hugging Face model --------------------------------------------------
    if cfg.save_final_model and cfg.lora:  # <output-dir>/adapter (+ final_model with --merge)
        for path in lora.save_final(engine, tok, cfg, rank, zero3, barrier):
            say(f"saved {path}")
    elif cfg.save_final_model:
        path = save_final_model(engine, tok, cfg.output_dir, rank, zero3, barrier)
        say(f"saved {path}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def release_deepspeed_shm(rank: int) -> None:
    """DeepSpeed's CPU backend maps a 66 MB shared-memory all-reduce buffer per rank under /dev/shm and never
    unlinks it, so every CPU run (or killed run) leaves it behind in RAM. Unlinking our own name once all ranks
    have mapped it keeps the mapping alive and frees the memory when the processes exit."""
    port = os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_{rank}"):
        path.unlink(missing_ok=True)


def nan_injected(step: int) -> bool:
    """Test hook: LONGCTX_TEST_NAN_AT_STEP=k poisons the loss of step k on rank 0; "k+" of every step from k."""
    v = os.environ.get("LONGCTX_TEST_NAN_AT_STEP", "")
    return bool(v) and (step >= int(v[:-1]) if v.endswith("+") else step == int(v))


def all_reduce_sum(x, dev):
    import torch

    if torch.distributed.get_world_size() == 1:
        return float(x)
    t = x.to(dev)
    torch.distributed.all_reduce(t)
    return float(t)


def evaluate(engine, data, cfg, pad_id, attn, sp, dev, max_batches: int | None = None) -> float:
    """Target-token mean loss over the eval rows (the first `max_batches` batches only, if given). Every rank
    runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank without rows left repeats
    row 0 and discards it."""
    import torch

    from longctx import attention

    rank, world = sp.dp_rank, sp.dp_world  # an SP group evaluates its rows together
    rows, per = data.eval_rows, world * cfg.micro_batch_size
    tot = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for b in range(min(math.ceil(len(rows) / per), max_batches or math.inf)):
            idx = [i for i in range(b * per + rank * cfg.micro_batch_size, b * per + (rank + 1) * cfg.micro_batch_size)
                   if i < len(rows)]
            batch = sp.collate(data.eval_docs, [rows[i] for i in (idx or [0])], pad_id=pad_id,
                               packing=cfg.packing, max_seq_len=cfg.max_seq_len, flatten=attn.varlen_kwargs)
            loss = engine(input_ids=batch["input_ids"].to(dev), position_ids=batch["position_ids"].to(dev),
                          labels=batch["labels"].to(dev), **attention.model_kwargs(batch, attn, dev))
            if idx:
                tot += torch.tensor([float(loss), batch["n_targets"]], dtype=torch.float64)
    engine.train()
    if torch.distributed.get_world_size() > 1:
        t = tot.to(dev)
        torch.distributed.all_reduce(t)
        tot = t.cpu()
    return float(tot[0] / tot[1])


class DivergenceGuard:
    """Stops the run instead of training on garbage.

    bf16/fp32: a non-finite loss or grad norm stops at once (step and sample ids in the message).
    fp16: overflowing steps are skipped by DeepSpeed's dynamic loss scaler and counted here; if the
    scale sits at min_loss_scale and steps keep overflowing `patience` times in a row, it stops.
    """

    def __init__(self, precision: str, ds_config: dict, patience: int, engine):
        self.fp16 = precision == "fp16"
        self.min_scale = float(ds_config.get("fp16", {}).get("min_loss_scale", 1))
        self.patience = patience
        self.skipped = int(getattr(engine, "skipped_steps", 0))  # restored by a resumed checkpoint
        self.collapsed = 0
        self.loss_scale = None
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        if self.fp16 and hasattr(scaler, "raise_error_at_min_scale"):
            # DeepSpeed would raise a bare exception at the first overflow at the minimum scale; this
            # guard stops instead, after `patience` of them, with a diagnosis.
            scaler.raise_error_at_min_scale = False

    def check(self, engine, step: int, loss: float, grad_norm: float | None, sample_ids: list[str]) -> None:
        ids = ", ".join(sample_ids[:20]) + (f", ... ({len(sample_ids)} in all)" if len(sample_ids) > 20 else "")
        if self.fp16:
            skipped = int(getattr(engine, "skipped_steps", 0))
            overflow = skipped > self.skipped
            self.skipped = skipped
            opt = engine.optimizer
            scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
            self.loss_scale = float(scale) if scale is not None else None
            if overflow and self.loss_scale is not None and self.loss_scale <= self.min_scale:
                self.collapsed += 1
            else:
                self.collapsed = 0
            if self.collapsed >= self.patience:
                raise TrainingDiverged(
                    f"fp16 loss scale collapsed: at step {step} the scale is at its minimum ({self.min_scale:g}) and "
                    f"the last {self.collapsed} steps overflowed anyway ({self.skipped} skipped in all). The "
                    "gradients are inf/NaN even unscaled, so training has diverged or the values exceed fp16's "
                    f"range. Last loss {loss:.4g}; samples of the step: {ids}. Try a lower --lr, a smaller "
                    "--max-grad-norm, or bf16 on sm80+ GPUs.")
            return
        if not math.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss ({loss}) at step {step}; samples of the step: {ids}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite grad norm ({grad_norm}) at step {step} (loss {loss:.4g}); "
                                   f"samples of the step: {ids}")


def save_final_model(engine, tok, output_dir: str, rank: int, zero3: bool, barrier) -> Path:
    """Gather the full weights (ZeRO-3: layer by layer onto rank 0) and write a from_pretrained-able
    directory atomically: final_model.tmp, then a rename."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero3 else (
        engine.module.state_dict() if rank == 0 else None)
    out = Path(output_dir) / "final_model"
    if rank == 0:
        lm = engine.module.lm
        state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
    return out


def quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
