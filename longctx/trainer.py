"""The Trainer: one checkpointable training loop over the DeepSpeed engine, used by train.py and the benchmark.

    trainer = Trainer(cfg, rank=..., world=..., local_rank=...)
    trainer.prepare()    every check on the input and the one resolution of "auto" (longctx.resolve), the data and
                         with them the schedule (nothing written, no GPU work)
    trainer.setup()      the process group (longctx.dist), preflight, the run directory (longctx.runs)
    trainer.build()      model and engine, resume from a checkpoint
    trainer.fit()        the loop: steps, eval, metrics, checkpoints
    trainer.save_final() the final model (checkpoint.save_final_model, or lora.save_final)

This module keeps the loop and its state (state_dict / load_state_dict, saved in every checkpoint); what the loop
calls lives with what it is about: settings in resolve, ranks and reductions in dist, files in runs and checkpoint.

Loss normalization: each optimizer step minimizes  sum(token CE) / N  over the target tokens of the whole global
batch (all ranks, all micro-batches); N is known in advance from the batch schedule. Each micro-batch backpropagates
its CE sum x (world x grad_accum / N), which DeepSpeed's division by grad_accum and averaging over ranks turns into
exactly that. Packing, micro-batching, accumulation and world size therefore do not change the gradient.

Callbacks (class Callback) are how a test or a tool reaches into the loop: a fault injected into the loss, a pause
in a checkpoint save, a hook on the built model. Product code has no test switches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import (attention, checkpoint, data as data_mod, dist, dsconfig, gpu_extras, lora, modeling, opbuild,
               overlap_step, preflight, resolve, resume, runs, sequence_parallel, tiled_mlp, universal)
from .divergence import DivergenceGuard
from .errors import GpuOutOfMemory, LongctxError
from .metrics import Metrics, PhaseClock, lr_in_use
from .plan_settings import setup_from_resolved


class Callback:
    """Hooks into the Trainer; override what you need. Every rank calls them."""

    def on_built(self, trainer: "Trainer") -> None:
        """The model and engine exist (resume done)."""

    def on_loss(self, trainer: "Trainer", step: int, micro: int, loss):
        """A micro-batch's loss before backward; return the loss to backpropagate."""
        return loss

    def on_checkpoint_written(self, trainer: "Trainer", step: int, path: Path) -> None:
        """A checkpoint's files are written, before it is marked complete."""

    def on_universal_written(self, trainer: "Trainer", path: Path) -> None:
        """Rank 0: a checkpoint's universal form is written in `path` (its .tmp), before it is renamed into place."""

    def on_step_end(self, trainer: "Trainer", step: int, row: Optional[dict]) -> None:
        """After optimizer step `step` (1-based), its checkpoint included."""


class BuildDiffers(LongctxError):
    """Trainer.retarget: the new config would train another build than the one in hand (build a fresh one)."""


@dataclass
class StepResult:
    loss: float          # mean target-token CE over the global batch
    grad_norm: Optional[float]


