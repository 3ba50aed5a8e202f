"""Which optional GPU kernels `make` installs (longctx.gpu_extras): the rule on injected facts, the pins it relies
on, and that a machine without nvidia-smi (CI) gets nothing without importing torch; and the run header's line."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from longctx import gpu_extras
from longctx.gpu_extras import FA4, LIGER
from longctx.resolve import Facts

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


H100 = Facts("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, liger=True, liger_version="0.8.5", torch_cuda="13.0",
             fa4="4.0.0b36")
A100 = dataclasses.replace(H100, name="A100", capability=(8, 0), fa4=None)


@pytest.mark.parametrize("facts, expected", [
    (H100, "liger-kernel 0.8.5 found | flash-attn-4 4.0.0b36 found"),
    (dataclasses.replace(H100, fa4=None),
     "liger-kernel 0.8.5 found | flash-attn-4 missing (pip install 'flash-attn-4[cu13]==4.0.0b36')"),
    (dataclasses.replace(H100, liger=False, liger_version=None, fa4="4.1.0"),
     "liger-kernel missing (pip install 'liger-kernel==0.8.5') | flash-attn-4 4.1.0 found (measured: 4.0.0b36)"),
    (dataclasses.replace(H100, fa4=None, torch_cuda="12.8"),
     "liger-kernel 0.8.5 found | flash-attn-4 missing (measured on sm90 with a CUDA 13 torch only)"),
    (A100, "liger-kernel 0.8.5 found | flash-attn-4 missing (measured on sm90 with a CUDA 13 torch only)"),
    (dataclasses.replace(H100, fa4=None, torch_cuda=None),  # facts made by hand
     "liger-kernel 0.8.5 found | flash-attn-4 missing (torch's CUDA version unknown)"),
    (Facts(), "liger-kernel missing (no GPU) | flash-attn-4 missing (no GPU)"),
])
def test_header_line(facts, expected):
    assert gpu_extras.header_line(facts) == "optional kernels: " + expected


def test_resolve_ignores_what_only_the_header_line_reads():
    """The same resolution with and without the line's facts: what a run uses is resolve's decision alone."""
    from longctx.resolve import resolve_attention, resolve_liger

    for facts in (H100, A100, Facts()):
        gpu_extras.header_line(facts)
        bare = dataclasses.replace(facts, liger_version=None, torch_cuda=None)
        for f in (facts, bare):
            assert resolve_liger("auto", f) == resolve_liger("auto", facts)
            kw = dict(precision="bf16" if f.cuda else "fp32", packing=True, max_seq_len=4096, dense_mask_max_len=8192)
            assert resolve_attention("auto", f, **kw).name == resolve_attention("auto", facts, **kw).name


def test_the_run_header_carries_the_line(tmp_path):
    """Trainer.header: the line follows the device line (a CPU machine here: neither kernel is for it)."""
    from longctx import config, trainer

    cfg = config.parse(["--deepspeed", str(ROOT / "ds_configs" / "zero3_offload.json"),
                        "--output-dir", str(tmp_path / "run")])
    t = trainer.Trainer(cfg, quiet=True).prepare()
    lines = t.header().splitlines()
    assert lines[0].startswith(f"device {t.facts.name} x1 |")
    assert lines[1] == gpu_extras.header_line(t.facts)
