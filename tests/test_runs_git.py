"""Which commit a run records: git's HEAD, or the one the caller states for a copied tree (LONGCTX_GIT_COMMIT)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import run as bench_run
from longctx import runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_git_info_reads_head(monkeypatch):
    monkeypatch.delenv("LONGCTX_GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runs.git_info()["hash"] == head
    assert bench_run.git_info()["commit"] == head


def test_stated_commit_overrides_a_stale_checkout(monkeypatch):
    monkeypatch.setenv("LONGCTX_GIT_COMMIT", "0123abc")
    assert runs.git_info() == {"hash": "0123abc", "dirty": None, "source": "LONGCTX_GIT_COMMIT"}
    assert bench_run.git_info() == {"commit": "0123abc", "dirty": None, "source": "LONGCTX_GIT_COMMIT"}
