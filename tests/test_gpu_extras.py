"""Which optional GPU kernels `make` installs (longctx.gpu_extras): the rule on injected facts, the pins it relies
on, and that a machine without nvidia-smi (CI) gets nothing without importing torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from longctx import gpu_extras
from longctx.gpu_extras import FA4, LIGER

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("capabilities, torch_cuda, expected", [
    ((), None, []),                                   # CPU machine, CPU torch (CI)
    ((), "13.0", []),                                 # CUDA torch, no GPU it can see
    (((9, 0),), None, []),                            # an H100 under a CPU torch
    (((7, 0),), "12.8", [LIGER]),                     # V100
    (((8, 0),), "13.0", [LIGER]),                     # A100: fa4 not measured there
    (((8, 6),), "13.0", [LIGER]),                     # A6000
    (((9, 0),), "12.8", [LIGER]),                     # H100 with a CUDA 12 torch: [cu13] does not fit it
    (((9, 0),), "13.0", [LIGER, FA4]),                # H100 / H200, CUDA 13: the stack measured
    (((9, 0),) * 4, "13.2", [LIGER, FA4]),
    (((10, 0),), "13.0", [LIGER]),                    # B200: fa4 runs there, but was never measured
    (((12, 0),), "13.0", [LIGER]),
    (((9, 0), (8, 0)), "13.0", [LIGER]),              # mixed: not every GPU is sm90
])
def test_requirements(capabilities, torch_cuda, expected):
    assert gpu_extras.requirements(capabilities, torch_cuda) == expected


def test_the_requirements_are_pinned_as_measured_in_constraints():
    pins = {line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()}
    assert LIGER == "liger-kernel==0.8.5" and FA4 == "flash-attn-4[cu13]==4.0.0b36"
    assert {"liger-kernel==0.8.5", "flash-attn-4==4.0.0b36"} <= pins


def test_no_nvidia_smi_prints_nothing_and_leaves_torch_unimported(tmp_path):
    """What CI's `make test` runs: PATH without nvidia-smi."""
    code = "import sys; from longctx import gpu_extras; gpu_extras.main(); assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, ""), out.stderr
