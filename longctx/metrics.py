"""Metrics: one metrics.jsonl row per logged step (rank 0), progress with ETA, sample ids, the end-of-run summary.

Row fields:
  step, epoch, loss (target-token mean over the global batch), lr (the learning rate this step's optimizer
  update used: lr_in_use(scheduler) read before the step, not the scheduler's value after it), grad_norm
  (before clipping), tokens (real tokens in the step, all ranks), tokens_per_s, tflops (model TFLOP/s per
  GPU, strict: no recompute credit), mfu (vs the GPU's dense peak; null on CPU/unknown GPUs), hfu (with the
  checkpoint recompute), peak_gpu_mem_gb (max over ranks), host_rss_gb (max over ranks), step_time_s,
  skipped_steps (fp16 overflow, cumulative), loss_scale (fp16), eval_loss (when evaluated).

Progress: a tqdm bar on a terminal; otherwise (a pipe, a log file, the tests) plain lines on stdout, every
~5% of the steps, at least every PROGRESS_EVERY_S seconds, and at the last step, never a carriage return.
summary() ends a run: steps, tokens, times, final losses, peak memory, the checkpoint and the final model;
rank 0 also writes it to <run>/summary.json.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

from .dist import all_reduce

try:  # owned by the benchmark work; optional here
    from . import flops as _flops
except Exception:  # pragma: no cover
    _flops = None


def _truncate_jsonl(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            pass  # a row cut by a kill
    path.write_text("".join(k + "\n" for k in keep))


PROGRESS_EVERY_S = 60.0


def lr_in_use(scheduler) -> float:
    """The learning rate the next optimizer step uses. Read it before engine.step(): DeepSpeed steps the
    scheduler right after the optimizer, so get_last_lr() afterwards is already the next step's value."""
    return float(scheduler.get_last_lr()[0])


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Metrics:
    def __init__(self, run_dir: str | Path, *, rank: int, world: int, model_config, precision: str,
                 total_steps: int, start_step: int, recompute_layers: int, device_name: str | None,
                 count_flops: bool = True, stream=None):
        """stream: where progress goes (default: stderr for the bar on a terminal, else stdout lines)."""
        self.rank, self.world = rank, world
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        # FLOPs, TFLOPs and MFU count full fine-tuning; a LoRA run (no weight gradients for frozen weights)
        # reports them as null rather than overstated
        self.shape = _flops.ModelShape.from_config(model_config) if (_flops and count_flops) else None
        self.recompute_layers = recompute_layers
        self.peak = _flops.peak_flops(device_name, precision) if (_flops and device_name) else None
        self.bar = None
        self.total_steps, self.resumed_at = total_steps, start_step
        self.stream = stream
        self.lines = False  # plain progress lines instead of the bar
        self.line_every = max(1, total_steps // 20)
        self._last_line = time.perf_counter()
        if rank == 0:
            _truncate_jsonl(self.path, start_step)  # rows of steps after the checkpoint we resumed from
            _truncate_jsonl(self.samples_path, start_step)
            tty = (stream or sys.stderr).isatty() if hasattr(stream or sys.stderr, "isatty") else False
            if tty:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                                file=stream or sys.stderr)
            else:
                self.lines = True
        # the run's totals, for summary()
        self.t_start = time.perf_counter()
        self.steps_done, self.tokens, self.train_seconds = 0, 0, 0.0
        self.last_step = start_step
        self.last_loss = self.last_eval = None
        self.last_eval_step = None
        self._t = time.perf_counter()

    def start_step(self) -> None:
        self._t = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t

    def log_samples(self, step: int, sample_ids: list[str]) -> None:
        if self.rank == 0:
            with self.samples_path.open("a") as f:
                f.write(json.dumps({"step": step, "sample_ids": sample_ids}) + "\n")

    def end_step(self, step: int, *, epoch: int, loss: float, lr: float, grad_norm: float | None, tokens: int,
                 doc_lens: list[int], skipped_steps: int, loss_scale: float | None, log: bool,
                 eval_loss: float | None = None, seconds: float | None = None) -> dict | None:
        """`seconds`: the step's training time (default: since start_step), excluding evaluation. `lr`: the rate
        the step used (lr_in_use before the step)."""
        dt = self.elapsed() if seconds is None else seconds
        self.steps_done += 1
        self.tokens += int(tokens)
        self.train_seconds += dt
        self.last_step, self.last_loss = step, loss
        if eval_loss is not None:
            self.last_eval, self.last_eval_step = eval_loss, step
        row = None
        if log:
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
            rss = psutil.Process().memory_info().rss / 2 ** 30
            mem, rss = all_reduce([mem, rss], "max")
            tflops = mfu = hfu = None
            if self.shape is not None and dt > 0:
                f = _flops.train_flops(self.shape, doc_lens)
                tflops = f / dt / self.world / 1e12
                if self.peak:
                    mfu = _flops.mfu(f, dt, self.world, self.peak)
                    hfu = _flops.mfu(_flops.hardware_flops(self.shape, doc_lens,
                                                           recompute_layers=self.recompute_layers),
                                     dt, self.world, self.peak)
            row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "tokens_per_s": tokens / dt if dt > 0 else None, "tflops": tflops, "mfu": mfu, "hfu": hfu,
                   "peak_gpu_mem_gb": mem if torch.cuda.is_available() else None, "host_rss_gb": rss,
                   "step_time_s": dt, "skipped_steps": skipped_steps, "loss_scale": loss_scale}
            if eval_loss is not None:
                row["eval_loss"] = eval_loss
            if self.rank == 0:
                with self.path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens / dt:,.0f}" if dt > 0 else "-"}
            if eval_loss is not None:
                post["eval"] = f"{eval_loss:.4f}"
            self.bar.set_postfix(post, refresh=False)
        elif self.lines and self.rank == 0:
            now = time.perf_counter()
            if (step % self.line_every == 0 or step == self.total_steps or eval_loss is not None
                    or now - self._last_line >= PROGRESS_EVERY_S):
                self._last_line = now
                print(self.progress_line(step, loss, tokens, dt, eval_loss), file=self.stream or sys.stdout,
                      flush=True)
        return row

    def progress_line(self, step: int, loss: float, tokens: int, dt: float, eval_loss: float | None = None) -> str:
        elapsed = time.perf_counter() - self.t_start
        left = self.total_steps - step
        eta = elapsed / self.steps_done * left if self.steps_done else 0.0
        parts = [f"step {step}/{self.total_steps} ({step / max(1, self.total_steps):.0%})", f"loss {loss:.4f}"]
        if eval_loss is not None:
            parts.append(f"eval {eval_loss:.4f}")
        parts += [f"{tokens / dt:,.0f} tok/s" if dt > 0 else "- tok/s", f"{dt:.2f} s/step",
                  f"elapsed {_hms(elapsed)}", f"ETA {_hms(eta)}"]
        return "train: " + " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, *, checkpoint: str | Path | None = None, final_model: str | Path | None = None) -> str:
        """The end-of-run report. Every rank must call it (peak memory is the max over ranks); rank 0 writes
        <run>/summary.json. Returns the text to print (the same on every rank)."""
        import torch

        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0.0
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        gpu, host = all_reduce([float(gpu), float(host)], "max")
        wall = time.perf_counter() - self.t_start
        rec = {"steps": self.last_step, "total_steps": self.total_steps, "steps_this_session": self.steps_done,
               "resumed_from_step": self.resumed_at or None, "tokens_this_session": self.tokens,
               "train_seconds": self.train_seconds, "wall_seconds": wall, "final_train_loss": self.last_loss,
               "final_eval_loss": self.last_eval, "final_eval_step": self.last_eval_step,
               "peak_gpu_mem_gb": gpu / 2 ** 30 if torch.cuda.is_available() else None,
               "peak_host_rss_gb": host / 2 ** 30, "checkpoint": str(checkpoint) if checkpoint else None,
               "final_model": str(final_model) if final_model else None, "metrics": str(self.path)}
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(rec, indent=2) + "\n")
        session = (f"steps {self.resumed_at + 1}-{self.last_step} of {self.total_steps} (resumed at step "
                   f"{self.resumed_at})" if self.resumed_at else f"steps {self.last_step} of {self.total_steps}")
        loss = f"{self.last_loss:.4f}" if self.last_loss is not None else "-"
        ev = (f"{self.last_eval:.4f} (step {self.last_eval_step})" if self.last_eval is not None
              else "- (no evaluation)")
        gpu_txt = f"{gpu / 2 ** 30:.2f} GiB" if torch.cuda.is_available() else "- (no GPU)"
        lines = [f"run finished: {session}; {self.tokens:,} tokens in {_hms(self.train_seconds)} of training, "
                 f"{_hms(wall)} wall",
                 f"  final train loss {loss} (step {self.last_step}) | final eval loss {ev}",
                 f"  peak GPU memory {gpu_txt} | peak host RSS {host / 2 ** 30:.2f} GiB (max over ranks)",
                 f"  checkpoint   {checkpoint or '- (none saved)'}",
                 f"  final model  {final_model or '- (not saved)'}",
                 f"  metrics      {self.path}  (summary.json beside it)"]
        return "\n".join(lines)


class PhaseClock:
    """Adds the wall time since the previous lap to `phases[name]`, the device synchronized first; idle when
    `phases` is None (one attribute check per phase): the benchmark's breakdown of a step."""

    def __init__(self, phases: dict | None, device):
        self.phases, self.device = phases, device
        if phases is not None:
            self._sync()
            self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` measured elsewhere (within a phase) under `name` (every rank gets the key: the benchmark
        reduces the phases over ranks)."""
        if self.phases is not None:
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    def lap(self, name: str) -> None:
        if self.phases is None:
            return
        self._sync()
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now
