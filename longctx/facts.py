"""The one description of a machine: what its hardware is and which packages it has installed (Facts).

    facts = Facts.detect()          # this machine (imports torch)
    facts = facts.as_target(...)    # the machine `--plan --gpus --gpu-mem --host-mem` names
    facts = Facts.of_sizes(...)     # a machine known by its sizes alone (a what-if plan, a test)

longctx.resolve decides from Facts alone; the memory plan checks whether a plan fits them (gpu_usable, host_usable:
longctx.plan_search.check_fit); the preflight compares the plan with what is free on them now (preflight.Room).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Optional

from .plan_types import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, HOST_USABLE


@dataclass(frozen=True)
class Facts:
    """What the machine (or the target machine of a plan) offers. Probing imports torch; resolving does not."""
    kind: str = "cpu"                          # "cuda" | "cpu"
    name: str = "cpu"
    capability: Optional[tuple[int, int]] = None
    gpu_mem: Optional[int] = None              # bytes per GPU (total); None: no GPU memory to plan against
    gpus: int = 1                              # ranks sharing this host's RAM: a run's ranks on this host, or the
                                               # GPUs of a planned machine
    host_mem: int = 0                          # bytes of host RAM (0: not known)
    varlen_attn: bool = False                  # torch.nn.attention.varlen.varlen_attn exists
    flash_attn: bool = False                   # the flash-attn package is installed
    fa4: Optional[str] = None                  # flash-attn-4's version where its kernels import
    liger: bool = False                        # liger-kernel is installed
    liger_version: Optional[str] = None        # its version (the run header reports it)
    torch_cuda: Optional[str] = None           # torch.version.cuda (None: a CPU build)
    fork: bool = False                         # the installed transformers is our fork
    assumed: tuple[str, ...] = ()              # facts assumed rather than probed (plans for a target)

    @classmethod
    def of_sizes(cls, *, gpus: int, gpu_mem: int, host_mem: int) -> "Facts":
        """A machine of `gpus` GPUs of `gpu_mem` bytes sharing `host_mem` bytes of RAM, nothing else known."""
        return cls("cuda", "", None, gpu_mem, gpus, host_mem)

    @property
    def gpu_usable(self) -> float:
        """Bytes torch may allocate on one GPU: the card minus the CUDA context, divided by the allocator's slack."""
        return ((self.gpu_mem or 0) - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK)

    @property
    def host_usable(self) -> float:
        """Host RAM training may take, all ranks of the host together."""
        return self.host_mem * HOST_USABLE

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    def sm_at_least(self, sm: int) -> bool:
        """A CUDA GPU of compute capability sm`sm` or newer (80: Ampere)."""
        return self.cuda and self.capability is not None and tuple(self.capability) >= divmod(sm, 10)

    @property
    def sm80(self) -> bool:
        return self.sm_at_least(80)

    @property
    def sm90(self) -> bool:
        return self.sm_at_least(90)

    @classmethod
    def detect(cls, gpus: Optional[int] = None) -> "Facts":
        import psutil
        import torch

        from .fa4 import installed_version

        liger = importlib.util.find_spec("liger_kernel") is not None
        common = dict(varlen_attn=_has_varlen_attn(), flash_attn=_has_flash_attn_2(), fa4=installed_version(),
                      liger=liger, liger_version=_version("liger-kernel") if liger else None,
                      torch_cuda=torch.version.cuda, fork=_is_fork(), host_mem=int(psutil.virtual_memory().total))
        if torch.cuda.is_available():
            dev = torch.cuda.current_device()
            return cls("cuda", torch.cuda.get_device_name(dev), tuple(torch.cuda.get_device_capability(dev)),
                       int(torch.cuda.get_device_properties(dev).total_memory),
                       gpus or torch.cuda.device_count(), **common)
        return cls("cpu", "cpu", None, None, gpus or 1, **common)

    def as_target(self, *, gpus: Optional[int], gpu_mem: Optional[int], host_mem: Optional[int],
                  precision: str) -> "Facts":
        """These facts, with the machine named by `--plan --gpus --gpu-mem --host-mem` put in. A GPU target
        named from a machine without one is assumed sm80+ (sm70 for --precision fp16) with the packages a GPU
        install of this project has (liger-kernel, torch's varlen attention)."""
        f = self
        if gpu_mem is not None and not self.cuda:
            cap = (7, 0) if precision == "fp16" else (8, 0)
            f = dataclasses.replace(f, kind="cuda", name="target GPU", capability=cap, varlen_attn=True, liger=True,
                                    assumed=f.assumed + (f"a GPU of sm{cap[0]}{cap[1]}+ with liger-kernel installed",))
        return dataclasses.replace(f, gpus=gpus or f.gpus, gpu_mem=gpu_mem or f.gpu_mem,
                                   host_mem=host_mem or f.host_mem)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001
        return None


def _has_flash_attn_2() -> bool:
    """flash-attn (2.x) proper: flash-attn-4 installs into the same `flash_attn` package, without its functions."""
    try:  # finding a submodule imports the package: a broken install must not stop the probe
        return importlib.util.find_spec("flash_attn.flash_attn_interface") is not None
    except Exception:  # noqa: BLE001
        return False


def _has_varlen_attn() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _is_fork() -> bool:
    try:
        from transformers import fork_info  # type: ignore[attr-defined]  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True
