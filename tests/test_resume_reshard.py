"""Resume on another number of ranks and another sequence-parallel degree (issue #36), through the real launcher.

One uninterrupted 2-rank run (ZeRO-3 + CPU Adam offload, fp32, 4 rows per optimizer step: micro-batch 1 x grad
accumulation 2 x 2 ranks; conftest.py's `uninterrupted`, which tests/test_train_resume.py resumes too) is the
reference of a chain of resumes, each from a checkpoint the previous one wrote:
2 ranks -> 1 (grad accumulation 4; its first conversion killed with -9 and redone) -> 2 (accumulation 2) -> 4
(accumulation 1). Every resumed step must have the reference's sample ids and its loss within 1e-5 relative: a
loss is a function of the weights before the step, so one resharded step that went wrong (weights, Adam moments,
its step count, the lr schedule, the rows) shows in the losses after it. SP=2 -> SP=1 is tests/test_sp_train.py's
(its ZeRO-3 SP=2 run resumed on one rank). Refusals (a changed global batch, model, data; a global batch that cannot
be kept) are checked in-process on Trainer.prepare, which must refuse before the data or the model is loaded.

On 2 GPUs:  pytest -m gpu tests/test_resume_reshard.py  (2 GPUs -> 1, bf16)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from helpers_train import (RESUME_EXTRA, RESUME_STEPS as STEPS, fast_args, read_jsonl, run_train, run_until_paused,
                           small_dataset, tiny_model_dir)

pytestmark = pytest.mark.slow


def _args(out: Path, data, model, more=()):
    """The uninterrupted run's flags (ZeRO-3 with CPU offload, a checkpoint every step), `more` overriding."""
    return fast_args(out, data, model, steps=STEPS, extra=RESUME_EXTRA + list(more))


def _rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}


def _samples(out: Path) -> dict[int, list[str]]:
    return {r["step"]: r["sample_ids"] for r in read_jsonl(out / "samples.jsonl")}


