"""The patch series and the fork tool: applies from clean, re-exports identically, refuses bad states clearly."""

import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORK_TOOL = ROOT / "patches" / "fork.py"
sys.path.insert(0, str(ROOT / "patches"))
import fork  # noqa: E402

SERIES = fork.read_series(ROOT / "patches")
UPSTREAM = fork.read_upstream(ROOT / "patches" / "UPSTREAM")


def run_tool(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, str(FORK_TOOL), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def sdist():
    """The verified upstream sdist, from the tool's own cache (make apply-patches has filled it)."""
    return fork.fetch_sdist(UPSTREAM)


def test_check_patches_passes():
    proc = run_tool("check")
    assert proc.returncode == 0, proc.stderr
    assert "re-exports identically" in proc.stdout


def test_series_is_consistent_and_headers_complete():
    assert fork.validate_series(ROOT / "patches", SERIES) == []
    for name in SERIES.patches:
        assert fork.lint_header(ROOT / "patches" / name) == []


def test_apply_twice_gives_the_same_tree(tmp_path, sdist):
    fork_dir = tmp_path / "fork"
    heads = []
    for _ in range(2):
        proc = run_tool("apply", "--fork-dir", str(fork_dir), env={"TRANSFORMERS_SDIST": str(sdist)})
        assert proc.returncode == 0, proc.stderr
        heads.append(fork.git(fork_dir, "rev-parse", "HEAD^{tree}", "HEAD").stdout.split())
    assert heads[0] == heads[1]
    log = fork.git(fork_dir, "log", "--format=%s", f"{UPSTREAM.tag}..HEAD").stdout.splitlines()
    assert len(log) == len(SERIES.patches) + 1 and log[0].startswith("fork: stamp version")
    assert fork.git(fork_dir, "describe", "--tags", "--abbrev=0", "HEAD~%d" % len(log)).stdout.strip() == UPSTREAM.tag


def test_tampered_hash_is_refused_and_builds_nothing(tmp_path, sdist):
    upstream = tmp_path / "UPSTREAM"
    upstream.write_text((ROOT / "patches" / "UPSTREAM").read_text().replace(UPSTREAM.sha256, "0" * 64))
    fork_dir = tmp_path / "fork"
    proc = run_tool("apply", "--fork-dir", str(fork_dir), "--upstream-file", str(upstream),
                    env={"TRANSFORMERS_SDIST": str(sdist)})
    assert proc.returncode == 2
    assert "sha256 mismatch" in proc.stderr and "0" * 64 in proc.stderr and UPSTREAM.sha256 in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UPSTREAM"]  # no fork, no half-made temp dir


def test_no_network_says_so(tmp_path):
    env = {"LONGCTX_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    env.pop("TRANSFORMERS_SDIST", None)
    proc = run_tool("apply", "--fork-dir", str(tmp_path / "fork"), env={**env, "TRANSFORMERS_SDIST": ""})
    assert proc.returncode == 2
    assert "could not download" in proc.stderr and "no network" in proc.stderr
    assert not (tmp_path / "fork").exists()


def test_a_patch_that_does_not_apply_names_patch_and_file(tmp_path, sdist):
    patches = tmp_path / "patches"
    patches.mkdir()
    for name in ("series", *SERIES.patches):
        (patches / name).write_text((ROOT / "patches" / name).read_text())
    broken = SERIES.patches[-1]
    text = (patches / broken).read_text()
    # change the first context line of the last patch, as a new upstream release would
    touched = re.search(r"^\+\+\+ b/(\S+)$", text, re.M).group(1)
    hunk = text.index("\n@@ ", text.index(f"+++ b/{touched}"))
    context = re.compile(r"^ \S.*$", re.M).search(text, hunk)
    text = text[:context.end()] + "  # changed upstream" + text[context.end():]
    (patches / broken).write_text(text)
    proc = run_tool("apply", "--fork-dir", str(tmp_path / "fork"), "--patches-dir", str(patches),
                    env={"TRANSFORMERS_SDIST": str(sdist)})
    assert proc.returncode == 2
    assert f"patch {broken} does not apply" in proc.stderr
    assert touched in proc.stderr and "Moving to a new upstream" in proc.stderr
    assert not (tmp_path / "fork").exists()


def test_local_edits_are_refused_and_kept(tmp_path, sdist):
    fork_dir = tmp_path / "fork"
    env = {"TRANSFORMERS_SDIST": str(sdist)}
    assert run_tool("apply", "--fork-dir", str(fork_dir), env=env).returncode == 0
    edited = fork_dir / "src" / "transformers" / "modeling_utils.py"
    edited.write_text(edited.read_text() + "\n# local experiment\n")
    proc = run_tool("apply", "--fork-dir", str(fork_dir), env=env)
    assert proc.returncode == 2
    assert "local edits" in proc.stderr and "modeling_utils.py" in proc.stderr and "export-patches" in proc.stderr
    assert edited.read_text().endswith("# local experiment\n")


def test_header_lint_catches_a_missing_upstream_status(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    for name in ("series", *SERIES.patches):
        (patches / name).write_text((ROOT / "patches" / name).read_text())
    first = patches / SERIES.patches[0]
    first.write_text(first.read_text().replace("Upstream-Status: fork-only\n", "", 1))
    (patches / "9999-stray.patch").write_text("")
    proc = run_tool("check", "--patches-dir", str(patches))
    assert proc.returncode == 2
    assert "lacks 'Upstream-Status:'" in proc.stderr and "9999-stray.patch" in proc.stderr


def test_installed_transformers_is_the_fork():
    import transformers
    from transformers import fork_info

    expected = SERIES.fork_version(UPSTREAM)
    assert transformers.__version__ == expected == fork_info.FORK_VERSION
    assert importlib.metadata.version("transformers") == expected  # what `pip show transformers` reports
    assert [name for name, _ in fork_info.PATCHES] == list(SERIES.patches)
    assert fork_info.SERIES_SHA256 == SERIES.digest(ROOT / "patches")


def test_fork_builds_a_wheel_with_the_fork_version(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(ROOT / "transformers-fork"), "-w", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("transformers-*.whl")
    assert wheel.name.startswith(f"transformers-{SERIES.fork_version(UPSTREAM)}-")
    with zipfile.ZipFile(wheel) as z:
        assert "transformers/fork_info.py" in z.namelist()
        assert "def offload_gradient_checkpointing_enable" in z.read("transformers/modeling_utils.py").decode()
