"""A stopped `bench.run` (timeout's SIGTERM, ^C) takes its worker down with it: an orphaned worker would keep
the GPU busy under whatever runs next on it. (I first suspected this of the second learning-proof attempt's slow 8K
steps; that turned out to be --tiled-mlp auto tiling a tiny model, see tests/test_sp_tiling.py. The orphan risk
is real all the same: before this fix, `timeout bench.run` left the worker running.)"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_sigterm_stops_the_worker_group(tmp_path):
    pidfile = tmp_path / "pids"
    # the "worker" starts a grandchild too, as the deepspeed launcher starts ranks
    worker = textwrap.dedent(f"""
        import subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pidfile)!r}, "w").write(f"{{__import__('os').getpid()}} {{g.pid}}")
        time.sleep(600)
    """)
    parent = textwrap.dedent(f"""
        import sys
        from bench import run
        sys.exit(run.run_worker([sys.executable, "-c", {worker!r}]))
    """)
    p = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + 60
    while not (pidfile.exists() and len(pidfile.read_text().split()) == 2):
        assert time.time() < deadline and p.poll() is None, "the worker did not start"
        time.sleep(0.1)
    pids = [int(x) for x in pidfile.read_text().split()]
    assert all(_alive(x) for x in pids)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    deadline = time.time() + 15
    while any(_alive(x) for x in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(x) for x in pids), "worker or its child outlived bench.run"