class Trainer:
    def __init__(self, cfg, *, rank: int = 0, world: int = 1, local_rank: int = 0,
                 callbacks: Sequence[Callback] = (), data=None, facts=None, quiet: bool = False):
        self.cfg, self.rank, self.world, self.local_rank = cfg, rank, world, local_rank
        self.callbacks = list(callbacks)
        self.data = data  # a data.DataBundle to train on instead of cfg.data (the benchmark's synthetic rows)
        self.facts = facts
        self.say = functools.partial(print, flush=True) if rank == 0 and not quiet else (lambda *a, **k: None)
        self.engine = None
        self.step = 0  # optimizer steps completed
        self.activity = "building the model and the DeepSpeed engine"  # what a GPU out-of-memory report names

    # ---- 1. every check, and the one resolution ------------------------------------------------------------
    def prepare(self) -> "Trainer":
        cfg = self.cfg
        dist.quiet_libraries()
        local_world = dist.local_world(self.world)
        self.facts = self.facts or resolve.Facts.detect(gpus=local_world)  # GPUs sharing this host's RAM
        if self.facts.cuda:
            torch.cuda.set_device(self.local_rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        self.mode = runs.check_output_dir(cfg)
        self.tok, self.tok_path = modeling.load_tokenizer(cfg)
        self.model_config, self.kind = modeling.load_model_config(cfg, self.tok)
        sequence_parallel.check(cfg.sequence_parallel, self.world, self.model_config)
        self.identity = resume.identity(cfg, self.tok, self.model_config) if self.data is None else {}
        self.resume_from, self.resuming = None, None
        if cfg.resume:  # before anything is loaded: what must stay the same, and the global batch kept
            record, allowed = {}, []
            if self.mode == "resume":
                record = runs.read_run_record(Path(cfg.output_dir))
                runs.check_resume_compatible(cfg)
                allowed = resume.check_identity(cfg, record, self.identity)
            self.resume_from = checkpoint.resolve_resume(cfg.resume, cfg.output_dir)
            if self.resume_from is not None:
                if not record and (self.resume_from.parent.parent / runs.RUN_FILE).is_file():
                    record = runs.read_run_record(self.resume_from.parent.parent)
                cfg, self.resuming = resume.keep_global_batch(cfg, self.resume_from, record, self.world,
                                                                 allowed)
                self.cfg = cfg
        self.settings = resolve.resolve(cfg, self.facts, self.model_config, self.world)
        if self.resuming is not None:
            resume.check_stage(self.resuming, self.settings.ds_config)
        if self.settings.checkpointing == "offload" and self.settings.offload_impl == "fork":
            modeling.check_offload_supported(self.model_config)
        self.layout = sequence_parallel.Layout.for_run(cfg.sequence_parallel, self.rank, self.world,
                                                       cfg.micro_batch_size, self.settings.ds_config)
        if self.data is None:
            self.data = data_mod.build(cfg, self.tok, self.layout.dp_world, say=self.say,
                                       announce=dist.announce(self.rank))
        self.settings = resolve.resolve_schedule(self.settings, cfg, self.data.schedule.steps_per_epoch)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        return self

    @property
    def total_steps(self) -> int:
        return self.settings.total_steps

    def header(self) -> str:
        cfg, s = self.cfg, self.settings
        ds = s.ds_config
        lines = [f"device {self.facts.name} x{self.world} | model {cfg.model} ({self.kind}, "
                 f"{self.model_config.model_type}) | tokenizer {self.tok_path} | lr {s.lr:g}",
                 gpu_extras.header_line(self.facts)]
        lines += s.header()
        lines += [f"ds_config {cfg.deepspeed}: train_batch_size {ds['train_batch_size']} = {cfg.micro_batch_size} x "
                  f"{cfg.grad_accum} x {self.layout.dp_world} | {self.layout.describe()}",
                  self.data.ledger.format(),
                  f"steps: {self.total_steps} ({self.data.schedule.steps_per_epoch} per epoch)"
                  + (f"; resuming from {self.resume_from}" if self.resume_from else "")]
        if self.resuming is not None:
            lines.append(self.resuming.describe())
            lines.append("resume: " + self.resuming.ledger_entry()["sample_ids"])
        return "\n".join(lines)

    # ---- 2. distributed, preflight, run directory ----------------------------------------------------------
    def setup(self, *, run_dir: bool = True) -> "Trainer":
        cfg, s = self.cfg, self.settings
        dist.init(self.facts.cuda, self.rank)
        self.plan_setup = dataclasses.replace(setup_from_resolved(s, cfg, self.model_config),
                                              data_bytes=self.data.resident_bytes())
        if cfg.preflight:  # refuse what cannot fit now, not with an OOM hours in (all ranks agree)
            preflight.run(self.plan_setup, self.facts, self.local_rank, self.say)
            if run_dir:  # and what the output filesystem cannot hold (collective)
                preflight.run_disk(self.plan_setup, output_dir=cfg.output_dir, keep_last=cfg.keep_last,
                                   saves=checkpoint.count_saves(self.total_steps, cfg.save_interval),
                                   save_final_model=cfg.save_final_model, say=self.say, tokenizer_dir=self.tok_path)
        # DeepSpeed's CPU Adam: built once per environment, announced, a stale build lock refused (collective)
        opbuild.prepare_cpu_adam(s.ds_config, local_rank=self.local_rank, barrier=dist.barrier, say=self.say)
        if run_dir and self.rank == 0:
            record = {"world_size": self.world, "device": self.facts.name, "precision": s.precision,
                      "attention": s.attention, "liger": s.liger, "lr": s.lr, "ds_config": s.ds_config,
                      "total_steps": self.total_steps, "model_kind": self.kind, "identity": self.identity}
            runs.start(cfg, self.mode, record, s, self.data.ledger.to_dict(), self.resuming)
        dist.barrier()
        return self

    # ---- 3. model and engine --------------------------------------------------------------------------------
    def build(self) -> "Trainer":
        import deepspeed  # heavy: a run that prepare() refuses never imports it
        from transformers import get_scheduler

        cfg, s = self.cfg, self.settings
        self.zero3 = dsconfig.is_zero3(s.ds_config)
        ds_config = s.ds_config
        if self.resuming is not None and self.resuming.reshard:  # another layout: its universal form
            cbs = self.callbacks
            self.resuming.universal = universal.ensure(
                self.resume_from, rank=self.rank, barrier=dist.barrier, say=self.say,
                on_written=lambda tmp: [cb.on_universal_written(self, tmp) for cb in cbs])
            ds_config = universal.ds_config_for_load(ds_config)
        model, mpu = modeling.build_model(cfg, self.model_config, self.kind, s, self.layout)
        model = lora.apply(model, cfg, self.say)  # --lora: adapters + trainable embeddings/norms, the rest frozen
        sched_kwargs = {"min_lr_rate": s.min_lr_rate} if s.min_lr_rate is not None else None
        with zero3_optimizer_installed(self.zero3):  # longctx.zero3_optimizer.LongctxZeroStage3
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=ds_config, mpu=mpu,
                lr_scheduler=lambda opt: get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=s.warmup_steps,
                                                       num_training_steps=s.total_steps,
                                                       scheduler_specific_kwargs=sched_kwargs))
        self.device = self.engine.device
        self.guard = DivergenceGuard(s.precision, s.ds_config, cfg.fp16_collapse_patience, self.engine)
        if self.resume_from is not None:
            universal_form = self.resuming.universal if self.resuming is not None else None
            self.load_state_dict(checkpoint.load(self.engine, self.resume_from, self.rank, universal=universal_form))
            self.say(f"resumed at step {self.step} from {self.resume_from}")
        if s.overlap_step:
            how = self.engine.optimizer.enable_overlap(self.engine.module)
            self.say(f"optimizer step: CPU sub-groups updated during the next forward (CPU Adam called {how}, "
                     "off the GIL)")
        for cb in self.callbacks:
            cb.on_built(self)
        return self

    def retarget(self, cfg, data) -> "Trainer":
        """Train the built model and engine on `data` under `cfg`, another --max-seq-len, without rebuilding them.

        The benchmark climbs a ladder of lengths; where a length resolves to the settings of the one built, a rebuild
        would only build the same engine again. `cfg` is resolved as prepare() resolves it, its schedule from `data`;
        BuildDiffers (a LongctxError) where it differs from the build's config in more than --max-seq-len, or its
        settings or layout from the build's in more than their reasons and the tiled MLP's shard count (which is
        set on the live model). Then the settings, the data and the memory plan's Setup are this length's."""
        if dataclasses.replace(cfg, max_seq_len=self.cfg.max_seq_len) != self.cfg:
            raise BuildDiffers("retarget changes --max-seq-len only; the config differs in more")
        settings = resolve.resolve(cfg, self.facts, self.model_config, self.world)
        layout = sequence_parallel.Layout.for_run(cfg.sequence_parallel, self.rank, self.world, cfg.micro_batch_size,
                                                  settings.ds_config)
        settings = resolve.resolve_schedule(settings, cfg, data.schedule.steps_per_epoch)
        differ = [f.name for f in dataclasses.fields(settings) if f.name not in ("why", "tiled_mlp_shards")
                  and getattr(settings, f.name) != getattr(self.settings, f.name)]
        differ += ["layout"] if layout != self.layout else []
        if differ:
            raise BuildDiffers(f"--max-seq-len {cfg.max_seq_len} resolves to another build than the one in hand "
                               f"(--max-seq-len {self.cfg.max_seq_len}): {', '.join(differ)} differ")
        if settings.tiled_mlp and settings.tiled_mlp_shards != self.settings.tiled_mlp_shards:
            tiled_mlp.enable(self.engine.module.lm, settings.tiled_mlp_shards)  # the count this length's plan assumes
        self.cfg, self.data, self.settings = cfg, data, settings
        self.plan_setup = dataclasses.replace(setup_from_resolved(settings, cfg, self.model_config),
                                              data_bytes=data.resident_bytes())
        return self

    # ---- checkpointable state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer's own state (the engine's is saved beside it, trainer_state.json in the checkpoint): where the
        data order stands, the layout that wrote it, the fp16 steps skipped so far."""
        per_epoch = self.data.schedule.steps_per_epoch
        epoch = (self.step - 1) // per_epoch if self.step else 0
        return {"step": self.step, "epoch": epoch, "step_in_epoch": self.step - epoch * per_epoch,
                "world_size": self.world, "sequence_parallel": self.layout.size,
                "micro_batch_size": self.cfg.micro_batch_size, "grad_accum": self.cfg.grad_accum,
                "skipped_steps": self.guard.skipped}

    def load_state_dict(self, state: dict) -> None:
        """What state_dict wrote: the step (epoch and step_in_epoch follow from it and the batch schedule) and the
        skipped steps. The layout keys were read before the build, where the global batch is kept
        (resume.written_layout reads trainer_state.json)."""
        self.step = int(state.get("step", 0))
        self.guard.skipped = int(state.get("skipped_steps", self.guard.skipped))

    def save(self) -> Path:
        cbs = self.callbacks

        def written(path: Path) -> None:
            for cb in cbs:
                cb.on_checkpoint_written(self, self.step, path)

        self.activity = f"saving the checkpoint of step {self.step}"
        overlap_step.finish(self.engine)
        return checkpoint.save(self.engine, self.cfg.output_dir, self.step, self.state_dict(), self.cfg.keep_last,
                               rank=self.rank, barrier=dist.barrier, on_written=written)

    # ---- 4. the step, evaluation and the loop --------------------------------------------------------------
    def collate(self, docs, rows: list[list[int]], max_seq_len: Optional[int] = None) -> dict:
        return self.layout.collate(docs, rows, pad_id=self.pad_id, packing=self.cfg.packing,
                                   max_seq_len=max_seq_len or self.cfg.max_seq_len,
                                   flatten=self.settings.pass_varlen_kwargs)

    def forward(self, batch: dict):
        dev = self.device
        return self.engine(input_ids=batch["input_ids"].to(dev), position_ids=batch["position_ids"].to(dev),
                           labels=batch["labels"].to(dev), **attention.model_kwargs(batch, self.varlen_impl, dev))

    @property
    def varlen_impl(self) -> Optional[str]:
        """The kernel that takes the collator's document boundaries, or None (masks, S2-Attn's own rows)."""
        return self.settings.attn_impl if self.settings.pass_varlen_kwargs else None

    def train_step(self, micro_batches: Sequence[dict], n_targets: int, step: Optional[int] = None,
                   phases: Optional[dict] = None) -> StepResult:
        """One optimizer step over this rank's collated micro-batches; n_targets is the global batch's count.

        With `phases` (a dict), the seconds spent in forward, backward and DeepSpeed's step (the optimizer, at the
        last micro-batch) are added to it under those names. The device is synchronized at each boundary, which
        serializes what would overlap: a benchmark's breakdown, not for training. With the overlapped optimizer
        step, the seconds the forward and the backward waited for the previous update are added under
        "forward: waited for the optimizer" and "backward: waited for the optimizer" (inside those phases), and the
        previous update's own seconds by part under "background update: <part>" (overlap_step.UPDATE_PARTS)."""
        step = self.step + 1 if step is None else step
        scale = self.layout.loss_scale(self.cfg.grad_accum, n_targets)
        loss_sum = torch.zeros((), dtype=torch.float64)
        clock = PhaseClock(phases, self.device)
        updates0 = overlap_step.update_s(self.engine) if phases is not None else {}
        for m, batch in enumerate(micro_batches):
            of = (f"micro-batch {m + 1} of {len(micro_batches)}, {batch['input_ids'].numel():,} tokens, "
                  f"step {step} of {self.total_steps}")
            self.activity = f"in the forward of {of}"
            w0 = overlap_step.waited_s(self.engine)
            loss = self.forward(batch)
            clock.lap("forward")
            w1 = overlap_step.waited_s(self.engine)
            clock.add("forward: waited for the optimizer", w1 - w0)
            for cb in self.callbacks:
                loss = cb.on_loss(self, step, m, loss)
            self.activity = f"in the backward of {of}"
            self.engine.backward(loss * scale)
            clock.lap("backward")
            clock.add("backward: waited for the optimizer", overlap_step.waited_s(self.engine) - w1)
            if phases is not None and m == len(micro_batches) - 1:  # the previous update has ended (backward waits)
                for part, s1 in overlap_step.update_s(self.engine).items():
                    clock.add(f"background update: {part}", s1 - updates0.get(part, 0.0))
            self.activity = f"in DeepSpeed's step after {of}"
            self.engine.step()
            clock.lap("step")
            loss_sum += loss.detach().double().cpu()
        grad_norm = self.engine.get_global_grad_norm()
        return StepResult(float(dist.all_reduce(loss_sum, device=self.device)) / n_targets,
                          float(grad_norm) if grad_norm is not None else None)

    def evaluate(self, max_batches: Optional[int] = None) -> float:
        """Target-token mean loss over the eval rows (the first `max_batches` batches only, if given). Every rank
        runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank without rows left
        repeats row 0 and discards it."""
        data, cfg = self.data, self.cfg
        rank, world = self.layout.dp_rank, self.layout.dp_world  # an SP group evaluates its rows together
        rows, mb = data.eval_rows, cfg.micro_batch_size
        per = world * mb
        tot = torch.zeros(2, dtype=torch.float64)
        self.activity = f"evaluating after step {self.step}"
        overlap_step.finish(self.engine)
        self.engine.eval()
        with torch.no_grad():
            for b in range(min(math.ceil(len(rows) / per), max_batches or math.inf)):
                idx = [i for i in range(b * per + rank * mb, b * per + (rank + 1) * mb) if i < len(rows)]
                batch = self.collate(data.eval_docs, [rows[i] for i in (idx or [0])])
                loss = self.forward(batch)
                if idx:
                    tot += torch.tensor([float(loss), batch["n_targets"]], dtype=torch.float64)
        self.engine.train()
        tot = dist.all_reduce(tot, device=self.device)
        return float(tot[0] / tot[1])

    def fit(self) -> None:
        cfg, data, schedule = self.cfg, self.data, self.data.schedule
        s = self.settings
        self.metrics = metrics = Metrics(
            cfg.output_dir, rank=self.rank, world=self.world, model_config=self.model_config, precision=s.precision,
            total_steps=self.total_steps, start_step=self.step,
            recompute_layers=self.model_config.num_hidden_layers if s.checkpointing != "none" else 0,
            device_name=self.facts.name if self.facts.cuda else None, count_flops=not cfg.lora)
        if data.eval_rows and self.step == 0:
            self.evaluate(max_batches=1)  # the longest eval batch, before step 0: an eval OOM shows at once
        self.engine.train()
        started = time.monotonic()
        self.stopped_early = False

        def time_up() -> bool:  # every rank takes the same decision
            if not cfg.max_train_minutes:
                return False
            return dist.all_reduce(float(time.monotonic() - started > 60 * cfg.max_train_minutes),
                                   device=self.device) > 0

        while self.step < self.total_steps:
            index = self.step  # 0-based index of the step being taken
            metrics.start_step()
            lr = lr_in_use(self.scheduler)  # DeepSpeed steps the scheduler inside the optimizer step
            micro = [self.collate(data.train_docs, [schedule.rows[r] for r in rows])
                     for rows in schedule.micro_batches(index, self.layout.dp_rank)]
            result = self.train_step(micro, schedule.step_targets(index), step=index + 1)
            self.step = index + 1
            last = self.step == self.total_steps
            if not last and time_up():
                last = self.stopped_early = True
                self.say(f"--max-train-minutes {cfg.max_train_minutes:g} reached: step {self.step} of "
                         f"{self.total_steps} is the last")
            self.guard.check(self.engine, self.step, result.loss, result.grad_norm, data.step_sample_ids(index))
            train_seconds = metrics.elapsed()
            eval_loss = None
            if data.eval_rows and ((cfg.eval_interval and self.step % cfg.eval_interval == 0)
                                   or last):
                eval_loss = self.evaluate()
            metrics.log_samples(self.step, data.step_sample_ids(index))
            doc_lens = [len(data.train_docs[d]) for r in schedule.step_rows(index) for d in schedule.rows[r]]
            row = metrics.end_step(self.step, epoch=index // schedule.steps_per_epoch, loss=result.loss,
                                   lr=lr, grad_norm=result.grad_norm,
                                   tokens=sum(doc_lens), doc_lens=doc_lens, skipped_steps=self.guard.skipped,
                                   loss_scale=self.guard.loss_scale,
                                   log=self.step % cfg.log_interval == 0 or last
                                   or eval_loss is not None, eval_loss=eval_loss, seconds=train_seconds)
            if (cfg.save_interval and self.step % cfg.save_interval == 0) or last:
                self.save()
            for cb in self.callbacks:
                cb.on_step_end(self, self.step, row)
            if last:
                break
        overlap_step.finish(self.engine)
        metrics.close()

    # ---- 5. the consolidated Hugging Face model ---------------------------------------------------------------
    def save_final(self) -> list[Path]:
        cfg = self.cfg
        if not cfg.save_final_model:
            return []
        self.activity = "saving the final model"
        overlap_step.finish(self.engine)
        if cfg.lora:  # <output-dir>/adapter (+ final_model with --merge)
            paths = lora.save_final(self.engine, self.tok, cfg, self.rank, self.zero3, dist.barrier)
        else:
            paths = [checkpoint.save_final_model(self.engine, self.tok, cfg, self.rank, self.zero3, dist.barrier)]
        for p in paths:
            self.say(f"saved {p}")
        return paths

    def summary(self, final_paths: Sequence[Path]) -> str:
        """The end-of-run report (collective: peak memory is the max over ranks)."""
        return self.metrics.summary(checkpoint=checkpoint.latest_complete(self.cfg.output_dir),
                                    final_model=final_paths[-1] if final_paths else None)

    def out_of_memory(self, error: BaseException) -> GpuOutOfMemory:
        """The report of a CUDA out-of-memory error, naming what this rank was doing."""
        return preflight.out_of_memory(error, where=self.activity, rank=self.rank, setup=self.plan_setup,
                                       facts=self.facts, output_dir=self.cfg.output_dir)


