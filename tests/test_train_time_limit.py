"""train.py --max-train-minutes: the step that passes the limit is the last one, and it ends as a planned last step
would (DeepSpeed checkpoint, final model, summary saying which step of how many), so a one-GPU budget run (the
SmolLM2 recipe's gpu_run.sh) cannot overrun its slot on a slower GPU. One tiny run, one CPU rank, ZeRO-2."""

from __future__ import annotations

import json

from helpers_train import read_jsonl, run_train, small_dataset, tiny_model_dir


def test_time_limit_stops_after_the_step_that_passes_it(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = small_dataset(tmp_path / "data", n_chat=0, n_pr=0)
    out = tmp_path / "run"
    p = run_train(["--deepspeed", "ds_configs/zero2.json", "--model", model, "--data", *data, "--max-seq-len", "128",
                   "--output-dir", str(out), "--max-steps", "50", "--max-train-minutes", "1e-6", "--eval-fraction",
                   "0.1", "--lr", "1e-3"], nproc=1, timeout=300)
    assert "--max-train-minutes 1e-06 reached: step 1 of 50 is the last" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["total_steps"]) == (1, 50)
    resolved = json.loads((out / "resolved.json").read_text())  # the schedule planned for all 50, as resolved
    assert (resolved["total_steps"], resolved["warmup_steps"]) == (50, 2)
    assert "--max-steps" in resolved["why"]["total_steps"]
    assert summary["final_eval_step"] == 1  # evaluated as a last step
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert (out / "final_model" / "config.json").exists() and (out / "checkpoints" / "step-00000001").is_dir()
