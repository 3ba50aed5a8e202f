"""Metrics: one metrics.jsonl row per logged step (rank 0), a progress bar with ETA, sample ids.

Row fields:
  step, epoch, loss (target-token mean over the global batch), lr, grad_norm (before clipping),
  tokens (real tokens in the step, all ranks), tokens_per_s, tflops (model TFLOP/s per GPU, strict:
  no recompute credit), mfu (vs the GPU's dense peak; null on CPU/unknown GPUs), hfu (with the
  checkpoint recompute), peak_gpu_mem_gb (max over ranks), host_rss_gb (max over ranks),
  step_time_s, skipped_steps (fp16 overflow, cumulative), loss_scale (fp16), eval_loss (when evaluated).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import torch

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


class Metrics:
    def __init__(self, run_dir: str | Path, *, rank: int, world: int, model_config, precision: str,
                 total_steps: int, start_step: int, recompute_layers: int, device_name: str | None,
                 count_flops: bool = True):
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
        if rank == 0:
            _truncate_jsonl(self.path, start_step)  # rows of steps after the checkpoint we resumed from
            _truncate_jsonl(self.samples_path, start_step)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
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
        """`seconds`: the step's training time (default: since start_step), excluding evaluation."""
        dt = self.elapsed() if seconds is None else seconds
        row = None
        if log:
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
            rss = psutil.Process().memory_info().rss / 2 ** 30
            both = torch.tensor([mem, rss], dtype=torch.float64)
            if torch.distributed.is_initialized() and self.world > 1:
                dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
                both = both.to(dev) if dev is not None else both
                torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
            mem, rss = both.tolist()
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
        return row

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
