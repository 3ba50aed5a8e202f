"""Benchmark worker: train.py's own Trainer, one technique (a set of Config overrides), a ladder of lengths.

    deepspeed --num_gpus N bench/train_bench.py --technique longctx --shape llama3.1-8b --layers 8 \
        --lengths 16K,64K,128K --docs 1 --out rows.jsonl
    python bench/train_bench.py ...                         (one GPU, or CPU)

For every length the worker resolves the run exactly as train.py would at that --max-seq-len (longctx.resolve),
builds the Trainer (rebuilt only when the resolution changes), and times full optimizer steps of the Trainer's own
train_step on synthetic rows of random token ids (one document per row, or --docs documents packed into it; the
kernels do not care what the tokens mean). After --warmup untimed steps (one more with the overlapped optimizer
step, whose first update is slow and lands in the next step) it times --steps steps and writes one
JSON row: step time, tokens/s, TFLOP/s, strict MFU, measured peak GPU memory, the memory plan's prediction for
the same resolved settings, and the resolved settings themselves. An OOM ends the technique's ladder (rows
are ascending). Rank 0 writes; rows are flushed at once, so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script (deepspeed launcher): make `bench` and `longctx` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import techniques as T  # noqa: E402
from bench.shapes import SHAPES, make_config  # noqa: E402

GiB = 1024 ** 3


def parse_len(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--technique", required=True, help=f"one of {', '.join(T.TECHNIQUES)}")
    p.add_argument("--shape", default="llama3.1-8b", choices=SHAPES + ("tiny-llama",))
    p.add_argument("--layers", type=int, default=None, help="reduce depth (memory per GPU does not depend on it)")
    p.add_argument("--lengths", default="16K,64K,128K", help="row lengths, ascending; K/M suffixes")
    p.add_argument("--docs", default="1", help="documents per row: N (equal lengths; 1: one document per row), or "
                   "'stdlib': the document lengths of Python's standard library under the Llama-3 tokenizer "
                   "(bench/stdlib_doc_lengths.json), shuffled and packed")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed steps per length")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches (rows) per optimizer step, train.py's --grad-accum: the README's recipes use 4-8")
    p.add_argument("--breakdown", action="store_true",
                   help="time forward, backward and the optimizer step of each timed step (the device synchronized "
                        "at each boundary, so the step times include those waits)")
    p.add_argument("--memory-at-peak", action="store_true",
                   help="after the timed steps, one more step under a memory recorder: the row gets what was live at "
                        "that step's peak and where it was allocated (bench/memory_at_peak.py; slow, never timed)")
    p.add_argument("--mem-cap-gib", type=float, default=None,
                   help="per-process GPU memory cap: an emulated smaller card (the resolution plans for it too)")
    p.add_argument("--out", default="-", help="JSONL to append rows to ('-' = stdout)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("extra", nargs="*", help="more train.py flags after --, applied to every length")
    a = p.parse_args(argv)
    a.lengths = sorted(parse_len(x) for x in a.lengths.split(",") if x.strip())
    return a


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "deepspeed", "liger-kernel", "triton"):
        try:
            out[pkg.replace("-", "_")] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    import transformers

    out["transformers"] = transformers.__version__
    try:
        out["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        pass
    return out


STDLIB_LENGTHS = Path(__file__).resolve().parent / "stdlib_doc_lengths.json"


def row_doc_lengths(length: int, docs: str, seed: int) -> list[int]:
    """Document lengths of one row of `length` tokens."""
    if docs != "stdlib":
        n = int(docs)
        return [length // n + (1 if i < length % n else 0) for i in range(n)]
    import numpy as np

    lens = json.loads(STDLIB_LENGTHS.read_text())["lengths"]
    out, room = [], length
    for i in np.random.default_rng(seed).permutation(len(lens)):
        n = min(int(lens[i]), length)  # train.py truncates a document longer than a row to the row
        if n <= room:
            out.append(n)
            room -= n
        if room < 16:
            break
    return out


def synthetic_data(length: int, docs: str, vocab: int, dp_world: int, seed: int, accum: int = 1):
    """One optimizer step's rows (dp_world x accum) of at most `length` tokens, documents of random ids (every token
    a target but the first of each document), as the data.DataBundle the Trainer trains on."""
    import numpy as np

    from longctx.batching import BatchSchedule
    from longctx.data import DataBundle
    from longctx.documents import Doc, Ledger
    from longctx.tokenization import IGNORE

    rng = np.random.default_rng(seed)
    out, row_ix = [], []
    for r in range(dp_world * accum):
        row = []
        for n in row_doc_lengths(length, docs, seed + r):
            ids = rng.integers(3, vocab, size=n, dtype=np.int32)
            labels = ids.copy()
            labels[0] = IGNORE
            row.append(len(out))
            out.append(Doc(f"synthetic:{r}:{len(row)}", ids, labels))
        row_ix.append(row)
    lengths = [sum(len(out[d]) for d in row) for row in row_ix]
    targets = [sum(out[d].n_supervised for d in row) for row in row_ix]
    return DataBundle(out, [], BatchSchedule(row_ix, lengths, targets, micro=1, accum=accum, world=dp_world, seed=seed),
                      [], Ledger())


class Worker:
    def __init__(self, a):
        import torch

        from longctx import resolve

        self.a = a
        self.tech = T.get(a.technique)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.out = None
        if self.rank == 0:
            self.out = sys.stdout if a.out == "-" else open(a.out, "a", buffering=1)
        self.tmp = Path(tempfile.mkdtemp(prefix="longctx-bench-"))
        config = make_config(a.shape, layers=a.layers)
        if a.shape == "tiny-llama":
            config.vocab_size = 2048  # the embedded tokenizer's size (train.py checks the model can hold it)
        self.model_config = config
        self.model_file = self.tmp / "model.json"
        self.model_file.write_text(json.dumps(config.to_dict()))
        self.ds_file = self.tmp / "ds_config.json"
        ds = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero3_offload.json").read_text())
        if self.tech.offload_param == "none":
            ds["zero_optimization"].pop("offload_param")
        else:
            ds["zero_optimization"]["offload_param"]["device"] = self.tech.offload_param
        if self.tech.offload_optimizer == "none":
            ds["zero_optimization"].pop("offload_optimizer")
        elif self.tech.optimizer_ratio is not None:
            ds["zero_optimization"]["offload_optimizer"]["ratio"] = self.tech.optimizer_ratio
        self.ds_file.write_text(json.dumps(ds))
        facts = resolve.Facts.detect(gpus=self.world)
        if facts.cuda:
            torch.cuda.set_device(a.local_rank)
            if a.mem_cap_gib is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, a.mem_cap_gib * GiB / facts.gpu_mem))
                facts = dataclasses.replace(facts, gpu_mem=int(a.mem_cap_gib * GiB))
        self.facts = facts
        self.trainer = None
        self.picked: dict[int, tuple[str, ...]] = {}
        self.write({"kind": "meta", "run_id": a.run_id, "technique": self.tech.name, "technique_desc": self.tech.desc,
                    "device": facts.name, "n_gpus": self.world, "gpu_total_gib": (facts.gpu_mem or 0) / GiB or None,
                    "mem_cap_gib": a.mem_cap_gib, "versions": versions(), "shape": a.shape, "layers": config.num_hidden_layers,
                    "docs": a.docs, "grad_accum": a.grad_accum, "argv": sys.argv[1:],
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")})

    def write(self, row: dict) -> None:
        if self.out is not None:
            self.out.write(json.dumps(row, default=str) + "\n")
            self.out.flush()

    def argv(self, length: int, flags: tuple[str, ...]) -> list[str]:
        flags = [f.format(world=self.world) for f in flags + self.tech.world_flags]
        return ["--model", str(self.model_file), "--deepspeed", str(self.ds_file), "--max-seq-len", str(length),
                "--output-dir", str(self.tmp / "run"), "--overwrite", "--max-steps", "1000", "--eval-fraction", "0",
                "--no-save-final-model", "--no-preflight", "--lr", "1e-5", "--warmup-steps", "0",
                "--lr-scheduler", "constant", "--seed", str(self.a.seed), "--grad-accum", str(self.a.grad_accum),
                *flags, *self.a.extra]

    def flags(self, length: int) -> tuple[str, ...]:
        """The technique's train.py flags at this length (a stock stack's pick: bench/techniques.py, flags_at)."""
        if length not in self.picked:
            self.picked[length] = T.flags_at(self.tech, length, lambda f: T.plan_fits(
                self.argv(length, f), self.facts, self.model_config, self.world))
        return self.picked[length]

    def config(self, length: int):
        from longctx import config as config_mod

        argv = self.argv(length, self.flags(length))
        if self.a.docs != "1" and "--no-packing" in argv:
            raise ValueError(f"{self.tech.name} trains one document per row (--no-packing): use --docs 1")
        return config_mod.parse(argv)

    def trainer_for(self, length: int):
        """The Trainer train.py would build at this --max-seq-len; the one in hand when it resolves to the same build
        (Trainer.retarget)."""
        from longctx.trainer import BuildDiffers, Trainer

        cfg = self.config(length)
        data = synthetic_data(length, self.a.docs, 2048 if self.a.shape == "tiny-llama" else 128000,
                              dp_world=self.world // max(1, cfg.sequence_parallel), seed=self.a.seed + length,
                              accum=cfg.grad_accum)
        if self.trainer is not None:
            try:
                return self.trainer.retarget(cfg, data), cfg, False  # same build; this length's rows and settings
            except BuildDiffers:
                # A second DeepSpeed engine in one process: a 16K -> 128K rebuild of the 8B shape died on a 125 GiB
                # host, most likely of the first engine's host memory (pinned CPU Adam buffers, tens of GiB) not
                # given back. bench.run starts a fresh worker for this length and the rest.
                raise FreshProcess(length) from None
        t = Trainer(cfg, rank=self.rank, world=self.world, local_rank=self.a.local_rank, data=data, facts=self.facts,
                    quiet=True).prepare()
        t.setup(run_dir=False).build()
        self.trainer = t
        return t, cfg, True

    def measure(self, length: int) -> dict:
        import torch

        from longctx import flops, plan as plan_mod
        from longctx.plan_settings import setup_from_resolved

        t0 = time.monotonic()
        trainer, cfg, built = self.trainer_for(length)
        init_s = time.monotonic() - t0
        data = trainer.data
        dp = trainer.layout.dp_rank
        micro = [trainer.collate(data.train_docs, [data.schedule.rows[r] for r in rows])
                 for rows in data.schedule.micro_batches(0, dp)]
        n_targets = data.schedule.step_targets(0)
        cuda = torch.cuda.is_available()
        times, losses = [], []
        phases = {} if self.a.breakdown else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # With the overlapped optimizer step, a step's update runs into the next step, and the first update is ~3x a
        # later one (H100, 8B shape 8 layers, 64K: 2.8 s vs 0.9 s): one more untimed step puts it out of the timing
        warmup = self.a.warmup + (1 if self.a.warmup and trainer.settings.overlap_step else 0)
        for i in range(warmup + self.a.steps):
            if cuda:
                torch.cuda.synchronize()
            ts = time.perf_counter()
            res = trainer.train_step(micro, n_targets, phases=phases if i >= warmup else None)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - ts
            losses.append(res.loss)
            if i >= warmup:
                times.append(dt)
        if not loss_moved(losses):  # every step trains on the same rows: a loss that never moves took no update
            raise RuntimeError(f"the loss did not change over {len(losses)} steps ({losses[0]:.6f}): no update took "
                               "effect (non-finite gradients skipped?); its step time would not be a training step's")
        peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
        peak_reserved = torch.cuda.max_memory_reserved() / GiB if cuda else None
        host_peak, host_now, pinned = all_ranks_max([x if x is not None else -1.0 for x in host_memory()])
        at_peak = None
        if self.a.memory_at_peak:  # after the peak above was read: the recorder's own step is neither timed nor peaked
            from bench import memory_at_peak

            try:  # a diagnostic: its failure must not cost the timed row above
                at_peak = memory_at_peak.record(lambda: trainer.train_step(micro, n_targets))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                at_peak = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        times = all_ranks_max(times)
        step_s = max(times)
        if phases is not None:  # seconds per timed step, the slowest rank's
            names = sorted(phases)
            phases = dict(zip(names, (v / len(times) for v in all_ranks_max([phases[n] for n in names]))))
        doc_lens = [len(data.train_docs[d]) for r in data.schedule.step_rows(0) for d in data.schedule.rows[r]]
        shape = flops.ModelShape.from_config(trainer.model_config)
        f = flops.train_flops(shape, doc_lens)
        peak_flops = flops.peak_flops(self.facts.name, trainer.settings.precision) if cuda else None
        setup = setup_from_resolved(trainer.settings, cfg, trainer.model_config)
        planned = plan_mod.plan(setup)
        predicted = planned.gpu_peak
        s = trainer.settings
        return {"kind": "row", "status": "ok", "technique": self.tech.name, "seq_len": length, "docs": self.a.docs,
                "doc_lens": doc_lens if len(doc_lens) <= 64 else None, "n_docs": len(doc_lens),
                "tokens": sum(doc_lens), "step_time_s": step_s, "step_times_s": times, "phases_s": phases,
                "tokens_per_s": sum(doc_lens) / step_s / self.world,
                "tflops_per_gpu": f / step_s / self.world / 1e12,
                "mfu": flops.mfu(f, step_s, self.world, peak_flops) if peak_flops else None,
                "peak_gpu_gib": all_ranks_max([peak])[0] if peak is not None else None,
                "peak_reserved_gib": peak_reserved, "predicted_peak_gib": predicted / GiB,
                "peak_host_rss_gib": host_peak / GiB, "host_rss_gib": host_now / GiB,
                "pinned_host_gib": pinned / GiB if pinned >= 0 else None,
                "predicted_host_gib": planned.host_per_rank / GiB, "predicted_pinned_gib": planned.pinned / GiB,
                "memory_at_peak": at_peak,
                "plan_setup": dataclasses.asdict(setup),  # what the planner was asked (tests/test_plan_calibration.py)
                "flags": list(self.flags(length)), "losses": losses, "warmup_steps": warmup, "built": built,
                "build_s": round(init_s, 1),
                "settings": {k: v for k, v in s.to_dict().items() if k != "ds_config"}}

    def run(self) -> int:
        import torch

        for length in self.a.lengths:
            self.write({"kind": "attempt", "technique": self.tech.name, "seq_len": length, "docs": self.a.docs})
            try:
                self.write(self.measure(length))
            except FreshProcess:
                self.write({"kind": "restart", "technique": self.tech.name, "seq_len": length, "docs": self.a.docs,
                            "lengths": [n for n in self.a.lengths if n >= length]})
                return RESTART_RC
            except torch.OutOfMemoryError as e:
                self.write({"kind": "row", "status": "oom", "technique": self.tech.name, "seq_len": length,
                            "docs": self.a.docs, "error": str(e).splitlines()[0][:300]})
                return 0  # longer rows would not fit either
            except Exception as e:  # noqa: BLE001 - a failed technique is a result; the traceback goes to the log
                traceback.print_exc()
                self.write({"kind": "row", "status": "error", "technique": self.tech.name, "seq_len": length,
                            "docs": self.a.docs, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                return 1
        return 0


RESTART_RC = 75  # EX_TEMPFAIL: "run me again in a fresh process for the lengths in my restart record"


class FreshProcess(Exception):
    """This length resolves to another build than the one in hand: it needs a fresh worker process."""


def loss_moved(losses: list[float]) -> bool:
    """The bench repeats one step's rows at a constant lr: after the first update the loss must differ."""
    return len(losses) < 2 or len(set(losses)) > 1


