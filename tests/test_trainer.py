"""longctx.trainer's own state: what state_dict writes into every checkpoint (trainer_state.json), load_state_dict
and the resume rules read back."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from helpers_train import small_dataset, tiny_config_file
from longctx import config, resume
from longctx.divergence import DivergenceGuard
from longctx.trainer import BuildDiffers, Trainer


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


def test_retarget_takes_a_length_of_the_same_build_and_refuses_another(tmp_path):
    """Trainer.retarget (the benchmark's ladder of lengths): another --max-seq-len that resolves to the build's settings
    leaves the trainer as if prepared at that length; a config that differs in more than the length, or a length
    that resolves to another build, is refused and changes nothing."""
    model, data = tiny_config_file(tmp_path / "m"), small_dataset(tmp_path / "data")

    def prepared(*flags: str) -> Trainer:
        argv = ["--model", model, "--data", *data, "--output-dir", str(tmp_path / "run"),
                "--deepspeed", "ds_configs/zero2.json", *flags]
        return Trainer(config.parse(argv), world=1, quiet=True).prepare()

    t = prepared("--max-seq-len", "128", "--max-steps", "5")
    at_256 = prepared("--max-seq-len", "256", "--max-steps", "5")  # the reference: prepared at that length
    assert t.retarget(at_256.cfg, at_256.data) is t
    assert (t.cfg, t.settings, t.layout, t.total_steps) == (at_256.cfg, at_256.settings, at_256.layout, 5)
    assert t.data is at_256.data

    reseeded = prepared("--max-seq-len", "256", "--max-steps", "5", "--seed", "1")
    with pytest.raises(BuildDiffers, match="config differs"):
        t.retarget(reseeded.cfg, reseeded.data)
    for flags in (("--epochs", "1"),  # the schedule's total steps follow the rows of each length
                  ("--max-steps", "5", "--lora", "--s2-attn", "--no-packing")):  # S2-Attn's group is max_seq_len / 4
        built, other = prepared("--max-seq-len", "128", *flags), prepared("--max-seq-len", "256", *flags)
        before = (built.cfg, built.settings, built.data)
        field = "total_steps" if "--epochs" in flags else "s2_group"
        assert getattr(other.settings, field) != getattr(built.settings, field)
        with pytest.raises(BuildDiffers, match=field):
            built.retarget(other.cfg, other.data)
        assert (built.cfg, built.settings, built.data) == before
