"""The optional GPU kernels: the versions measured, which of them `make` installs here, and which a run found.

    python -m longctx.gpu_extras     # the pip requirement lines for this machine; none on CPU machines and CI

Why: the stack in docs/RESULTS.md is liger-kernel 0.8.5 and flash-attn-4 4.0.0b36 ([cu13]) on H100s (sm90) with a
CUDA 13 torch. Neither is a dependency of the project (CPU machines cannot use them), so the Makefile's deps step
installs what this prints, after torch and pinned by constraints.txt, and a GPU machine set up by `make` gets the
stack measured. The rules:
  - no NVIDIA GPU (no nvidia-smi) or a torch without CUDA: nothing; torch is not even imported without nvidia-smi,
    so CI's `make test` runs as before;
  - any CUDA GPU: liger-kernel (Triton kernels; resolve turns Liger on where it is installed and a GPU is used);
  - every GPU sm90 and torch built for CUDA 13: flash-attn-4[cu13] as well, only where it was measured (every fa4
    measurement is from an H100; its [cu13] closure, nvidia-cutlass-dsl's cu13 libraries, needs a CUDA 13 torch).
Installing is all this decides; what a run uses is longctx.resolve's decision, which `header_line` only reports.
"""

from __future__ import annotations

import shutil
import sys
from typing import Optional, Sequence

LIGER_VERSION = "0.8.5"
FA4_VERSION = "4.0.0b36"           # longctx.fa4 calls its private entry points: auto takes this version only
FA4_CAPABILITY = (9, 0)            # every fa4 measurement is from an H100
FA4_TORCH_CUDA_MAJOR = "13"        # the [cu13] extra; measured with torch 2.11.0+cu130
LIGER = f"liger-kernel=={LIGER_VERSION}"
FA4 = f"flash-attn-4[cu13]=={FA4_VERSION}"


def requirements(capabilities: Sequence[tuple[int, int]], torch_cuda: Optional[str]) -> list[str]:
    """The pip requirement lines for GPUs of these capabilities under a torch built for CUDA `torch_cuda` (None:
    a CPU build)."""
    if not capabilities or not torch_cuda:
        return []
    out = [LIGER]
    if all(tuple(c) == FA4_CAPABILITY for c in capabilities) and torch_cuda.split(".")[0] == FA4_TORCH_CUDA_MAJOR:
        out.append(FA4)
    return out


def detect() -> tuple[tuple[tuple[int, int], ...], Optional[str]]:
    """(the capability of each GPU the installed torch sees, torch's CUDA version)."""
    if shutil.which("nvidia-smi") is None:
        return (), None
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return (), torch.version.cuda
    return tuple(tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())), \
        torch.version.cuda


def header_line(facts) -> str:
    """The run header's report of the optional kernels a longctx.resolve.Facts found, e.g.
    `optional kernels: liger-kernel 0.8.5 found | flash-attn-4 missing (pip install 'flash-attn-4[cu13]==4.0.0b36')`.
    A missing one is offered where `make` would have installed it; elsewhere the line says why it is not."""
    cuda = facts.cuda and facts.capability is not None
    wanted = requirements([facts.capability] if cuda else [], facts.torch_cuda if cuda else None)
    found = (("liger-kernel", facts.liger, facts.liger_version, LIGER_VERSION, LIGER),
             ("flash-attn-4", bool(facts.fa4), facts.fa4, FA4_VERSION, FA4))
    parts = []
    for name, installed, version, measured, req in found:
        if installed:
            parts.append(f"{name} {version or '(version unknown)'} found"
                         + ("" if version == measured else f" (measured: {measured})"))
        elif req in wanted:
            parts.append(f"{name} missing (pip install '{req}')")
        elif not cuda:
            parts.append(f"{name} missing (no GPU)")
        elif not facts.torch_cuda:  # facts made by hand (tests, plans): the rule cannot be applied
            parts.append(f"{name} missing (torch's CUDA version unknown)")
        else:  # flash-attn-4 off the GPU or torch it was measured on
            parts.append(f"{name} missing (measured on sm{FA4_CAPABILITY[0]}{FA4_CAPABILITY[1]} with a CUDA "
                         f"{FA4_TORCH_CUDA_MAJOR} torch only)")
    return "optional kernels: " + " | ".join(parts)


def main() -> int:
    for line in requirements(*detect()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
