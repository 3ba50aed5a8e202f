"""Nothing waits silently: the CPU Adam op's per-environment build directory, its first-build notice, stale and
live build locks, and the test helper that kills a launcher's whole process group on timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_train import REPO, run_launcher
from longctx import config, dsconfig, opbuild
from longctx.errors import LongctxError


def resolved(name: str) -> dict:
    return dsconfig.build(str(REPO / "ds_configs" / f"{name}.json"), config.parse([]), world_size=2,
                          precision="fp32", lr=1e-3, hidden_size=64, on_cuda=False,
                          offload_params=False, optimizer_ratio=1.0,  # what longctx.resolve decides on CPU
                          layer_sub_group_size=1000)


def test_extensions_dir_is_per_environment_unless_set(tmp_path):
    env = {}
    d = opbuild.use_environment_extensions_dir(env)
    assert env[opbuild.ENV] == str(d) == str(opbuild.environment_extensions_dir())
    assert str(Path(sys.prefix)) in str(d) or Path(sys.prefix).name in str(d)
    assert d != Path.home() / ".cache" / "torch_extensions"  # not the directory every environment shares
    env = {opbuild.ENV: str(tmp_path)}
    assert opbuild.use_environment_extensions_dir(env) == tmp_path and env[opbuild.ENV] == str(tmp_path)
    assert opbuild.build_dir(environ=env) == tmp_path / "cpu_adam"


def test_the_makefile_uses_the_same_directory():
    text = (REPO / "Makefile").read_text()
    assert "export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions" in text


def test_which_configs_build_cpu_adam():
    assert opbuild.needs_cpu_adam(resolved("zero3_offload"))
    assert not opbuild.needs_cpu_adam(resolved("zero3")) and not opbuild.needs_cpu_adam(resolved("zero2"))
    torch_adam = resolved("zero3_offload")
    torch_adam["optimizer"]["params"]["torch_adam"] = True
    assert not opbuild.needs_cpu_adam(torch_adam)


def test_the_cpu_is_probed_once_per_process_and_every_caller_gets_its_answer(monkeypatch):
    """DeepSpeed asks py-cpuinfo three times per rank (each probe a subprocess): after probe_cpu_once the real probe
    runs once, and every call, made the way DeepSpeed makes it, gets an unshared copy of that probe's answer."""
    cpuinfo = pytest.importorskip("cpuinfo")
    calls = []
    real = cpuinfo.get_cpu_info

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(cpuinfo, "get_cpu_info", counted)
    opbuild.probe_cpu_once()
    opbuild.probe_cpu_once()  # a second call keeps the first cache, not a cache of it
    from cpuinfo import get_cpu_info  # as DeepSpeed's op builders and CPU Adam import it, at each call

    first = get_cpu_info()
    assert len(calls) == 1 and first == real() and "flags" in first
    first["flags"].append("not-a-flag")
    assert get_cpu_info() == real() and len(calls) == 1


def lock_in(tmp_path) -> Path:
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    return lock


def test_a_stale_lock_is_refused_with_what_to_delete(tmp_path):
    lock = lock_in(tmp_path)
    with pytest.raises(LongctxError) as e:
        opbuild.wait_for_build_lock(lock, print, sleep=lambda s: pytest.fail("must not wait on a stale lock"))
    assert "stale build lock" in str(e.value) and f"rm {lock}" in str(e.value)


def test_no_lock_no_wait(tmp_path):
    opbuild.wait_for_build_lock(tmp_path / "lock", print, sleep=lambda s: pytest.fail("must not wait"))


