"""train.py --sequence-parallel through the real launcher (2 CPU ranks, gloo).

* SP=2 on 2 ranks trains exactly like SP=1 on 1 rank (both one data-parallel group, so the same rows per step),
  under ZeRO-3 + CPU offload and under ZeRO-2: the fork's offloaded checkpointing, packed rows of odd length
  (255, padded to 256), tiled MLP forced on (2 chunks per slice); per-step losses, grad norms (the gradient
  scale: Adam alone would hide it) and the eval loss agree. The ZeRO-3 pair keeps attention by replay
  (longctx.attention_replay inside DeepSpeed's Ulysses wrapper; tests/test_train_packing.py proves SP=1 with it
  against a one-by-one reference).
* The ZeRO-3 SP=2 run resumes on 1 rank with SP=1 from its step-2 checkpoint (issue #36: another sequence-parallel
  degree; tests/test_resume_reshard.py has the other world sizes): the same rows and losses as the SP=2 run.
* A head count not divisible by N stops the run with the reason, before the run directory is written.
"""

from __future__ import annotations

import json
import shutil

import pytest

from helpers_train import fast_args, read_jsonl, run_train, small_dataset, tiny_config_file, tiny_model_dir

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ds", ["zero3_offload", "zero2"])
def test_sp2_equals_sp1(tmp_path, ds):
    """ZeRO-3 (reduce-scatter divides by world) and ZeRO-2 (divides by world / N) average differently."""
    kept = ["--keep-attention", "--keep-attention-by", "replay"] if ds == "zero3_offload" else []
    data = small_dataset(tmp_path / "data", n_text=40, n_chat=10, n_pr=10)
    model = tiny_model_dir(tmp_path / "model")
    common = ["--eval-fraction", "0.1", "--offload-gradient-checkpointing", "--tiled-mlp", "--no-save-final-model",
              "--deepspeed", f"ds_configs/{ds}.json", *kept]
    runs = {}

    def args(out, sp, *more):
        a = fast_args(out, data, model, steps=4, extra=common + ["--sequence-parallel", str(sp), "--save-interval", "2",
                                                                 *more])
        a[a.index("--max-seq-len") + 1] = "255"
        return a

    for sp, nproc in ((1, 1), (2, 2)):
        p = run_train(args(tmp_path / f"sp{sp}", sp), nproc=nproc)
        if sp == 2:
            assert "sequence parallel 2" in p.stdout and "tiled MLP on" in p.stdout, p.stdout[-2000:]
            assert ("attention kept (replayed)" in p.stdout) == bool(kept), p.stdout[-2000:]
        runs[sp] = read_jsonl(tmp_path / f"sp{sp}" / "metrics.jsonl")
    assert [r["step"] for r in runs[1]] == [r["step"] for r in runs[2]] == [1, 2, 3, 4]
    for a, b in zip(runs[1], runs[2]):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    assert runs[2][-1]["eval_loss"] == pytest.approx(runs[1][-1]["eval_loss"], rel=1e-5)
    if ds != "zero3_offload":
        return
    # SP=2 on 2 ranks (one data-parallel group) -> SP=1 on 1 rank from its step-2 checkpoint
    sp2, out = tmp_path / "sp2", tmp_path / "sp2_resumed_as_sp1"
    shutil.copytree(sp2, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    p = run_train(args(out, 1, "--resume", "auto"), nproc=1)
    assert "sequence parallel 2" in p.stdout and "resumed at step 2" in p.stdout, p.stdout[-3000:]
    resumed = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(sp2 / "samples.jsonl")
    for a, b in zip(runs[2][2:], resumed[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    assert resumed[-1]["eval_loss"] == pytest.approx(runs[2][-1]["eval_loss"], rel=1e-5)
    entry = json.loads((out / "ledger.json").read_text())["resumes"][-1]
    assert (entry["from"]["sequence_parallel"], entry["to"]["sequence_parallel"]) == (2, 1)


def test_heads_not_divisible_by_sp_is_refused_early(tmp_path):
    model = tiny_config_file(tmp_path / "m", hidden_size=96, num_attention_heads=3, num_key_value_heads=1)
    data = small_dataset(tmp_path / "data", n_text=10, n_chat=0, n_pr=0)
    out = tmp_path / "run"
    p = run_train(fast_args(out, data, model, steps=1, extra=["--sequence-parallel", "2"]), check=False)
    assert p.returncode != 0
    assert "3 query heads are not divisible by --sequence-parallel 2" in p.stderr, p.stderr[-2000:]
    assert not out.exists()
