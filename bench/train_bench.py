"""GPU worker: full-parameter training steps of a random-init model under DeepSpeed ZeRO-3 + CPU offload.

Launch:  deepspeed --num_gpus N bench/train_bench.py --shape llama3.1-8b --techniques baseline,liger --lengths 16K,32K
   or:   python bench/train_bench.py ...            (one GPU, or CPU for the smoke test)

One process builds the model once (under ZeRO-3 Init, bf16) and walks the technique sets in the order given;
the ladder is cumulative, so techniques are switched on in place (attention implementation and checkpointing
are switched at run time; Liger, once on, stays on). For every (technique, length) it runs warmup + timed
full optimizer steps (forward, backward, engine.step) on random tokens and appends one JSON row to --out,
flushed at once, so a killed run keeps what it measured. Rank 0 writes; figures are reduced over ranks
(max step time, max GPU peak, per-rank host RSS peaks summed).

Rows (kind): "meta" (once per process), "attempt" (before each try, so a crash is attributable), "row"
(ok / oom / error / skipped), "search" (max trainable length). bench/run.py collects them into one JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import traceback

if __package__ in (None, ""):  # run as a script (deepspeed launcher): make `bench` and `longctx` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench import techniques as T
from bench.search import find_max_length
from bench.shapes import SHAPES, make_config
from longctx.flops import ModelShape, hardware_flops, mfu, peak_flops, train_flops

GiB = 1024 ** 3


def parse_len(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.1-8b", choices=SHAPES + ("tiny-llama",))
    p.add_argument("--layers", type=int, default=None, help="reduce depth (memory per GPU does not depend on it)")
    p.add_argument("--techniques", default="baseline", help=f"comma list, in ladder order: {','.join(T.LADDER)}")
    p.add_argument("--technique", default=None,
                   help="override: one custom set as '+'-joined features, e.g. 'varlen+liger+upstream_offload'")
    p.add_argument("--lengths", default="16K,32K,64K,128K", help="fixed lengths, ascending; K/M suffixes")
    p.add_argument("--docs", type=int, default=1, help="documents packed per sample (position_ids reset)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed steps per length")
    p.add_argument("--warmup-max-len", type=parse_len, default=parse_len("64K"),
                   help="longer lengths run no warmup step (the single step is both warmup and timed)")
    p.add_argument("--continue-after-oom", action="store_true",
                   help="keep trying longer fixed lengths after an OOM (default: stop that technique)")
    p.add_argument("--search", action="store_true", help="after the fixed lengths, search the max trainable length")
    p.add_argument("--search-techniques", default=None,
                   help="comma list: search only these technique sets (default: all with --search)")
    p.add_argument("--search-start", type=parse_len, default=None, help="default: longest fixed length that passed")
    p.add_argument("--search-limit", type=parse_len, default=parse_len("4M"))
    p.add_argument("--search-multiple", type=parse_len, default=parse_len("4K"))
    p.add_argument("--rel-tol", type=float, default=0.10)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="wall-clock budget of this process from start; lengths predicted not to fit are skipped")
    p.add_argument("--mem-cap-gib", type=float, default=None, help="per-process GPU memory cap (emulated card)")
    p.add_argument("--init-warmup-len", type=parse_len, default=parse_len("1K"),
                   help="one untimed step at this length after init (cpu_adam JIT build, ZeRO trace)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--no-offload", action="store_true", help="ZeRO-3 without CPU offload (debugging)")
    p.add_argument("--dist-timeout-s", type=int, default=900)
    p.add_argument("--out", default="-", help="JSONL to append rows to ('-' = stdout)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = p.parse_args(argv)
    args.lengths = sorted(parse_len(x) for x in args.lengths.split(",") if x.strip())
    return args


# ----------------------------------------------------------------------------------------------------- env
def setup_distributed(args):
    import deepspeed
    if "WORLD_SIZE" not in os.environ:  # plain `python`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(args.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                               timeout=datetime.timedelta(seconds=args.dist_timeout_s))
    device = torch.device("cuda", args.local_rank) if cuda else torch.device("cpu")
    return device


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for pkg in ("transformers", "deepspeed", "liger-kernel", "triton"):
        try:
            out[pkg.replace("-", "_")] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    try:
        import transformers
        out["transformers"] = transformers.__version__
        from transformers import fork_info  # type: ignore[attr-defined]
        out["transformers_fork"] = getattr(fork_info, "FORK_VERSION", None)
        out["fork_patches"] = [p[0] if isinstance(p, (tuple, list)) else str(p)
                               for p in getattr(fork_info, "PATCHES", ())]
    except ImportError:
        out["transformers_fork"] = None
    return out


def ds_config(args, hidden: int, cuda: bool) -> dict:
    offload = not args.no_offload
    zero = {"stage": 3, "overlap_comm": cuda, "contiguous_gradients": True,
            # transformers' "auto" sizes: small buckets keep the per-GPU working set low at long lengths
            "reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_max_live_parameters": int(1e9), "stage3_max_reuse_distance": int(1e9),
            "sub_group_size": int(1e9), "stage3_gather_16bit_weights_on_model_save": False}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "bf16": {"enabled": True}, "zero_optimization": zero, "steps_per_print": 10 ** 9,
           "wall_clock_breakdown": False,
           "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.0}}}
    if not cuda:  # CPU smoke test: torch AdamW instead of the JIT-built DeepSpeedCPUAdam
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


class HostMemSampler:
    """Samples this process's RSS (and, on local rank 0, the host's used memory) every `interval` s."""

    def __init__(self, interval: float = 0.1, host: bool = False):
        import psutil
        self.proc, self.psutil, self.interval, self.host = psutil.Process(), psutil, interval, host
        self.rss_peak = self.used_peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)
        if self.host:
            self.used_peak = max(self.used_peak, self.psutil.virtual_memory().used)

    def _run(self):
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self._sample()

    def reset(self):
        self.rss_peak = self.used_peak = 0
        self._sample()

    def stop(self):
        self._stop.set()


def pinned_stats() -> dict | None:
    """Pinned host memory from torch's caching host allocator (where pin_memory() and save_on_cpu go)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda.memory, "host_memory_stats"):
        return None
    try:
        s = torch.cuda.memory.host_memory_stats()
    except Exception:  # noqa: BLE001
        return None
    for key in ("allocated_bytes.peak", "reserved_bytes.peak", "allocated_bytes.all.peak", "segment_bytes.peak"):
        if key in s:
            return {"peak": s[key], "current": s.get(key.replace(".peak", ".current")), "key": key}
    return {"peak": None, "current": None, "keys": sorted(k for k in s if "bytes" in k)[:12]}


