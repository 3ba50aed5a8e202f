"""metrics.py: progress as plain lines when not on a terminal, the end-of-run summary, the learning rate a step
used; modeling.restore_inference_settings for the saved model's config."""

from __future__ import annotations

import io
import json

import torch

from helpers_train import tiny_config, tiny_config_file, tiny_model_dir
from longctx import metrics as metrics_mod, modeling


class Terminal(io.StringIO):
    def isatty(self):
        return True


def make(tmp_path, stream, total=40, start=0):
    return metrics_mod.Metrics(tmp_path, rank=0, world=1, model_config=tiny_config(), precision="fp32",
                               total_steps=total, start_step=start, recompute_layers=0, device_name=None, stream=stream)


def run_steps(m, first, last, eval_at=()):
    for step in range(first, last + 1):
        m.start_step()
        m.end_step(step, epoch=0, loss=10.0 / step, lr=1e-3, grad_norm=1.0, tokens=1000, doc_lens=[500, 500],
                   skipped_steps=0, loss_scale=None, log=True, eval_loss=9.0 / step if step in eval_at else None,
                   seconds=0.5)


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path):
    out = io.StringIO()
    m = make(tmp_path, out, total=40)
    run_steps(m, 1, 40, eval_at=(7,))
    m.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert {2, 4, 7, 38, 40} <= set(steps) and 1 not in steps  # every 2 steps (5%), evaluations, the last
    assert all(line.startswith("train: step ") and len(line) < 160 for line in lines)
    assert "eval 1.2857" in lines[steps.index(7)] and "2,000 tok/s" in lines[0] and "ETA" in lines[0]


def test_a_terminal_gets_the_bar(tmp_path):
    term = Terminal()
    m = make(tmp_path, term, total=5)
    run_steps(m, 1, 5)
    m.close()
    assert "\r" in term.getvalue() and "train: step" not in term.getvalue()


def test_summary_says_what_the_run_did(tmp_path):
    m = make(tmp_path, io.StringIO(), total=10, start=4)  # resumed at step 4
    run_steps(m, 5, 10, eval_at=(10,))
    text = m.summary(checkpoint=tmp_path / "checkpoints" / "step-00000010", final_model=tmp_path / "final_model")
    assert text.startswith("run finished: steps 5-10 of 10 (resumed at step 4); 6,000 tokens in 0:00:03 of training")
    assert "final train loss 1.0000 (step 10) | final eval loss 0.9000 (step 10)" in text
    assert "peak host RSS" in text and f"checkpoint   {tmp_path / 'checkpoints' / 'step-00000010'}" in text
    assert f"final model  {tmp_path / 'final_model'}" in text
    rec = json.loads((tmp_path / "summary.json").read_text())
    assert rec["steps"] == 10 and rec["steps_this_session"] == 6 and rec["tokens_this_session"] == 6000
    assert rec["final_eval_loss"] == 0.9 and rec["peak_host_rss_gb"] > 0.01 and rec["train_seconds"] == 3.0


def test_lr_in_use_is_the_rate_the_step_applied():
    """SGD without momentum moves a parameter by exactly lr x grad: the lr a step applied is measured, and
    lr_in_use read before the step matches it, where the scheduler's value after the step does not."""
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=6)
    logged_before, logged_after, applied = [], [], []
    for _ in range(6):
        logged_before.append(metrics_mod.lr_in_use(sched))
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        applied.append(float(before - p.detach()))
        logged_after.append(sched.get_last_lr()[0])
    assert all(abs(a - b) < 1e-15 for a, b in zip(logged_before, applied)), (logged_before, applied)
    assert logged_after[-1] == 0.0 and applied[-1] > 0  # what metrics.jsonl used to say at the last step
    assert abs(max(applied) - 1e-2) < 1e-15


def test_saved_model_config_gets_its_inference_settings_back(tmp_path):
    from transformers import AutoConfig

    model = tiny_model_dir(tmp_path / "m")
    config = AutoConfig.from_pretrained(model)
    config.use_cache = False  # what build_model does for training
    assert modeling.restore_inference_settings(config, model) == {"use_cache": (False, True)}
    assert config.use_cache is True
    src = json.loads((tmp_path / "m" / "config.json").read_text())
    src["use_cache"] = False  # a model that had it off keeps it off
    (tmp_path / "m" / "config.json").write_text(json.dumps(src))
    config.use_cache = False
    assert modeling.restore_inference_settings(config, model) == {} and config.use_cache is False
    config.use_cache = False  # a config .json without the key: transformers' default
    assert modeling.restore_inference_settings(config, tiny_config_file(tmp_path / "c")) == {"use_cache": (False, True)}
