"""Disk space: the preflight's prediction of checkpoints and the final model, its refusal and warning, and a save
that fails for lack of space (a clear error; the previous checkpoint stays loadable)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_train import REPO, fast_args, launcher_cmd, read_jsonl, run_train, small_dataset, tiny_config, \
    tiny_model_dir
from longctx import checkpoint, preflight
from longctx.errors import LongctxError
from longctx.flops import ModelShape
from longctx.plan_types import Setup

MiB = 1 << 20
LLAMA8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)


def setup(stage=3, offload=True, precision="bf16", world=8, shape=LLAMA8B):
    return Setup(shape, 4096, world=world, zero_stage=stage, offload_params=offload and stage == 3,
                 offload_optimizer=offload, precision=precision)


def test_checkpoint_size_by_stage():
    n = preflight.model_params(setup())
    assert 8.0e9 < n < 8.1e9  # Llama-3.1-8B: 8.03B
    z3 = preflight.checkpoint_bytes(setup(stage=3))
    z2 = preflight.checkpoint_bytes(setup(stage=2, offload=False))
    assert z3 == 12 * n + 8 * preflight.PER_RANK_OVERHEAD  # fp32 master + Adam m, v; weights only as placeholders
    assert z2 == z3 + 2 * n  # below ZeRO-3 rank 0 also writes the bf16 weights
    assert preflight.checkpoint_bytes(setup(stage=3, offload=False)) == z3  # offload does not change what is saved
    assert preflight.final_model_bytes(setup()) == 2 * n + (64 << 10)


def test_disk_plan_counts_keep_last_plus_the_one_being_written():
    s = setup()
    ckpt, final = preflight.checkpoint_bytes(s), preflight.final_model_bytes(s)
    d = preflight.disk_plan(s, keep_last=2, saves=10, save_final_model=True)
    assert d.checkpoints_at_once == 3 and d.need == max(3 * ckpt, 2 * ckpt + final)
    one = preflight.disk_plan(s, keep_last=2, saves=1, save_final_model=False)
    assert one.checkpoints_at_once == 1 and one.need == ckpt


def test_refuses_warns_or_passes():
    d = preflight.disk_plan(setup(), keep_last=2, saves=10, save_final_model=True)
    problems, notes = preflight.check_disk(d, d.need - 1, "/runs/x")
    assert len(problems) == 1 and not notes
    assert problems[0].startswith("disk: the run will keep up to") and "--keep-last" in problems[0]
    assert "3 checkpoint(s) of 89.7 GiB at once" in problems[0]
    problems, notes = preflight.check_disk(d, int(d.need * 1.05), "/runs/x")
    assert not problems and len(notes) == 1 and "to spare" in notes[0]
    assert preflight.check_disk(d, int(d.need * 1.2), "/runs/x") == ([], [])


def test_run_disk_refuses_with_the_knobs(tmp_path):
    said = []
    with pytest.raises(LongctxError, match="preflight refused the run") as e:
        preflight.run_disk(setup(), output_dir=tmp_path / "out", keep_last=2, saves=5, save_final_model=True,
                           say=said.append, free=100 * MiB)
    assert "only 100.0 MiB is free there" in str(e.value)
    d = preflight.run_disk(setup(world=1, shape=ModelShape.from_config(tiny_config())), output_dir=tmp_path / "out",
                           keep_last=2, saves=5, save_final_model=True, say=said.append)  # the real free space
    assert d.need < 50 * MiB and said[-1].startswith("preflight: disk")


def test_count_saves():
    assert checkpoint.count_saves(10, 0) == 1
    assert checkpoint.count_saves(10, 4) == 3  # 4, 8, 10
    assert checkpoint.count_saves(10, 5, start_step=5) == 1


# ---- a failed write ---------------------------------------------------------------------------

def complete_checkpoint(out: Path, step: int) -> Path:
    d = checkpoint.root(out) / checkpoint.tag(step)
    d.mkdir(parents=True)
    (d / checkpoint.MARKER).write_text("{}")
    return d


def test_torch_writer_failure_is_a_clear_error(tmp_path):
    """/dev/full fails every write with ENOSPC; torch's zip writer reports it as 'unexpected pos' without errno."""
    prev = complete_checkpoint(tmp_path, 2)
    target = checkpoint.root(tmp_path) / checkpoint.tag(4)
    with pytest.raises(LongctxError) as e:
        with checkpoint.reporting_write_failures("checkpoint step-00000004", target, tmp_path):
            torch.save(torch.zeros(100_000), "/dev/full")
    msg = str(e.value)
    assert msg.startswith(f"saving checkpoint step-00000004 to {target} failed")
    assert f"The previous complete checkpoint, {prev}, is intact" in msg and "--resume auto" in msg
    assert "unexpected pos" in msg  # the cause is kept