def host_memory() -> tuple[int, int, Optional[int]]:
    """This rank's host memory in bytes: the process's peak RSS so far (getrusage ru_maxrss, so the engine's build
    too), its RSS now (psutil), and what torch's caching host allocator holds pinned, blocks in use and cached (None
    without CUDA or without torch.cuda.host_memory_stats, which torch has had since pytorch#147660, early 2025)."""
    import resource

    import psutil
    import torch

    now = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB
    pinned = None
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is not None and torch.cuda.is_available():
        try:
            s = stats()
        except RuntimeError:
            s = {}
        # the first versions count every pinned block as reserved_bytes (allocated_bytes: those in use); torch 2.13
        # has no reserved_bytes and counts every block the allocator owns, in use or cached, as allocated_bytes
        pinned = s.get("reserved_bytes.current", s.get("allocated_bytes.current"))
    return int(peak), int(now), pinned


def all_ranks_max(values: list[float]) -> list[float]:
    """Element-wise max over ranks (the slowest rank's step time is the step time)."""
    import torch

    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return values
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def main(argv=None) -> int:
    a = parse_args(argv)
    if "RANK" not in os.environ:  # plain `python`: a world of one (train.py's dist_env)
        import train

        train.dist_env()
    worker = Worker(a)
    try:
        rc = worker.run()
    finally:
        shutil.rmtree(worker.tmp, ignore_errors=True)  # its model and DeepSpeed config files
    import torch

    if rc == 0 and torch.distributed.is_initialized():
        # leave together, as train.py does: a rank that finds the store's owner (rank 0) gone can wait at exit (a
        # 2-rank CPU run hung there once, after writing both rows); on an error the launcher stops the rest
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    import train

    train.exit_now(main())  # as train.py leaves: no interpreter teardown once the rows are written