def zero3_optimizer_installed(zero3: bool):
    """longctx's ZeRO-3 optimizer (longctx.zero3_optimizer) in place for deepspeed.initialize, with ZeRO-3."""
    if not zero3:
        return contextlib.nullcontext()
    from . import zero3_optimizer  # imports DeepSpeed's ZeRO-3 (heavy); a ZeRO-2 run does without

    return zero3_optimizer.installed()


def prepare_data(cfg, *, rank: int, world: int) -> None:
    """train.py --prepare-data: the data tokenized into the cache and its ledger printed; no model, no GPU."""
    dist.quiet_libraries()
    tok, _ = modeling.load_tokenizer(cfg)
    say = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    bundle = data_mod.build(cfg, tok, max(1, world // max(1, cfg.sequence_parallel)), say=say,
                            announce=dist.announce(rank))
    say(bundle.ledger.format())
    say(f"data prepared: {bundle.ledger.packing['data cache']}; train with the same --data, --max-seq-len, "
        "truncation options and tokenizer to reuse it")


def run(cfg, *, rank: int, world: int, local_rank: int, callbacks: Sequence[Callback] = ()) -> Trainer:
    """train.py's whole job."""
    trainer = Trainer(cfg, rank=rank, world=world, local_rank=local_rank, callbacks=callbacks).prepare()
    trainer.say(trainer.header())
    trainer.setup()
    try:
        trainer.build()
        trainer.fit()
        final = trainer.save_final()
    except torch.OutOfMemoryError as e:  # a message with the way on, not a CUDA traceback from every rank
        raise trainer.out_of_memory(e) from None
    dist.barrier()
    trainer.say(trainer.summary(final))
    torch.distributed.destroy_process_group()
    return trainer


__all__ = ["BuildDiffers", "Callback", "StepResult", "Trainer", "run"]