HOLDER = "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); print('ready', flush=True); sys.stdin.read()"


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock open, as torch's builder does during a build; it exits when its stdin closes."""
    lock = lock_in(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"  # returns at the latest when the process exits
        yield lock, p
    finally:
        p.kill()
        p.wait()


def test_a_build_in_progress_is_waited_for_and_said(holder):
    lock, p = holder
    assert opbuild.lock_holders(lock)[0][0] == p.pid
    said = []

    def build_finishes(_):
        lock.unlink()  # the holder releases the lock

    opbuild.wait_for_build_lock(lock, said.append, sleep=build_finishes)
    assert len(said) == 1 and "waiting for another build" in said[0] and f"pid {p.pid}" in said[0]


def test_a_build_killed_while_waiting_leaves_a_stale_lock_that_is_refused(holder):
    lock, p = holder

    def builder_dies(_):
        p.kill()
        p.wait()

    with pytest.raises(LongctxError, match="stale build lock"):
        opbuild.wait_for_build_lock(lock, lambda s: None, sleep=builder_dies)


def test_prepare_refuses_a_stale_lock_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv(opbuild.ENV, str(tmp_path))
    lock_in(tmp_path)
    with pytest.raises(LongctxError, match="stale build lock"):
        opbuild.prepare_cpu_adam(resolved("zero3_offload"), local_rank=0, barrier=lambda: None, say=print)


def test_prepare_announces_the_first_build_once_and_rank0_builds_first(tmp_path, monkeypatch):
    """The build itself (minutes) is replaced by writing the op's library, the one thing prepare looks at."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    monkeypatch.setenv(opbuild.ENV, str(tmp_path))
    events = []

    def fake_load(self, verbose=False):
        events.append("load")
        (tmp_path / "cpu_adam").mkdir(exist_ok=True)
        (tmp_path / "cpu_adam" / "cpu_adam.so").write_text("")

    monkeypatch.setattr(CPUAdamBuilder, "load", fake_load)
    ds = resolved("zero3_offload")
    assert opbuild.prepare_cpu_adam(ds, local_rank=0, barrier=lambda: events.append("barrier"), say=events.append)
    assert events[0].startswith("building DeepSpeed's CPU Adam op in") and "once per environment" in events[0]
    assert events[1:3] == ["load", events[2]] and events[2].startswith("built CPU Adam in") and events[3] == "barrier"
    events.clear()
    opbuild.prepare_cpu_adam(ds, local_rank=0, barrier=lambda: events.append("barrier"), say=events.append)
    assert events == ["load", "barrier"]  # built already: nothing to announce
    events.clear()
    opbuild.prepare_cpu_adam(ds, local_rank=1, barrier=lambda: events.append("barrier"), say=events.append)
    assert events == ["barrier", "load"]  # the other ranks load after local rank 0 has built
    assert not opbuild.prepare_cpu_adam(resolved("zero3"), local_rank=0, barrier=lambda: None)


def test_run_launcher_kills_the_whole_process_group_on_timeout(tmp_path):
    """The launcher's children (the ranks) must not outlive a timeout: the helper kills the process group."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(300)")
    with pytest.raises(AssertionError, match="timed out after 15 s"):
        run_launcher([sys.executable, "-c", code], timeout=15)
    assert pid_file.exists(), "the child did not start within the timeout (machine overloaded?)"
    child = int(pid_file.read_text())
    # SIGKILL is delivered at once, but the exit completes asynchronously: its pipes close a moment before its
    # /proc state turns to zombie. Wait for the exit, never for longer than 30 s.
    deadline = time.monotonic() + 30
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the launcher's child survived the timeout"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie waiting for a reaper is dead


@pytest.mark.slow
def test_train_refuses_a_stale_lock_instead_of_waiting_forever(tmp_path):
    """Needs the training loop to call opbuild.prepare_cpu_adam (see the wiring list of issue #20): before it,
    both ranks slept on the lock until the timeout."""
    from helpers_train import fast_args, run_train, small_dataset, tiny_config_file

    ext = tmp_path / "ext"
    lock_in(ext)
    # The other ops this environment has built (DeepSpeed's CPU shared-memory comm op, built at init_distributed
    # before the trainer reaches CPU Adam) are linked in: rebuilding one here took 50 s of CI for nothing tested.
    built = opbuild.use_environment_extensions_dir()  # the directory every other test builds in
    for op in (built.iterdir() if built.is_dir() else ()):
        if op.name != opbuild.OP:
            (ext / op.name).symlink_to(op, target_is_directory=True)
    data = small_dataset(tmp_path / "data", n_text=20, n_chat=0, n_pr=0)
    out = tmp_path / "o"
    p = run_train(fast_args(out, data, tiny_config_file(tmp_path / "m"), steps=1), env={opbuild.ENV: str(ext)},
                  timeout=300, check=False)
    assert p.returncode != 0
    assert "stale build lock" in p.stderr and f"rm {ext / 'cpu_adam' / 'lock'}" in p.stderr, p.stderr[-3000:]
