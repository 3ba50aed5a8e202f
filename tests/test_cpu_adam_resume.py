"""DeepSpeed's CPU Adam resumed from its state_dict continues bitwise like an uninterrupted run, once
longctx.checkpoint.restore_cpu_adam_bias_correction has replayed its bias-correction powers.

In-process, one optimizer over one flat fp32 tensor (what ZeRO's CPU offload gives it), fixed random
gradients. The resume steps include steps s whose next step s+1 is one where float(pow(beta, s+1))
and s+1 float multiplications differ (checked here, not assumed), and one where they agree.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from longctx.checkpoint import cpu_adam_optimizers, restore_cpu_adam_bias_correction

BETAS = (0.9, 0.95)
TOTAL = 12
N = 4099  # not a multiple of the SIMD width: the scalar tail runs too


def pow_and_product_differ(beta: float, step: int) -> bool:
    """What DeepSpeed's Adam_Optimizer computes for beta^step: float(pow(double(float beta), step)) on a fresh
    optimizer, float products of float beta on a running one."""
    b = np.float32(beta)
    prod = np.float32(1.0)
    for _ in range(step):
        prod = np.float32(prod * b)
    return prod != np.float32(np.float64(b) ** step)


def grads(total: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(N, generator=g) for _ in range(total)]


def new_optimizer(values: torch.Tensor):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p = torch.nn.Parameter(values.clone())
    return p, DeepSpeedCPUAdam([p], lr=1e-2, betas=BETAS, eps=1e-8, weight_decay=0.01)


def run(p, opt, gs) -> None:
    for g in gs:
        p.grad = g.clone()
        opt.step()


def resumed(start: torch.Tensor, gs, at: int, restore: bool) -> torch.Tensor:
    p, opt = new_optimizer(start)
    run(p, opt, gs[:at])
    saved_p, saved_opt = p.detach().clone(), copy.deepcopy(opt.state_dict())
    del opt
    p2, opt2 = new_optimizer(saved_p)
    opt2.load_state_dict(saved_opt)
    if restore:
        assert restore_cpu_adam_bias_correction(opt2) == at
    run(p2, opt2, gs[at:])
    return p2.detach()


@pytest.fixture(scope="module")
def reference():
    start = torch.randn(N, generator=torch.Generator().manual_seed(0))
    gs = grads(TOTAL)
    p, opt = new_optimizer(start)
    run(p, opt, gs)
    return start, gs, p.detach().clone()


@pytest.mark.parametrize("at", [3, 4, 5, 7, 8, 10])
def test_resume_is_bitwise_exact_at_any_step(reference, at):
    start, gs, ref = reference
    assert torch.equal(resumed(start, gs, at, restore=True), ref)


def test_the_resume_steps_cover_both_cases():
    """The steps above include next steps where pow and the running product differ, and one where they agree
    (so the test covers the case the project's own resume test happened to hit)."""
    nxt = [s + 1 for s in (3, 4, 5, 7, 8, 10)]
    differ = [n for n in nxt if any(pow_and_product_differ(b, n) for b in BETAS)]
    assert differ and len(differ) < len(nxt), differ


def test_deepspeed_alone_is_not_exact():
    """The upstream behaviour the replay works around (deepspeed 0.19.8): without it, resuming at step 5
    (next step 6: float(0.95**6) != 0.95*...*0.95 in float) differs from the uninterrupted run. If this fails,
    DeepSpeed restores the powers itself and restore_cpu_adam_bias_correction can go."""
    start = torch.randn(N, generator=torch.Generator().manual_seed(0))
    gs = grads(TOTAL)
    p, opt = new_optimizer(start)
    run(p, opt, gs)
    assert pow_and_product_differ(BETAS[1], 6)
    assert not torch.equal(resumed(start, gs, 5, restore=False), p.detach())


def test_finds_the_cpu_adam_inside_wrappers():
    class Wrapper:  # the shape of DeepSpeed's ZeRO optimizers: the basic optimizer is `.optimizer`
        def __init__(self, inner):
            self.optimizer = inner

    _, opt = new_optimizer(torch.zeros(8))
    assert cpu_adam_optimizers(Wrapper(Wrapper(opt))) == [opt]
    assert cpu_adam_optimizers(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])) == []
    assert restore_cpu_adam_bias_correction(Wrapper(opt)) == 0  # no step taken yet: nothing to replay
