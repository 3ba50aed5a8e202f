"""longctx.trainer's own state: what state_dict writes into every checkpoint (trainer_state.json), load_state_dict
and the resume rules read back."""

from __future__ import annotations

import json
from types import SimpleNamespace

from helpers_train import small_dataset, tiny_config_file
from longctx import config, resume
from longctx.trainer import DivergenceGuard, Trainer


def test_load_state_dict_reads_what_state_dict_writes(tmp_path):
    argv = ["--model", tiny_config_file(tmp_path / "m"), "--data", *small_dataset(tmp_path / "data"),
            "--max-seq-len", "128", "--output-dir", str(tmp_path / "run"), "--micro-batch-size", "2",
            "--grad-accum", "3", "--deepspeed", "ds_configs/zero2.json"]

    def trainer(skipped_by_the_engine: int) -> Trainer:  # prepared as train.py does; no engine, so a guard by hand
        t = Trainer(config.parse(argv), world=1, quiet=True).prepare()
        t.guard = DivergenceGuard("fp16", {}, 3, SimpleNamespace(skipped_steps=skipped_by_the_engine, optimizer=None))
        return t

    saved = trainer(2)
    saved.step = 5
    state = json.loads(json.dumps(saved.state_dict()))  # as trainer_state.json holds it
    per_epoch = saved.data.schedule.steps_per_epoch
    assert (state["epoch"], state["step_in_epoch"]) == ((5 - 1) // per_epoch, 5 - (5 - 1) // per_epoch * per_epoch)
    loaded = trainer(0)  # the guard is built before DeepSpeed restores the engine's count
    loaded.load_state_dict(state)
    assert (loaded.step, loaded.guard.skipped) == (5, 2)
    assert loaded.state_dict() == state
    (tmp_path / "ckpt").mkdir()  # the layout keys are read before the build, where the global batch is kept
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps(state))
    assert resume.written_layout(tmp_path / "ckpt", {}) == resume.Layout(world=1, sp=1, micro=2, accum=3)
