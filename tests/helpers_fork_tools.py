"""Tiny training runs through HF Trainer, Trainer + DeepSpeed ZeRO-3 and TRL's SFTTrainer, for tests/test_fork_tools.py.

`run(tool, family, offload)` trains a tiny model for STEPS optimizer steps and returns the loss of each step, the
gradients each step applied, and what the fork's offloader stored. DeepSpeed needs a process group, so its runs go
through `python tests/helpers_fork_tools.py OUT.pt FAMILY...` in a fresh process (a world of one on gloo), which
saves the results of every family with and without offload to OUT.pt.
"""

from __future__ import annotations

import os
import sys

import torch

from helpers_train import TOKENIZER, WORDS, free_port
STEPS, BATCH, SEQ, LAYERS = 2, 2, 16, 3
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {  # family: (config class, causal-LM class, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),  # a family the fork never patched by name
}
# families the offloader's own tests (test_fork_offload.py) also cover; the tool runs stay on FAMILIES
MORE_FAMILIES = {"phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0})}
# A world of one: DeepSpeed's ZeRO-3 with HF Trainer works in one CPU process, not under the multi-rank launcher.
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


def tiny_model(family: str, dtype=torch.float32, **overrides):
    """A tiny model of `family` (TINY plus the family's overrides plus `overrides`), eager attention, the same
    weights in every run: the one builder of the fork's per-family tests."""
    import transformers

    config_cls, model_cls, extra = {**FAMILIES, **MORE_FAMILIES}[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).to(dtype)


def token_rows(vocab_size: int, n: int = STEPS * BATCH) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (SEQ,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def text_rows(n: int = STEPS * BATCH) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g))}
            for _ in range(n)]


def _recording(trainer_cls):
    """The trainer class, recording each step's loss and the gradients each optimizer step applies."""
    from transformers import TrainerCallback

    class Recording(trainer_cls):
        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            self.losses.append((out[0] if isinstance(out, tuple) else out).detach().float().clone())
            return out

    class GradsBeforeStep(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            engine = self.trainer.model_wrapped
            if self.trainer.is_deepspeed_enabled:
                # DeepSpeed steps inside the backward that accelerate runs, before any callback: read the partitioned
                # gradients just before its step.
                from deepspeed.utils import safe_get_full_grad

                step = engine.step

                def step_and_record(*a, **k):
                    self.trainer.grads.append({n: safe_get_full_grad(p).detach().float().clone()
                                               for n, p in self.trainer.model.named_parameters()})
                    return step(*a, **k)

                engine.step = step_and_record

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not self.trainer.is_deepspeed_enabled:
                self.trainer.grads.append({n: p.grad.detach().float().clone()
                                           for n, p in self.trainer.model.named_parameters()})

    def make(**kwargs):
        trainer = Recording(**kwargs)
        trainer.losses, trainer.grads = [], []
        trainer.add_callback(GradsBeforeStep(trainer))
        return trainer

    return make


def run(tool: str, family: str, offload: dict | None, output_dir: str) -> dict:
    """Train with `activation_checkpointing_kwargs=offload` (None: no checkpointing at all)."""
    common = dict(output_dir=output_dir, per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=0.1,
                  optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                  logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                  activation_checkpointing=offload is not None, activation_checkpointing_kwargs=offload)
    if tool == "sft":
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        model = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=0)
        trainer = _recording(SFTTrainer)(model=model, args=SFTConfig(**common, max_length=SEQ),
                                         train_dataset=Dataset.from_list(text_rows()), processing_class=tokenizer)
    else:
        from datasets import Dataset
        from transformers import Trainer, TrainingArguments

        extra = dict(deepspeed=DS_CONFIG, ddp_backend="gloo") if tool == "deepspeed" else {}
        args = TrainingArguments(**common, **extra)
        model = tiny_model(family, pad_token_id=0)
        trainer = _recording(Trainer)(model=model, args=args, train_dataset=Dataset.from_list(token_rows(TINY["vocab_size"])))
    trainer.train()
    model = trainer.model
    offloader = model.checkpoint_offloader
    return {"losses": trainer.losses, "grads": trainer.grads, "micro_batches": len(trainer.losses),
            "offloaded_layers": model.offloaded_checkpointing_layers,
            "stored": None if offloader is None else offloader.stored,
            "stored_bytes": None if offloader is None else offloader.stored_bytes}


def main(out: str, families: list[str]) -> None:
    """DeepSpeed ZeRO-3 runs, with and without offload, for each family, in this one process (a world of one)."""
    import tempfile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            for name, offload in (("base", None), ("offload", {"offload": True})):
                results[(family, name)] = run("deepspeed", family, offload, f"{tmp}/{family}-{name}")
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