def reset_peaks(sampler):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if hasattr(torch.cuda.memory, "reset_peak_host_memory_stats"):
            with contextlib.suppress(Exception):
                torch.cuda.memory.reset_peak_host_memory_stats()
    sampler.reset()


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "cuda error: out of memory" in msg)


def recover_after_failure(engine):
    """Best effort to make the engine usable after an exception mid-step (same-process search)."""
    with contextlib.suppress(Exception):
        engine.optimizer.zero_grad(set_to_none=True)
    for attr in ("params_in_ipg_bucket", "grads_in_ipg_bucket"):
        with contextlib.suppress(Exception):
            getattr(engine.optimizer, attr).clear()
    with contextlib.suppress(Exception):
        engine.optimizer.elements_in_ipg_bucket = 0
    with contextlib.suppress(Exception):
        engine.empty_partition_cache()  # re-partitions every gathered parameter
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- run
class Bench:
    def __init__(self, args):
        import deepspeed
        import torch.distributed as dist

        self.args, self.dist = args, dist
        self.t0 = time.monotonic()
        self.device = setup_distributed(args)
        self.cuda = self.device.type == "cuda"
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = None
        if self.rank == 0:
            self.out = sys.stdout if args.out == "-" else open(args.out, "a", buffering=1)
        torch.manual_seed(args.seed + self.rank)

        self.cap_gib = args.mem_cap_gib
        self.total_gib = None
        if self.cuda:
            total = torch.cuda.get_device_properties(self.device).total_memory
            self.total_gib = total / GiB
            if args.mem_cap_gib is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * GiB / total), self.device)
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else f"cpu ({platform.processor() or platform.machine()})"
        self.peak = peak_flops(self.device_name, "bf16") if self.cuda else None
        self.sampler = HostMemSampler(host=int(os.environ.get("LOCAL_RANK", 0)) == 0)

        self.config = make_config(args.shape, layers=args.layers)
        self.shape = ModelShape.from_config(self.config)
        self.ds_cfg = ds_config(args, self.shape.hidden, self.cuda)
        self.sets = T.resolve(args.techniques, args.technique)
        # SP sets spread one sample over every rank of this worker (Ulysses); fixed at engine build
        self.sp = self.world if any(t.sp for t in self.sets) and self.world > 1 else 1
        if self.sp > 1:
            self.ds_cfg["sequence_parallel_size"] = self.sp  # zero.Init's batch check without the mpu

        t = time.monotonic()
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        self._hf_ds = HfDeepSpeedConfig(self.ds_cfg)  # keep alive: makes from_config build under zero.Init
        self.lm = AutoModelForCausalLM.from_config(self.config, dtype=torch.bfloat16, attn_implementation="sdpa")
        self.lm.config.use_cache = False
        self.model = T.BenchLM(self.lm)
        self.state = T.State()
        mpu = self.setup_sp() if self.sp > 1 else None
        if any(t.lora for t in self.sets):  # the trainable set is fixed at engine build (techniques.py)
            T.apply_lora(self.model, log=self.log)
        t_model = time.monotonic() - t
        self.engine, *_ = deepspeed.initialize(model=self.model, config=self.ds_cfg, mpu=mpu,
                                               model_parameters=[p for p in self.model.parameters()
                                                                 if p.requires_grad])
        self.t_init = {"model_s": round(t_model, 1), "engine_s": round(time.monotonic() - t - t_model, 1)}
        self.last_ok = None
        fake = os.environ.get("BENCH_FAKE_OOM_ABOVE")  # tests only: OOM inside the last layer above this length
        if fake:
            def _fake_oom(module, args, kwargs):
                h = args[0] if args else kwargs.get("hidden_states")
                if h is not None and h.shape[-2] > parse_len(fake):
                    raise torch.OutOfMemoryError(f"fake OOM above {fake} tokens (BENCH_FAKE_OOM_ABOVE)")
            getattr(self.lm, self.lm.base_model_prefix).layers[-1].register_forward_pre_hook(_fake_oom, with_kwargs=True)
        self.write({"kind": "meta", "run_id": args.run_id, "device": self.device_name, "n_gpus": self.world,
                    "gpu_total_gib": self.total_gib, "mem_cap_gib": self.cap_gib, "peak_tflops": (self.peak or 0) / 1e12 or None,
                    "host": socket.gethostname(), "host_ram_gib": round(self._host_ram() / GiB, 1),
                    "versions": versions(), "shape": args.shape, "layers": self.shape.layers,
                    "model_shape": self.shape.as_dict(), "techniques": [s.name for s in self.sets],
                    "argv": sys.argv[1:], "ds_config": self.ds_cfg, "init": self.t_init, "sequence_parallel": self.sp,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")})

    def setup_sp(self):
        """Varlen attention wrapped by DeepSpeed's Ulysses over all ranks; returns the mpu."""
        from bench import varlen_attention
        from longctx import sequence_parallel as sp_mod

        sp_mod.check(self.sp, self.world, self.config)
        mode = varlen_attention.probe(self.device)
        T._set_attn(self.lm, varlen_attention.register())
        self.state.attn, self.state.attn_desc = "varlen", f"ulysses sp={self.sp} over torch varlen_attn ({mode})"
        self.state.sp = self.sp
        self.model.labels_shifted = True
        return sp_mod.register_ulysses(self.lm, varlen_attention.NAME, self.sp, micro_batch_size=1)

    @staticmethod
    def _host_ram():
        import psutil
        return psutil.virtual_memory().total

    def write(self, row: dict):
        if self.rank == 0:
            self.out.write(json.dumps(row, sort_keys=True) + "\n")
            self.out.flush()
            if self.out is not sys.stdout:
                os.fsync(self.out.fileno())

    def log(self, msg):
        if self.rank == 0:
            print(f"[bench {time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- collectives over ranks --
    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.cuda else "cpu")
        self.dist.all_reduce(t, op=op)
        return t.tolist()

    def batch(self, seq_len: int):
        v = self.config.vocab_size
        if self.sp > 1:
            return self.sp_batch(seq_len)
        ids = torch.randint(0, v, (1, seq_len), device=self.device)
        pos = None
        if self.args.docs > 1 or self.state.attn != "sdpa":
            bounds = [round(i * seq_len / self.args.docs) for i in range(self.args.docs + 1)]
            pos = torch.cat([torch.arange(b - a, device=self.device) for a, b in zip(bounds, bounds[1:])])[None]
        return ids, ids.clone(), pos

    def sp_batch(self, seq_len: int):
        """The same full sample on every rank (same generator), shifted labels, then this rank's slice."""
        if seq_len % self.sp:
            raise ValueError(f"seq_len {seq_len} is not a multiple of the SP size {self.sp}")
        g = torch.Generator(device=self.device).manual_seed(self.args.seed * 1_000_003 + seq_len)
        ids = torch.randint(0, self.config.vocab_size, (1, seq_len), device=self.device, generator=g)
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        pos = torch.cat([torch.arange(n, device=self.device) for n in self.doc_lens(seq_len)])[None]
        n = seq_len // self.sp
        cut = slice(self.rank * n, (self.rank + 1) * n)
        return ids[:, cut].contiguous(), labels[:, cut].contiguous(), pos[:, cut].contiguous()

    def doc_lens(self, seq_len: int) -> list[int]:
        bounds = [round(i * seq_len / self.args.docs) for i in range(self.args.docs + 1)]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def one_step(self, seq_len: int) -> tuple[float, float]:
        ids, labels, pos = self.batch(seq_len)
        if self.cuda:
            torch.cuda.synchronize()
        self.dist.barrier()
        t = time.perf_counter()
        loss = self.engine(ids, labels, pos)
        self.engine.backward(loss)
        self.engine.step()
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return dt, float(loss.detach().float().item())

    def try_length(self, tech, seq_len: int, phase: str) -> dict:
        """Warmup + timed steps at one length; returns the row (also written)."""
        a = self.args
        warm = a.warmup if seq_len <= a.warmup_max_len else 0
        steps = max(1, a.steps)
        self.write({"kind": "attempt", "technique": tech.name, "seq_len": seq_len, "phase": phase})
        s2_group = T.set_s2_group(self.lm, self.state, seq_len) if tech.s2attn else None
        reset_peaks(self.sampler)
        if self.cuda:
            base_alloc = torch.cuda.memory_allocated(self.device)
        row = {"kind": "row", "technique": tech.name, "features": tech.features_dict(), "seq_len": seq_len,
               "docs": a.docs, "phase": phase, "n_gpus": self.world, "mem_cap_gib": self.cap_gib,
               "layers": self.shape.layers, "warmup_steps": warm, "timed_steps": steps,
               "attn_impl": self.state.attn_desc, "loss_impl": self.state.loss_desc,
               "checkpointing": self.state.gc_desc, "sp": self.sp, "tiled_mlp": self.state.tiled_mlp}
        if s2_group:
            row["s2attn_group"] = s2_group
        err = None
        times, loss = [], None
        try:
            for i in range(warm + steps):
                dt, loss = self.one_step(seq_len)
                if i >= warm:
                    times.append(dt)
            status = "ok"
        except Exception as e:  # noqa: BLE001
            status = "oom" if is_oom(e) else "error"
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if status == "error":
                self.log(traceback.format_exc())
            del e
        if status != "ok":
            recover_after_failure(self.engine)
        # every rank must agree: ok only if all ranks completed the step
        codes = {"ok": 0, "oom": 1, "error": 2}
        worst = int(self._reduce([codes[status]], self.dist.ReduceOp.MAX)[0])
        status = {v: k for k, v in codes.items()}[worst]
        row["status"] = status
        row["error"] = err
        if status == "ok":
            t = max(self._reduce([statistics.median(times)], self.dist.ReduceOp.MAX)[0], 1e-9)
            docs = self.doc_lens(seq_len)
            # per GPU: each GPU runs its own sample, or 1/sp of one sample under SP
            f_model = train_flops(self.shape, docs) / self.sp
            f_hw = hardware_flops(self.shape, docs,
                                  recompute_layers=self.state.recompute_layers(self.shape.layers)) / self.sp
            row.update(step_time_s=round(t, 4), step_times_s=[round(x, 4) for x in times], loss=round(loss, 4),
                       tokens_per_s_per_gpu=round(seq_len / t / self.sp, 2), tflops_per_gpu=round(f_model / t / 1e12, 2),
                       model_flops_per_gpu=f_model, hardware_flops_per_gpu=f_hw,
                       mfu=round(mfu(f_model, t, 1, self.peak), 4) if self.peak else None,
                       hfu=round(mfu(f_hw, t, 1, self.peak), 4) if self.peak else None)
            if tech.lora or tech.s2attn:  # flops.py counts full fine-tuning with full attention: not this work
                row.update(tflops_per_gpu=None, mfu=None, hfu=None, flops_note="LoRA/S2-Attn: compare tokens/s")
            if self.last_ok is None or seq_len > self.last_ok[0]:
                self.last_ok = (seq_len, t)
        # memory figures (also for OOM rows: how far it got)
        if self.cuda:
            alloc, reserved = self._reduce([torch.cuda.max_memory_allocated(self.device),
                                            torch.cuda.max_memory_reserved(self.device)], self.dist.ReduceOp.MAX)
            row.update(peak_gpu_alloc_gib=round(alloc / GiB, 2), peak_gpu_reserved_gib=round(reserved / GiB, 2),
                       gpu_alloc_before_gib=round(base_alloc / GiB, 2))
        else:
            row.update(peak_gpu_alloc_gib=None, peak_gpu_reserved_gib=None)
        self.sampler._sample()
        rss_max, = self._reduce([self.sampler.rss_peak], self.dist.ReduceOp.MAX)
        rss_sum, host_used = self._reduce([self.sampler.rss_peak, self.sampler.used_peak], self.dist.ReduceOp.SUM)
        row.update(peak_rss_gib=round(rss_max / GiB, 2), peak_rss_sum_gib=round(rss_sum / GiB, 2),
                   host_used_peak_gib=round(host_used / GiB, 2) if host_used else None)
        pin = pinned_stats()
        if pin and pin.get("peak") is not None:
            pk, = self._reduce([pin["peak"]], self.dist.ReduceOp.SUM)
            row["pinned_peak_gib"] = round(pk / GiB, 2)
        else:
            row["pinned_peak_gib"] = None
        row["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.write(row)
        self.log(f"{tech.name} {seq_len}: {status} " + (f"{row['step_time_s']} s/step" if status == "ok" else (err or "")))
        return row

    # -- budget --
    def predict_s(self, seq_len: int) -> float | None:
        """Seconds for warmup+timed steps at seq_len, scaled by FLOPs from the longest ok row so far."""
        if not self.last_ok:
            return None
        L0, t0 = self.last_ok
        r = train_flops(self.shape, self.doc_lens(seq_len)) / train_flops(self.shape, self.doc_lens(L0))
        warm = self.args.warmup if seq_len <= self.args.warmup_max_len else 0
        return t0 * max(r, 1.0) * (warm + max(1, self.args.steps)) + 5.0

    def fits_budget(self, seq_len: int) -> bool:
        if self.args.time_budget_s is None:
            return True
        left = self.args.time_budget_s - (time.monotonic() - self.t0)
        pred = self.predict_s(seq_len)
        ok = left > 0 and (pred is None or pred < left)
        # all ranks must take the same decision
        return bool(self._reduce([1.0 if ok else 0.0], self.dist.ReduceOp.MIN)[0])

    def skipped(self, tech, seq_len, reason, phase):
        self.write({"kind": "row", "technique": tech.name, "features": tech.features_dict(), "seq_len": seq_len,
                    "docs": self.args.docs, "phase": phase, "n_gpus": self.world, "mem_cap_gib": self.cap_gib,
                    "layers": self.shape.layers, "status": "skipped", "error": reason})

    def run(self):
        a = self.args
        if a.init_warmup_len:
            t = time.monotonic()
            try:
                self.one_step(a.init_warmup_len)
            except Exception as e:  # noqa: BLE001
                self.log(f"init warmup failed: {e}")
                raise
            self.log(f"init warmup step ({a.init_warmup_len} tokens) {time.monotonic() - t:.1f}s")
        for tech in self.sets:
            self.last_ok = None
            try:
                T.apply(self.lm, self.model, tech, self.state, self.device)
            except T.Unavailable as e:
                self.log(f"{tech.name}: unavailable: {e}")
                for L in a.lengths:
                    self.skipped(tech, L, f"unavailable: {e}", "fixed")
                continue
            known: dict[int, bool] = {}
            for L in a.lengths:
                if not self.fits_budget(L):
                    self.skipped(tech, L, "time budget", "fixed")
                    continue
                row = self.try_length(tech, L, "fixed")
                known[L] = row["status"] == "ok"
                if row["status"] != "ok" and not a.continue_after_oom:
                    for L2 in a.lengths:
                        if L2 > L:
                            self.skipped(tech, L2, f"longer than a failed length ({L})", "fixed")
                    break
            if a.search and (not a.search_techniques or tech.name in a.search_techniques.split(",")):
                self.search(tech, known)
        self.sampler.stop()

    def search(self, tech, known):
        a = self.args
        oks = [L for L, ok in known.items() if ok]
        start = a.search_start or (max(oks) if oks else (a.lengths[0] if a.lengths else parse_len("8K")))
        budget_hit = []

        def try_len(L):
            return self.try_length(tech, L, "search")["status"] == "ok"

        def can_try(L):
            if self.fits_budget(L):
                return True
            budget_hit.append(L)
            return False

        res = find_max_length(try_len, start, a.search_limit, a.rel_tol, multiple_of=a.search_multiple,
                              known=known, can_try=can_try)
        self.write({"kind": "search", "technique": tech.name, "features": tech.features_dict(),
                    "n_gpus": self.world, "mem_cap_gib": self.cap_gib, "layers": self.shape.layers,
                    "docs": a.docs, "max_ok": res.max_ok, "first_fail": res.first_fail,
                    "tried": [[L, ok] for L, ok in res.tried], "start": start, "limit": a.search_limit,
                    "rel_tol": a.rel_tol, "converged": res.converged(a.rel_tol),
                    "stopped_by_budget": budget_hit[:1] or None})
        self.log(f"{tech.name}: max trainable length {res.max_ok} (first fail {res.first_fail})")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    bench = Bench(args)
    bench.run()
    if bench.out not in (None, sys.stdout):
        bench.out.close()
    with contextlib.suppress(Exception):
        bench.dist.barrier()
        bench.dist.destroy_process_group()


if __name__ == "__main__":
    main()