def test_enospc_is_reported_as_out_of_space(tmp_path):
    target = checkpoint.root(tmp_path) / checkpoint.tag(2)
    target.mkdir(parents=True)
    (target / "partial.pt").write_text("x")
    with pytest.raises(LongctxError) as e:
        with checkpoint.reporting_write_failures("checkpoint step-00000002", target, tmp_path, remove_partial=True):
            with open("/dev/full", "w") as f:
                f.write("x" * 100_000)
                f.flush()
    assert "the filesystem is out of space" in str(e.value) and "no complete checkpoint yet" in str(e.value)
    assert not target.exists()  # the partial save is gone, its space given back


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with checkpoint.reporting_write_failures("x", tmp_path / "x", tmp_path):
            raise ValueError("a bug")
    assert checkpoint.write_failure(KeyError("k"), "x", tmp_path / "x", tmp_path) is None
    assert checkpoint.write_failure(OSError(errno.EIO, "I/O error"), "x", tmp_path / "x", tmp_path) is not None


# ---- through train.py on a small filesystem ---------------------------------------------------------

def in_tmpfs(mount: Path, size: str, cmd: list[str], copy_to: Path) -> list[str] | None:
    """`cmd` run with a tmpfs of `size` mounted on `mount` (a user + mount namespace); what `mount` holds at the
    end is copied to `copy_to` before the namespace (and the tmpfs) goes. None where unshare cannot do it."""
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(copy_to.parent)],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    mount.mkdir(parents=True, exist_ok=True)
    copy_to.mkdir(parents=True, exist_ok=True)
    script = ('mount -t tmpfs -o size="$1" tmpfs "$0" || exit 99; shift 2; "$@"; rc=$?; '
              'cp -a "$MNT"/. "$DEST"/; exit $rc')
    return ["env", f"MNT={mount}", f"DEST={copy_to}", "unshare", "-rm", "sh", "-c", script, str(mount), size,
            "--", *cmd]


def fail_in_small_tmpfs(tmp_path: Path, data: list[str], model: str, extra: list[str]) -> tuple[str, Path]:
    """train.py for 4 steps with its output directory on a 6 MiB tmpfs, expected to fail (and not for want of the
    mount); skips where no tmpfs can be mounted. Returns its log and the folder the tmpfs was copied to."""
    mount, kept = tmp_path / "small_fs", tmp_path / "kept"
    args = fast_args(mount / "run", data, model, steps=4, extra=extra)
    cmd = in_tmpfs(mount, "6m", launcher_cmd(args), kept)
    if cmd is None:
        pytest.skip("cannot mount a small tmpfs here (needs unshare -rm)")
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode not in (0, 99), log[-3000:]
    return log, kept


@pytest.mark.slow
def test_full_disk_during_a_save_stops_clearly_and_the_previous_checkpoint_resumes(tmp_path):
    data = small_dataset(tmp_path / "data")
    model = tiny_model_dir(tmp_path / "init")
    # a checkpoint of the tiny model is ~4 MiB (zero3_offload, 2 ranks): the first fits, the second does not
    log, kept = fail_in_small_tmpfs(tmp_path, data, model, ["--save-interval", "2", "--keep-last", "1",
                                                            "--no-save-final-model", "--no-preflight"])
    assert "saving checkpoint step-00000004" in log and "the filesystem is out of space" in log, log[-3000:]
    assert "inline_container" not in log.split("error:", 1)[-1].split("cause:")[0]  # the message leads, not torch
    run = kept / "run"
    assert (run / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    assert not (run / "checkpoints" / "step-00000004").exists()
    # the previous checkpoint is loadable: the copied run resumes from it and finishes
    resumed = run_train(fast_args(run, data, model, steps=4, extra=["--save-interval", "2", "--keep-last", "1",
                                                                    "--no-save-final-model", "--resume", "auto"]))
    assert "resumed at step 2" in resumed.stdout
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step-00000004" / "COMPLETE").exists()


@pytest.mark.slow
def test_preflight_refuses_a_filesystem_too_small_for_the_run(tmp_path):
    """Needs the training loop to call preflight.run_disk (see the wiring list of issue #20)."""
    data = small_dataset(tmp_path / "data")
    model = tiny_model_dir(tmp_path / "init")
    log, kept = fail_in_small_tmpfs(tmp_path, data, model, ["--save-interval", "2", "--keep-last", "1"])
    assert "preflight refused the run" in log and "disk: the run will keep up to" in log, log[-3000:]
    assert not (kept / "run" / "checkpoints").exists()
