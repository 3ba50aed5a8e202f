"""Typed training config: one dataclass, filled from an optional YAML/JSON file, then CLI flags.

    deepspeed train.py --deepspeed ds_configs/zero3_offload.json --config my.yaml --lr 2e-5

Precedence: dataclass defaults < `--config` file < command-line flags. File keys are the flag names
(`max_seq_len` or `max-seq-len`); an unknown key is an error. `--help` lists every field by group.
Values left as "auto" / None are resolved later (precision, attention, lr) and the resolved config is
written into the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import LongctxError, below_minimum, refuse_arguments

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "default_data"
DEFAULT_MODEL = str(DEFAULT_DATA_DIR / "tiny_llama.json")
DEFAULT_TOKENIZER = str(DEFAULT_DATA_DIR / "tokenizer")
RESUME_CHANGES = ("model", "tokenizer", "data", "max_seq_len", "global_batch")  # longctx/resume.py
DEFAULT_DATA = [str(DEFAULT_DATA_DIR / n) for n in ("text.jsonl", "chat.jsonl", "prompt_response.jsonl")]


def _f(default: Any, help: str, group: str, **kw) -> Any:
    meta = {"help": help, "group": group, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # ---- model -------------------------------------------------------------------------------
    model: str = _f(DEFAULT_MODEL, "A local Hugging Face model directory (weights loaded with from_pretrained) or a "
                    "config .json file (random initialization). Default: the embedded tiny GQA Llama.", "model")
    tokenizer: str = _f("", "Tokenizer directory. Default: the model directory if it has a tokenizer, else the "
                        "tokenizer shipped in longctx/default_data/tokenizer.", "model")
    attn_implementation: Literal["auto", "fa4", "sdpa_per_doc", "varlen", "flash_attention_2", "flash_attention_4",
                                 "sdpa", "eager"] = _f(
        "auto", "Attention kernel. auto = fa4 where flash-attn-4 is installed on an sm90 GPU in bf16/fp16 (its "
        "step measured faster there; not measured on sm100+), else sdpa_per_doc. fa4: flash-attention-4's varlen "
        "kernels (pip install 'flash-attn-4[cu13]==4.0.0b36'; sm90+). sdpa_per_doc: causal SDPA run per document "
        "of a packed row (cuDNN first on GPUs; no S x S mask, so packing works at any length). varlen: torch's "
        "varlen_attn (sm80+). flash_attention_2: the flash-attn package. flash_attention_4: transformers' own "
        "implementation over the same flash-attn-4 package (its autograd Function, as stock transformers runs it: "
        "no --keep-attention, which cannot see its kernels). sdpa / eager: upstream's (packing needs a dense mask, "
        "refused beyond --dense-mask-max-len).", "model")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "auto: bf16 on sm80+, fp16 with dynamic loss scaling on sm70, fp32 on CPU.", "model")
    liger: Literal["auto", "on", "off"] = _f(
        "auto", "Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy). auto: on when liger-kernel "
        "is installed and a GPU is used.", "model")
    gradient_checkpointing: bool = _f(True, "Recompute decoder layers in backward (activation checkpointing).",
                                      "model")
    offload_gradient_checkpointing: bool = _f(
        False, "Keep checkpointed hidden states in host RAM (needs the patched transformers fork).", "model")
    offload_impl: Literal["fork", "upstream"] = _f(
        "fork", "With --offload-gradient-checkpointing: fork = the fork's offloader (side-stream copies, prefetch); "
        "upstream = transformers' activation_checkpointing_enable(offload=True) (save_on_cpu), for comparison.",
        "model")
    num_offloaded_layers: Optional[int] = _f(None, "With --offload-gradient-checkpointing: how many layers "
                                             "offload their checkpoints (default: all).", "model")
    sequence_parallel: int = _f(1, "Ulysses sequence parallelism (DeepSpeed ALST): every row is spread over N "
                                "consecutive ranks, each holding 1/N of its tokens. Use it when one sample does "
                                "not fit on one GPU; keep N within a node. N must divide the world size and the "
                                "number of query heads. See docs/multinode.md.", "model")
    tiled_mlp: Optional[bool] = _f(None, "Run each decoder MLP over ceil(tokens / hidden) chunks of the sequence "
                                   "(DeepSpeed TiledMLP; recomputed in backward). Default: on only when the memory "
                                   "plan says the untiled step does not fit the GPU (tiling costs a recompute).",
                                   "model")
    keep_attention: Optional[bool] = _f(
        None, "Selective checkpointing: keep each layer's attention output and log-sum-exp on the GPU so backward "
        "does not rerun attention (the largest share of a long-context step); the rest of the layer is still "
        "recomputed. Default: on when checkpointing and the memory plan fits the kept outputs on the GPU.", "model")
    keep_attention_by: Literal["selective", "replay"] = _f(
        "selective", "How attention is kept: selective = torch's selective checkpointing (non-reentrant; every op "
        "of the layer runs through its dispatch mode); replay = the attention kernels' outputs recorded in forward "
        "and replayed in the recompute, the rest of the layer checkpointed as without --keep-attention.", "model")
    tiled_loss: bool = _f(True, "LM head + cross-entropy chunk by chunk, never holding [tokens x vocab] logits; "
                          "--no-tiled-loss materializes them (ablation).", "model")

    # ---- data --------------------------------------------------------------------------------
    data: list[str] = _f(DEFAULT_DATA, "Training files (.jsonl/.json/.parquet/.arrow, or a directory written by "
                         "datasets' save_to_disk). Each file holds one format: {text}, {messages} (chat template; "
                         "loss on assistant turns), {conversations} (ShareGPT's from/value, read as messages) or "
                         "{prompt,response} (loss on the response). PATH:WEIGHT on every file samples each by its "
                         "share of the training tokens (a.jsonl:0.7 b.parquet:0.3).", "data")
    eval_data: list[str] = _f([], "Evaluation files (same formats). If empty, --eval-fraction of the training "
                              "documents is held out.", "data")
    eval_fraction: float = _f(0.05, "Fraction of training documents held out for evaluation when --eval-data "
                              "is empty (0 disables evaluation).", "data")
    max_seq_len: int = _f(2048, "Tokens per row (a packed row, or one document when not packing).", "data")
    packing: bool = _f(True, "Pack documents into max_seq_len rows; positions restart per document and no "
                       "attention or loss crosses a document boundary.", "data")
    group_by_length: bool = _f(False, "Without packing: batch documents of similar length together.", "data")
    truncation: Literal["truncate", "drop", "error"] = _f(
        "truncate", "Documents longer than max_seq_len: keep the first max_seq_len tokens, drop them, or stop "
        "with an error.", "data")
    dense_mask_max_len: int = _f(8192, "Longest row for which a dense S x S attention mask (SDPA/eager with "
                                 "packing, the CPU path) is allowed; beyond it the run is refused.", "data")
    sft_truncation: Literal["context", "end"] = _f(
        "context", "With --truncation truncate, chat and prompt/response documents longer than max_seq_len: "
        "context keeps the question and the answer and cuts the context (the middle of the prompt; for chat the "
        "earliest non-system exchanges or the middle of the longest user turn); end keeps the first max_seq_len "
        "tokens like plain text (the old behaviour; it can cut the answer off).", "data")
    data_cache: str = _f("", "Where prepared (tokenized, memory-mapped) data is kept, keyed by the files' contents, "
                         "the tokenizer and the options above: default $LONGCTX_DATA_CACHE or ~/.cache/longctx/data. "
                         "Every rank of a node maps the same entry; a restart or resume reuses it.", "data")
    data_workers: int = _f(0, "Processes that tokenize when data is prepared (0: the host's cores).", "data")
    prepare_data: bool = _f(False, "Prepare the data into the cache (tokenize, truncate, ledger) and exit, before "
                            "any model or GPU work: run once on a large dataset, then train many times.", "data")
    sft_drop_limit: float = _f(0.1, "Stop before training when more than this fraction of an SFT file's documents "
                               "is unusable: dropped (too long, no assistant turn, nothing supervised left) or with "
                               "an empty response. 1 trains on whatever is left.", "data")

    # ---- training ----------------------------------------------------------------------------
    epochs: float = _f(1.0, "Passes over the training rows (ignored when --max-steps > 0).", "training")
    max_steps: int = _f(-1, "Optimizer steps to run; > 0 overrides --epochs.", "training")
    max_train_minutes: float = _f(0.0, "A wall-clock limit on the training loop (0: none): the step that passes it "
                                  "is the last one (it evaluates and saves as the final step would). The lr "
                                  "schedule stays the one planned for the full --max-steps / --epochs.", "training")
    micro_batch_size: int = _f(1, "Rows per GPU per forward (train_micro_batch_size_per_gpu).", "training")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (gradient_accumulation_steps).", "training")
    lr: Optional[float] = _f(None, "Peak learning rate. Default: 1e-5 for a --model you bring, 3e-3 for the "
                             "embedded tiny model.", "training")
    lr_scheduler: str = _f("cosine", "transformers scheduler name: linear, cosine, constant_with_warmup, "
                           "cosine_with_min_lr, ...", "training")
    warmup_steps: int = _f(-1, "Warmup steps; -1 uses --warmup-ratio.", "training")
    warmup_ratio: float = _f(0.05, "Warmup as a fraction of the total steps.", "training")
    weight_decay: float = _f(0.0, "AdamW weight decay.", "training")
    adam_beta1: float = _f(0.9, "AdamW beta1.", "training")
    adam_beta2: float = _f(0.95, "AdamW beta2.", "training")
    adam_eps: float = _f(1e-8, "AdamW epsilon.", "training")
    max_grad_norm: float = _f(1.0, "Gradient clipping (DeepSpeed gradient_clipping); 0 disables.", "training")
    overlap_optimizer_step: Literal["auto", "on", "off"] = _f(
        "auto", "Update the optimizer's CPU sub-groups in the background, in the order the next forward needs them; "
        "each module's forward waits for its own (bitwise the same step). auto: on with ZeRO-3 and the optimizer "
        "offloaded to CPU.", "training")
    seed: int = _f(42, "Seed for initialization, data order and the eval split.", "training")
    eval_interval: int = _f(0, "Evaluate every N steps (0: only at the end).", "training")
    fp16_collapse_patience: int = _f(3, "fp16: stop after this many consecutive overflowing steps at the "
                                     "minimum loss scale.", "training")

    # ---- LongLoRA (longctx/lora.py, longctx/s2attn.py) -----------------------------------------
    lora: bool = _f(False, "LongLoRA mode: train LoRA adapters (peft) plus --trainable-modules instead of every "
                    "weight; saves <output-dir>/adapter (see --merge).", "lora")
    lora_rank: int = _f(8, "LoRA rank r.", "lora")
    lora_alpha: int = _f(16, "LoRA alpha; the adapter's update is scaled by alpha / r.", "lora")
    lora_target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Linear layers that get "
                                        "adapters (names or comma lists; all-linear: every linear but the head).",
                                        "lora")
    trainable_modules: str = _f("embed,norm", "With --lora: also train every parameter whose name contains one of "
                                "these (comma list; LongLoRA's default trains embeddings and norms; none: LoRA only).",
                                "lora")
    s2_attn: Optional[int] = _f(None, "Shifted sparse attention (LongLoRA's S2-Attn) in training, with this group "
                                "size; --s2-attn alone (or 0): max_seq_len / 4. Eval uses full attention. Needs "
                                "--no-packing.", "lora", cli={"nargs": "?", "const": 0, "metavar": "GROUP"})
    merge: bool = _f(False, "With --lora: also write <output-dir>/final_model, the adapter, embeddings and norms "
                     "merged into the base weights (a plain Hugging Face model).", "lora")

    # ---- output ------------------------------------------------------------------------------
    output_dir: str = _f("runs/default", "Run directory: resolved config, metrics.jsonl, checkpoints/, "
                         "final_model/.", "output")
    save_interval: int = _f(0, "Save a DeepSpeed checkpoint every N steps (0: only at the end).", "output")
    keep_last: int = _f(2, "Complete checkpoints to keep (older ones are deleted).", "output")
    resume: str = _f("", "'auto': continue from the newest complete checkpoint in --output-dir (or start if "
                     "there is none); or a checkpoint directory.", "output")
    resume_allow_change: list[str] = _f([], "With --resume: continue although these changed since the run "
                                        "started (each is refused by name otherwise): model, tokenizer, data, "
                                        "max_seq_len, global_batch. The number of ranks and --sequence-parallel may "
                                        "change freely (ZeRO-3): grad accumulation is re-derived to keep the global "
                                        "batch.", "output")
    overwrite: bool = _f(False, "Replace a previous run in --output-dir.", "output")
    log_interval: int = _f(1, "Write a metrics.jsonl row every N steps.", "output")
    save_final_model: bool = _f(True, "At the end, write a consolidated Hugging Face model + tokenizer to "
                                "<output-dir>/final_model.", "output")

    # ---- launcher ----------------------------------------------------------------------------
    deepspeed: str = _f("ds_configs/zero3_offload.json", "DeepSpeed config JSON; \"auto\" values are filled "
                        "from these arguments.", "launcher")
    local_rank: int = _f(-1, "Set by the deepspeed launcher; ignored (the rank comes from the environment).",
                         "launcher")

    # ---- memory plan and preflight -----------------------------------------------------------
    plan: bool = _f(False, "Print the predicted peak GPU memory per rank, host RAM and pinned memory with a "
                    "breakdown, the longest --max-seq-len that fits, and the next knob to turn; then exit "
                    "without training. Needs no GPU.", "plan")
    gpus: Optional[int] = _f(None, "With --plan: GPUs of the target machine (default: this machine's).", "plan")
    gpu_mem: str = _f("", "With --plan: memory per GPU of the target, e.g. 16GiB (default: this machine's).",
                      "plan")
    host_mem: str = _f("", "With --plan: host RAM of the target, e.g. 512GiB (default: this machine's).", "plan")
    preflight: bool = _f(True, "Before the model is built, compare the plan with free GPU memory, host RAM and "
                         "the pinned-memory limit, and refuse a run that cannot fit (with the knob to turn).",
                         "plan")

    # ---- helpers -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("local_rank")
        return d

    @property
    def uses_embedded_model(self) -> bool:
        return Path(self.model).resolve() == Path(DEFAULT_MODEL)


GROUPS = {
    "model": "Model, precision and techniques",
    "data": "Data (formats, packing, truncation)",
    "training": "Training loop, optimizer and schedule",
    "lora": "LongLoRA: LoRA + trainable embeddings/norms, shifted sparse attention",
    "output": "Output, checkpoints and resume",
    "launcher": "Launcher",
    "plan": "Memory plan and preflight",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Full-parameter long-context fine-tuning with DeepSpeed. With no arguments, runs a short "
                    "fine-tune of an embedded tiny Llama on an embedded long-context dataset.",
        epilog="Example: deepspeed --num_gpus 4 train.py --deepspeed ds_configs/zero3_offload.json "
               "--model /models/Llama-3.1-8B --data docs.jsonl --max-seq-len 65536 --output-dir runs/llama64k",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file of these options (flag names as keys); "
                        "command-line flags override it.")
    groups = {k: parser.add_argument_group(v) for k, v in GROUPS.items()}
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp, optional = _unwrap_optional(hints[f.name])
        g = groups[f.metadata["group"]]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [_flag(f.name)]
        if "_" in f.name and tp is not bool:
            names.append("--" + f.name)  # accept --max_seq_len too (and the launcher's --local_rank)
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": default}
        if tp is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = str
        elif typing.get_origin(tp) is list:
            kw["nargs"] = "*"
            kw["type"] = str
        else:
            kw["type"] = tp
        if optional and kw.get("type") in (int, float):
            base = kw["type"]
            kw["type"] = lambda s, base=base: None if s.lower() in ("none", "null", "") else base(s)
        kw.update(f.metadata.get("cli", {}))  # e.g. an optional value: --s2-attn [GROUP]
        g.add_argument(*names, **kw)
    return parser


def _load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LongctxError(f"--config {path}: file not found")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError carry the line
        raise LongctxError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise LongctxError(f"--config {path}: expected a mapping of option names to values")
    return data


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a value from a config file against the field type (the CLI path is checked by argparse)."""
    tp, optional = _unwrap_optional(typing.get_type_hints(Config)[name])
    if value is None and optional:
        return None
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typing.get_origin(tp) is Literal:
        ok = value in typing.get_args(tp)
    elif typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise LongctxError(f"{source}: option '{name}' has value {value!r}, expected {tp}")
    return value