def _resume_copy(src: Path, dst: Path, at: int) -> None:
    """`src`'s run directory as it was when its checkpoint of step `at` was the newest."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final_model", ignore_errors=True)
    for c in (dst / "checkpoints").glob("step-*"):
        if int(c.name.split("-")[1].split(".")[0]) > at:
            shutil.rmtree(c)


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _check_continues(out: Path, ref: Path, at: int, world: int, accum: int) -> None:
    got, want = _rows(out), _rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    samples, ref_samples = _samples(out), _samples(ref)
    for s in range(at + 1, STEPS + 1):
        assert samples[s] == ref_samples[s], f"step {s}: other rows than the uninterrupted run"
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), (s, got[s], want[s])
        assert got[s]["lr"] == pytest.approx(want[s]["lr"], rel=1e-12), s
        assert got[s]["tokens"] == want[s]["tokens"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["world_size"] == world and rec["config"]["grad_accum"] == accum
    entry = json.loads((out / "ledger.json").read_text())["resumes"][-1]
    assert entry["at_step"] == at and entry["to"]["world_size"] == world and entry["to"]["grad_accum"] == accum
    assert entry["from"]["global_batch"] == entry["to"]["global_batch"] == 4
    assert entry["sample_ids"].startswith(f"the sample ids of steps {at + 1} on equal those of an uninterrupted run")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, uninterrupted):
    ref, _ = uninterrupted("ds_configs/zero3_offload.json")  # 2 ranks, _args' flags
    return tmp_path_factory.mktemp("reshard"), uninterrupted.data, uninterrupted.model, ref


@pytest.fixture(scope="module")
def on_one_rank(setup):
    """2 ranks -> 1 at step 2: the first conversion is killed -9 before its rename, the next start redoes it."""
    d, data, model, ref = setup
    out = d / "on_1"
    _resume_copy(ref, out, 2)
    original = out / "checkpoints" / "step-00000002"
    before = _digest(original)
    run_until_paused(_args(out, data, model, ["--resume", "auto"]), out.with_name(f"{out.name}.PAUSED_IN_CONVERSION"),
                     env={"LONGCTX_TEST_PAUSE_IN_CONVERSION": "1"}, nproc=1)
    killed = {"tmp": (out / "checkpoints" / "step-00000002.universal.tmp").is_dir(),
              "final": (out / "checkpoints" / "step-00000002.universal").exists(),
              "intact": _digest(original) == before,
              "trained": (out / "metrics.jsonl").read_bytes() != (ref / "metrics.jsonl").read_bytes()}
    p = run_train(_args(out, data, model, ["--resume", "auto"]), nproc=1)
    return out, before, killed, p


def test_two_ranks_to_one_after_a_killed_conversion(setup, on_one_rank):
    d, data, model, ref = setup
    out, before, killed, p = on_one_rank
    # killed inside the conversion: the original as it was, a partial .tmp, no universal form, no step trained
    assert killed["intact"] and killed["tmp"] and not killed["final"], killed
    assert not killed["trained"], killed  # its metrics were not even cut back to step 2
    # the next start converted again and continued with grad accumulation 2 -> 4
    assert "converting" in p.stdout and "resumed at step 2" in p.stdout, p.stdout[-3000:]
    assert "grad_accum 4 x 1 data-parallel = 4 rows per step" in p.stdout
    ckpts = out / "checkpoints"
    assert (ckpts / "step-00000002.universal" / "COMPLETE").is_file()
    assert not (ckpts / "step-00000002.universal.tmp").exists()
    assert _digest(ckpts / "step-00000002") == before
    _check_continues(out, ref, at=2, world=1, accum=4)


@pytest.fixture(scope="module")
def on_two_ranks(setup, on_one_rank):
    """1 rank -> 2 at step 4 (a checkpoint the 1-rank resume wrote)."""
    d, data, model, ref = setup
    out = d / "on_2"
    _resume_copy(on_one_rank[0], out, 4)
    return out, run_train(_args(out, data, model, ["--resume", "auto", "--grad-accum", "4"]), nproc=2)


def test_one_rank_to_two(setup, on_two_ranks):
    d, data, model, ref = setup
    out, p = on_two_ranks
    assert "resumed at step 4" in p.stdout and "grad_accum 2 x 2 data-parallel" in p.stdout, p.stdout[-3000:]
    _check_continues(out, ref, at=4, world=2, accum=2)


def test_two_ranks_to_four(setup, on_two_ranks):
    d, data, model, ref = setup
    out = d / "on_4"
    _resume_copy(on_two_ranks[0], out, 6)
    p = run_train(_args(out, data, model, ["--resume", "auto"]), nproc=4)
    assert "resumed at step 6" in p.stdout and "grad_accum 1 x 4 data-parallel" in p.stdout, p.stdout[-3000:]
    _check_continues(out, ref, at=6, world=4, accum=1)
    assert (out / "checkpoints" / "step-00000006.universal" / "COMPLETE").is_file()


def test_prune_removes_a_universal_form_with_its_original(tmp_path):
    from longctx import checkpoint

    ckpts = tmp_path / "checkpoints"
    for name in ("step-00000002", "step-00000002.universal", "step-00000004", "step-00000004.universal.tmp",
                 "step-00000006", "step-00000006.universal", "step-00000008"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "COMPLETE").write_text("{}")
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000006", "step-00000006.universal", "step-00000008"]


# ---- refusals, before anything is loaded ----------------------------------------------------------------------

def _prepare(argv: list[str], world: int):
    from longctx import config
    from longctx.trainer import Trainer

    return Trainer(config.parse(argv), world=world, quiet=True).prepare()


def test_changes_are_refused_by_name_before_loading(setup, tmp_path):
    from longctx.errors import LongctxError

    d, data, model, ref = setup
    out = tmp_path / "run"
    _resume_copy(ref, out, 4)
    before = _digest(out)
    resume = ["--resume", "auto"]
    # the global batch: 4 rows per step asked as 1 x 1 x 2
    with pytest.raises(LongctxError, match=r"the global batch changed: .* 4 rows per step.*--resume-allow-change "
                                           r"global_batch"):
        _prepare(_args(out, data, model, resume + ["--grad-accum", "1"]), world=2)
    # 4 rows cannot be spread over 3 ranks
    with pytest.raises(LongctxError, match=r"4 rows per step cannot be split into micro-batches of 1 over 3 "
                                           r"data-parallel ranks.*\(1, 2, 4\)"):
        _prepare(_args(out, data, model, resume), world=3)
    # another model: the same weights' directory under another path, then another shape
    other = tiny_model_dir(tmp_path / "other_model", num_hidden_layers=3)
    with pytest.raises(LongctxError, match=r"(?s)model changed: --model: .*; shape: num_hidden_layers 2 -> 3.*"
                                           r"--resume-allow-change model"):
        _prepare(_args(out, data, other, resume), world=2)
    # the data: the same file names, one file's contents edited
    edited = tmp_path / "data"
    shutil.copytree(Path(data[0]).parent, edited)
    with open(edited / "text.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    moved = [str(edited / Path(p).name) for p in data]
    with pytest.raises(LongctxError, match=r"data changed: contents changed: text.jsonl\n"):
        _prepare(_args(out, moved, model, resume), world=2)
    with pytest.raises(LongctxError, match=r"max_seq_len changed: --max-seq-len: 128 -> 96"):
        args = _args(out, data, model, resume)
        args[args.index("--max-seq-len") + 1] = "96"
        _prepare(args, world=2)
    # nothing was written by a refused start
    assert _digest(out) == before
    # an allowed change continues, and the ledger entry says its samples are not the uninterrupted run's
    t = _prepare(_args(out, data, model, resume + ["--grad-accum", "1", "--resume-allow-change", "global_batch"]),
                 world=2)
    assert t.resuming.allowed == ["global_batch"] and t.data.schedule.global_batch == 2
    assert "not those of an uninterrupted run" in t.resuming.ledger_entry()["sample_ids"]


# ---- on GPUs ---------------------------------------------------------------------------------------------------

def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_to_one_bf16(tmp_path):
    """2 GPUs -> 1, bf16, ZeRO-3 with the optimizer offloaded: the same sample ids; losses as close as bf16 sums in
    another order allow."""
    data = small_dataset(tmp_path / "data")
    model = tiny_model_dir(tmp_path / "init")
    ref = tmp_path / "ref"
    args = lambda out, more=(): _args(out, data, model, ["--precision", "bf16", *more])  # noqa: E731
    run_train(args(ref), nproc=2, timeout=900)
    out = tmp_path / "on_1"
    _resume_copy(ref, out, 4)
    p = run_train(args(out, ["--resume", "auto"]), nproc=1, timeout=900)
    assert "resumed at step 4" in p.stdout and "converting" in p.stdout, p.stdout[-3000:]
    got, want = _rows(out), _rows(ref)
    samples, ref_samples = _samples(out), _samples(ref)
    for s in range(5, STEPS + 1):
        assert samples[s] == ref_samples[s]
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=2e-2), (s, got[s], want[s])
