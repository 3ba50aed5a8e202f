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


def test_a_worker_that_needs_a_fresh_process_is_run_again_for_the_rest(tmp_path):
    """bench/train_bench.py asks for a fresh process when a length needs another build (a second DeepSpeed engine
    in one process is what killed a 16K -> 128K rebuild of the 8B shape). bench.run runs it again for the lengths
    its restart record names, and the try that moved is not reported as crashed. The worker here is a stand-in with
    the real worker's protocol: it measures its first length, asks for a fresh process at the next."""
    import json

    from bench import run

    raw, launches = tmp_path / "raw.jsonl", tmp_path / "launches"
    worker = textwrap.dedent(f"""
        import json, sys
        lengths = [int(x) for x in sys.argv[sys.argv.index("--lengths") + 1].split(",")]
        open({str(launches)!r}, "a").write(",".join(map(str, lengths)) + "\\n")
        out = open({str(raw)!r}, "a")
        for i, n in enumerate(lengths):
            out.write(json.dumps({{"kind": "attempt", "technique": "t", "seq_len": n, "docs": "1"}}) + "\\n")
            if i == 1:
                out.write(json.dumps({{"kind": "restart", "technique": "t", "seq_len": n, "docs": "1",
                                       "lengths": lengths[i:]}}) + "\\n")
                sys.exit(75)
            out.write(json.dumps({{"kind": "row", "status": "ok", "technique": "t", "seq_len": n, "docs": "1",
                                   "step_time_s": 1.0}}) + "\\n")
    """)
    rc = run.run_until_done([sys.executable, "-c", worker, "--lengths", "1,2,3,4"], raw)
    assert rc == 0
    assert launches.read_text().split() == ["1,2,3,4", "2,3,4", "3,4", "4"]  # each launch measures one first
    res = run.collect(raw, tmp_path / "res.json", {})
    assert [(r["seq_len"], r["status"]) for r in res["rows"]] == [(1, "ok"), (2, "ok"), (3, "ok"), (4, "ok")]
    assert json.loads((tmp_path / "res.json").read_text())["rows"] == res["rows"]
