"""longctx.dist.all_reduce, the one reduction over ranks: two gloo ranks in fresh processes reduce numbers, lists and
tensors, against the plain sum / max / min of what each rank held; one process gets its own values back."""

from __future__ import annotations

import json
import multiprocessing
import sys

import pytest
import torch

from helpers_train import REPO, free_port
from longctx import dist

VALUES = {0: (3.5, [1.0, -2.0, 7.0], [4, 0, 9]), 1: (-1.25, [5.0, -8.0, 2.0], [2, 6, 9])}


def _rank(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    number, values, ints = VALUES[rank]
    t = torch.tensor(ints, dtype=torch.int32)
    got = {"sum": dist.all_reduce(number), "max": dist.all_reduce(values, "max"),
           "min": dist.all_reduce(t, "min", device=t.device).tolist(), "unchanged": t.tolist(),
           "dtype": str(dist.all_reduce(t, "min").dtype)}
    td.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)


def test_all_reduce_over_two_ranks(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port, out = free_port(), str(tmp_path / "got")
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank did not finish in 120 s")
        assert p.exitcode == 0
    (n0, v0, i0), (n1, v1, i1) = VALUES[0], VALUES[1]
    for r in (0, 1):
        got = json.loads(open(f"{out}.{r}").read())
        assert got["sum"] == n0 + n1
        assert got["max"] == [max(a, b) for a, b in zip(v0, v1)]
        assert got["min"] == [min(a, b) for a, b in zip(i0, i1)] and got["dtype"] == "torch.int32"
        assert got["unchanged"] == list(VALUES[r][2])  # the caller's tensor is not reduced in place


def test_one_process_gets_its_own_values():
    assert dist.all_reduce(2.5) == 2.5 and dist.all_reduce([1.0, 2.0], "max") == [1.0, 2.0]
    t = torch.tensor([3, 4])
    assert dist.all_reduce(t, "min") is t
