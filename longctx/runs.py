"""The run directory: what it may already hold, and the record of what this run is.

<output_dir>/run.json        resolved config, git hash (+ dirty flag), patch-series hash, versions, world
<output_dir>/config.yaml     the resolved config alone, reusable with --config
<output_dir>/resolved.json   the settings of the run, each with why (longctx.resolve.Resolved)
<output_dir>/ledger.json     the token ledger, and every resume so far
<output_dir>/metrics.jsonl   one row per logged step (see metrics.py)
<output_dir>/samples.jsonl   the sample ids of every step
<output_dir>/summary.json    the end-of-run summary (see metrics.py)
<output_dir>/checkpoints/    DeepSpeed checkpoints (see checkpoint.py)
<output_dir>/final_model/    the consolidated Hugging Face model + tokenizer

Nothing is written before every check has passed. An output directory that holds another run needs
--resume auto (continue it) or --overwrite (replace it); a non-empty directory that is not a run
directory is never overwritten; a directory that cannot be written is refused at the start. run.json
is written atomically (a temporary file, fsync, rename), so a crash never leaves half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import LongctxError

REPO = Path(__file__).resolve().parent.parent
RUN_FILE = "run.json"
# Settings that decide which tokens each step sees: they must not change when resuming. The model, tokenizer, data,
# max_seq_len and the global batch are checked by name, with an override, in resume.py; the number of ranks, the
# sequence-parallel degree and how the global batch is split into micro-batches may change (resume.py).
RESUME_KEYS = ("eval_data", "eval_fraction", "packing", "group_by_length", "truncation", "seed", "sft_truncation")
# What a run recorded before a key existed behaved as (sft_truncation: SFT rows were cut at the end).
RESUME_KEYS_BEFORE = {"sft_truncation": "end"}
RUN_CONTENT = ("run.json", "config.yaml", "ledger.json", "metrics.jsonl", "samples.jsonl", "checkpoints",
               "final_model", "final_model.tmp", "summary.json", "resolved.json")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` so that it holds either its old content or all of `text`, never a part (tmp, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run_record(out: Path) -> dict:
    """run.json of the run in `out`; a clear error if it cannot be read."""
    path = Path(out) / RUN_FILE
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        why = f"line {e.lineno} column {e.colno}: {e.msg}"
    except (UnicodeDecodeError, OSError) as e:
        why = str(e)
    else:
        if isinstance(rec, dict):
            return rec
        why = f"a JSON {type(rec).__name__}, not an object"
    raise LongctxError(
        f"{path}: the run record is corrupt ({why}); a crash may have cut it while it was written (older versions "
        "did not write it atomically). Without it the run cannot be checked for a resume. Restore run.json from a "
        f"backup, or start over in this directory with --overwrite (this deletes the run's checkpoints), or choose "
        "another --output-dir.")


def check_writable(out: Path) -> None:
    """The output directory, or its nearest existing parent when it does not exist yet, must accept a new file.
    Tried for real (a temporary file, removed at once): permission bits do not tell for root, read-only mounts,
    or a filesystem out of inodes."""
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LongctxError(f"--output-dir {out}: {probe} exists and is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".longctx-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        where = "" if probe == Path(out).absolute() else f" (it would be created in {probe})"
        raise LongctxError(f"--output-dir {out}: cannot write in {probe}{where}: {e.strerror or e}. Choose a "
                           "writable --output-dir, or make it writable (permissions, a read-only mount).") from None


def check_output_dir(cfg) -> str:
    """Return "fresh", "resume" or "overwrite"; raise if the directory must not be touched or cannot be written."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise LongctxError(f"--output-dir {out} exists and is not a directory")
    check_writable(out)
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    if not (out / RUN_FILE).is_file():
        raise LongctxError(f"--output-dir {out} is not empty and holds no run ({RUN_FILE} missing); refusing to "
                           "write into it. Choose another directory.")
    if cfg.resume:
        read_run_record(out)
        return "resume"
    if cfg.overwrite:
        return "overwrite"
    prev = read_run_record(out)
    raise LongctxError(f"--output-dir {out} holds another run (started {prev.get('started', '?')}, git "
                       f"{str(prev.get('git', {}).get('hash'))[:12]}). Pass --resume auto to continue it or "
                       "--overwrite to replace it.")


def check_resume_compatible(cfg) -> None:
    prev = read_run_record(Path(cfg.output_dir))
    old, new = prev.get("config", {}), cfg.to_dict()
    old = {**RESUME_KEYS_BEFORE, **old}
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if diffs:
        raise LongctxError("cannot resume: settings that decide the data order changed since the run started:\n  "
                           + "\n  ".join(diffs))


def git_info() -> dict:
    """The commit the code came from. LONGCTX_GIT_COMMIT overrides git for a copied tree whose .git is stale or
    missing (a lent GPU machine's checkout keeps the session's first commit as HEAD); dirty is then unknown."""
    stated = os.environ.get("LONGCTX_GIT_COMMIT", "").strip()
    if stated:
        return {"hash": stated, "dirty": None, "source": "LONGCTX_GIT_COMMIT"}

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""
    return {"hash": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def patch_series_hash(patches_dir: Path = REPO / "patches") -> str | None:
    """sha256 over patches/series and, in series order, each patch file's name and bytes."""
    series = patches_dir / "series"
    if not series.is_file():
        return None
    h = hashlib.sha256(series.read_bytes())
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            p = patches_dir / name
            h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"<missing>"))
    return h.hexdigest()


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    from .modeling import fork_info
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "transformers_fork": fork_info()}


def create(cfg, mode: str, record: dict) -> None:
    """Rank 0, after all checks: prepare the directory and write the run record."""
    out = Path(cfg.output_dir)
    if mode == "overwrite":
        for name in RUN_CONTENT:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    rec = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_info(),
           "patch_series_sha256": patch_series_hash(), "versions": versions(), **record,
           "config": cfg.to_dict()}
    if mode == "resume" and (out / RUN_FILE).exists():
        prev = read_run_record(out)
        rec["started"] = prev.get("started", rec["started"])
        rec["resumed"] = prev.get("resumed", []) + [time.strftime("%Y-%m-%dT%H:%M:%S%z")]
    write_text_atomic(out / RUN_FILE, json.dumps(rec, indent=2, default=str) + "\n")
    import yaml

    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def start(cfg, mode: str, record: dict, settings, ledger: dict, resuming=None) -> None:
    """Rank 0, after all checks: the run record (create), resolved.json and ledger.json (this start's data ledger,
    with every resume so far: `resuming`, a longctx.resume.Resume, adds this one)."""
    create(cfg, mode, record)
    out = Path(cfg.output_dir)
    write_resolved(out, settings)
    previous = json.loads((out / "ledger.json").read_text()) if mode == "resume" and \
        (out / "ledger.json").is_file() else None
    write_text_atomic(out / "ledger.json", json.dumps(ledger_with_resume(ledger, previous, resuming), indent=2))


def ledger_with_resume(ledger: dict, previous: dict | None, r) -> dict:
    """ledger.json's content: this start's data ledger, and every resume so far (the previous file's list, then `r`,
    a longctx.resume.Resume, if this start resumes)."""
    resumes = list((previous or {}).get("resumes", []))
    if r is not None:
        resumes.append(r.ledger_entry())
    return {**ledger, "resumes": resumes} if resumes else ledger


def write_resolved(out: Path, settings) -> None:
    """resolved.json: every field of the run's longctx.resolve.Resolved, and why."""
    write_text_atomic(Path(out) / "resolved.json", json.dumps(settings.to_dict(), indent=2, default=str))
