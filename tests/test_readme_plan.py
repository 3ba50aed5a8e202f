"""The README's `train.py --plan` blocks are what train.py prints for those commands today, byte for byte: a change
to the memory model or to resolve that moves them must update the README with it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers_train import REPO


def readme_plan_blocks() -> list[tuple[list[str], str]]:
    """(the command's arguments after `python`, the output shown) of each ```-block that starts with
    `$ python train.py --plan`."""
    blocks = re.findall(r"```\n(\$ python train\.py --plan.*?)```", (REPO / "README.md").read_text(), re.S)
    out = []
    for block in blocks:
        lines = block.splitlines()
        cmd = [lines.pop(0)[2:]]
        while cmd[-1].endswith("\\"):
            cmd[-1] = cmd[-1][:-1]
            cmd.append(lines.pop(0))
        out.append((shlex.split(" ".join(cmd))[1:], "\n".join(lines) + "\n"))
    return out


BLOCKS = readme_plan_blocks()
DEEPSPEED_LOG = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\] \[[\w.]+:\d+:\w+\] ")


def test_the_readme_has_plan_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("args,shown", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_plan_block_is_what_train_py_prints(args, shown):
    p = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    # DeepSpeed's accelerator detection logs to stdout on import: not the plan's
    printed = "".join(ln for ln in p.stdout.splitlines(keepends=True) if not DEEPSPEED_LOG.match(ln))
    assert printed == shown