def parse(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    pre, _ = pre_parser.parse_known_args(argv)
    names = {f.name for f in dataclasses.fields(Config)}
    if pre.config:
        file_values = {}
        for key, value in _load_file(pre.config).items():
            name = str(key).replace("-", "_")
            if name not in names:
                close = difflib.get_close_matches(name, sorted(names), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise LongctxError(f"--config {pre.config}: unknown option '{key}'{hint}")
            file_values[name] = _coerce(name, value, f"--config {pre.config}")
        parser.set_defaults(**file_values)
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if k in names}
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need nothing but the config itself."""
    problems = []
    if cfg.max_seq_len < 8:
        problems.append(f"--max-seq-len {cfg.max_seq_len} is too small (>= 8)")
    problems += below_minimum(cfg, {"micro_batch_size": 1, "grad_accum": 1, "keep_last": 1, "sequence_parallel": 1})
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        problems.append("set --epochs > 0 or --max-steps > 0")
    if not 0 <= cfg.sft_drop_limit <= 1:
        problems.append(f"--sft-drop-limit must be in [0, 1], got {cfg.sft_drop_limit}")
    if not 0 <= cfg.eval_fraction < 1:
        problems.append(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.lr is not None and cfg.lr < 0:
        problems.append(f"--lr must be >= 0, got {cfg.lr}")
    if not cfg.data:
        problems.append("--data: give at least one training file")
    unknown = [c for c in cfg.resume_allow_change if c not in RESUME_CHANGES]
    if unknown:
        problems.append(f"--resume-allow-change {' '.join(unknown)}: not one of {', '.join(RESUME_CHANGES)}")
    if cfg.resume_allow_change and not cfg.resume:
        problems.append("--resume-allow-change needs --resume")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume and --overwrite contradict each other; pick one")
    if cfg.num_offloaded_layers is not None and not cfg.offload_gradient_checkpointing:
        problems.append("--num-offloaded-layers needs --offload-gradient-checkpointing")
    if cfg.offload_gradient_checkpointing and not cfg.gradient_checkpointing:
        problems.append("--offload-gradient-checkpointing needs --gradient-checkpointing")
    if cfg.keep_attention and not cfg.gradient_checkpointing:
        problems.append("--keep-attention is a checkpointing mode: it needs --gradient-checkpointing")
    if cfg.lora or cfg.merge:
        from .lora import config_problems as lora_problems

        problems += lora_problems(cfg)
    if cfg.s2_attn is not None:
        from .s2attn import config_problems as s2attn_problems

        problems += s2attn_problems(cfg)
    refuse_arguments(problems)

