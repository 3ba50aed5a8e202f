"""Sequence parallelism on 2 CPU ranks (real launcher, gloo) equals one unsharded rank.

tests/sp_worker.py runs the training path with SP=2 (Ulysses all-to-all, sliced and pre-shifted labels,
CE sums weighted by supervised-token counts, DeepSpeed's gradient reduction) and, independently, every
document alone through an eager-attention copy of the model. Loss and every gradient must agree to fp32
round-off: packed rows of odd length (padded to a multiple of 2), unpacked rows of different lengths, and
the paths that take cu_seq_lens of the full row (varlen, SDPA per document, fa4); each also with tiled MLP + full
logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_train import deepspeed_cmd, run_launcher

pytestmark = pytest.mark.slow


def run_worker(core: str, out: Path) -> dict:
    p = run_launcher(deepspeed_cmd("tests/sp_worker.py", ["--core", core, "--out", str(out)]), timeout=300)
    assert p.returncode == 0, f"sp_worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return torch.load(out / "result.pt")


def assert_parity(results: dict, expected_cases: set[str]) -> None:
    assert {k.split("/")[0] for k in results} == expected_cases
    for case, r in results.items():
        assert r["sp_targets"] == r["n_targets"], case  # every supervised token counted once over the group
        assert abs(r["sp_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (case, r["sp_loss"], r["ref_loss"])
        assert r["sp_grads"].keys() == r["ref_grads"].keys()
        for name, ref in r["ref_grads"].items():
            err = (r["sp_grads"][name] - ref).abs().max().item()
            scale = ref.abs().max().item()
            assert scale > 0, (case, name)
            assert err <= 1e-5 * scale, f"{case}: grad of {name} differs by {err:.3g} (max |grad| {scale:.3g})"


def test_sp2_equals_sp1_packed_odd_and_variable_length_rows(tmp_path):
    results = run_worker("segments", tmp_path)
    assert_parity(results, {"packed_odd", "unpacked_varlen"})
    assert results["packed_odd/plain"]["local_len"] == 16  # 31 tokens padded to 32, half each
    assert results["unpacked_varlen/plain"]["local_len"] == 12  # longest row 23 -> 24


@pytest.mark.parametrize("core", ["varlen", "sdpa_per_doc", "fa4"])
def test_sp2_equals_sp1_varlen_full_cu_seqlens(tmp_path, core):
    """The kernels that take the full row's document boundaries: torch varlen_attn (a reference kernel on CPU),
    SDPA per document, and longctx.fa4's ops (over a plain stand-in for flash-attention-4's kernels on CPU)."""
    results = run_worker(core, tmp_path)
    assert_parity(results, {"varlen_packed_odd"})
    assert results["varlen_packed_odd/plain"]["local_len"] == 31  # 61 -> 62
