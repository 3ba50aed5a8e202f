"""What a resume may change, and what it must keep; decided in Trainer.prepare, before the data or the model is
loaded.

Free to change: the number of ranks and the sequence-parallel degree. batching.BatchSchedule orders each step's rows
from (rows, seed, global batch) alone and only then splits them over ranks and micro-batches, so the sample ids of a
step do not depend on the layout that trains it. The global batch (rows per optimizer step: micro-batch x grad
accumulation x data-parallel ranks) is kept: grad accumulation is re-derived for the new layout, or the run is
refused with the reason. A checkpoint written by another layout is loaded through its universal form
(universal.py; ZeRO-3 only).

Kept, each refused by name unless --resume-allow-change names it: the model (its path and shape), the tokenizer
(everything that decides token ids), the data (the files' names and bytes, wherever they now are: the file part of
the prepared-data key, datastore.files_digest; the sampling weights), max_seq_len and the global batch. An allowed
change continues from the checkpoint's step on the new setting's batch schedule; the ledger then says the sample ids
are not the uninterrupted run's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import LongctxError

FLAG = "--resume-allow-change"
# what a model's shape is, for "the model changed" (its path is compared too; its weights are not hashed)
MODEL_SHAPE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def identity(cfg, tok, model_config) -> dict:
    """What run.json records of the model, tokenizer and data, for the next resume to compare."""
    from . import data as data_mod, datastore

    paths, weights = data_mod.parse_data_spec(cfg.data)
    paths = [p for p in paths if Path(p).exists()]  # a missing file is refused by data.build, with its message
    return {"model": {k: getattr(model_config, k, None) for k in MODEL_SHAPE},
            "tokenizer": datastore.tokenizer_fingerprint(tok),
            "data": datastore.files_digest(paths, datastore.cache_root(cfg.data_cache)), "data_weights": weights}


def check_identity(cfg, record: dict, ident: dict) -> list[str]:
    """Refuse a changed model, tokenizer, data or max_seq_len (against run.json of the run being resumed), each
    named, unless --resume-allow-change names it. Returns the allowed changes that did happen."""
    old_cfg, new_cfg, old_id = record.get("config", {}), cfg.to_dict(), record.get("identity") or {}
    found: dict[str, list[str]] = {}

    def differs(what: str, key: str, old, new) -> None:
        if old != new:
            found.setdefault(what, []).append(f"{key}: {old!r} -> {new!r}")

    differs("model", "--model", old_cfg.get("model"), new_cfg["model"])
    if "model" in old_id:
        changed = {k: (v, ident["model"].get(k)) for k, v in old_id["model"].items() if ident["model"].get(k) != v}
        if changed:
            found.setdefault("model", []).append("shape: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                                       for k, (a, b) in changed.items()))
    # the tokenizer and the data by what they are where run.json recorded it (a moved copy is the same data), else
    # by their paths
    if "tokenizer" in old_id:
        if old_id["tokenizer"] != ident["tokenizer"]:
            found["tokenizer"] = [f"--tokenizer {new_cfg['tokenizer'] or '(default)'}: its token ids differ "
                                  "(vocabulary, merges, special tokens or chat template)"]
    else:
        differs("tokenizer", "--tokenizer", old_cfg.get("tokenizer"), new_cfg["tokenizer"])
    if "data" in old_id:
        was, now = [n for n, _ in old_id["data"]], [n for n, _ in ident["data"]]
        if was != now:
            found["data"] = [f"files {was} -> {now}"]
        else:
            edited = [n for (n, a), (_, b) in zip(old_id["data"], ident["data"]) if a != b]
            if edited:
                found["data"] = [f"contents changed: {', '.join(edited)}"]
        if old_id.get("data_weights") != ident["data_weights"]:
            found.setdefault("data", []).append(f"sampling weights {old_id.get('data_weights')} -> "
                                                f"{ident['data_weights']}")
    else:
        differs("data", "--data", old_cfg.get("data"), new_cfg["data"])
    differs("max_seq_len", "--max-seq-len", old_cfg.get("max_seq_len"), new_cfg["max_seq_len"])

    allowed = set(cfg.resume_allow_change)
    refused = {k: v for k, v in found.items() if k not in allowed}
    if refused:
        lines = [f"{what} changed: {'; '.join(why)}" for what, why in refused.items()]
        raise LongctxError(
            f"cannot resume the run in {cfg.output_dir}: what it trains on changed since it was started.\n  "
            + "\n  ".join(lines) + f"\nResume with the original settings, or pass {FLAG} "
            + " ".join(refused) + " to continue from the checkpoint on the new one (the data order from there is "
            "the new setting's, not the uninterrupted run's).")
    return sorted(found)


@dataclass(frozen=True)
class Layout:
    """How rows were (or will be) spread: ranks, sequence-parallel degree, micro-batch, grad accumulation."""

    world: int
    sp: int
    micro: int
    accum: int

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.dp

    def describe(self) -> str:
        sp = f", sequence parallel {self.sp}" if self.sp > 1 else ""
        return (f"{self.world} rank{'s' if self.world != 1 else ''}{sp}: micro-batch {self.micro} x grad_accum "
                f"{self.accum} x {self.dp} data-parallel = {self.global_batch} rows per step")

    def to_dict(self) -> dict:
        return {"world_size": self.world, "sequence_parallel": self.sp, "micro_batch_size": self.micro,
                "grad_accum": self.accum, "global_batch": self.global_batch}


def written_layout(ckpt: Path, record: dict) -> Layout:
    """The layout that wrote checkpoint `ckpt`: its trainer_state.json, completed from run.json (older
    checkpoints recorded only the world size)."""
    state_file = Path(ckpt) / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    rec_cfg = record.get("config", {})
    world = state.get("world_size", record.get("world_size"))
    if world is None:
        raise LongctxError(f"{ckpt}: neither trainer_state.json nor run.json says how many ranks wrote it")
    pick = lambda key: int(state.get(key, rec_cfg.get(key, 1)))  # noqa: E731
    return Layout(int(world), pick("sequence_parallel"), pick("micro_batch_size"), pick("grad_accum"))


@dataclass
class Resume:
    """A resume from `ckpt` (step `step`) written by `source`, continued by `target`."""

    ckpt: Path
    step: int
    source: Layout
    target: Layout
    allowed: list[str] = field(default_factory=list)  # --resume-allow-change values that changed something
    universal: Optional[Path] = None  # set once converted (Trainer.build)

    @property
    def reshard(self) -> bool:
        """Another number of ranks or sequence-parallel degree: the optimizer partitions must be recut."""
        return (self.source.world, self.source.sp) != (self.target.world, self.target.sp)

    @property
    def same_samples(self) -> bool:
        return not self.allowed

    def describe(self) -> str:
        if not self.reshard and self.source.accum == self.target.accum:
            return f"resuming from {self.ckpt} (step {self.step}) on the layout that wrote it"
        return (f"resuming from {self.ckpt} (step {self.step}), written by {self.source.describe()}; continuing on "
                f"{self.target.describe()}" + ("; its optimizer partitions are recut through the universal form"
                                               if self.reshard else ""))

    def ledger_entry(self) -> dict:
        from .universal import path_for

        if self.same_samples:
            samples = (f"the sample ids of steps {self.step + 1} on equal those of an uninterrupted run: the global "
                       f"batch of {self.target.global_batch} rows is kept and each step's rows do not depend on the "
                       "number of ranks")
        else:
            samples = (f"changed by {FLAG} {' '.join(self.allowed)}: the sample ids of steps {self.step + 1} on "
                       "are the new setting's, not those of an uninterrupted run")
        return {"at_step": self.step, "checkpoint": str(self.ckpt), "from": self.source.to_dict(),
                "to": self.target.to_dict(), "universal": str(path_for(self.ckpt)) if self.reshard else None,
                "allowed_changes": self.allowed, "sample_ids": samples}


def keep_global_batch(cfg, ckpt: Path, record: dict, world: int, allowed: list[str]):
    """(cfg, Resume): cfg with grad accumulation re-derived so that the global batch stays the checkpoint's, or a
    refusal that says why it cannot stay. A changed global batch passes only with --resume-allow-change
    global_batch."""
    import dataclasses

    from .checkpoint import _TAG

    source = written_layout(ckpt, record)
    micro, sp = cfg.micro_batch_size, cfg.sequence_parallel
    dp = world // sp
    accum = cfg.grad_accum
    g = source.global_batch
    unchanged = accum in (source.accum, record.get("config", {}).get("grad_accum"))  # not asked for by the user
    if micro * accum * dp != g and unchanged and "global_batch" not in cfg.resume_allow_change:
        if g % (micro * dp):
            fits = [d for d in range(1, g // micro + 1) if (g // micro) % d == 0] if g % micro == 0 else []
            raise LongctxError(
                f"cannot resume {ckpt} on {world} rank{'s' if world != 1 else ''}"
                + (f" (sequence parallel {sp})" if sp > 1 else "") + f": it was written by {source.describe()}, "
                f"and {g} rows per step cannot be split into micro-batches of {micro} over {dp} data-parallel "
                f"rank{'s' if dp != 1 else ''} ({g} is not a multiple of {micro} x {dp}). Resume on a number of "
                "data-parallel ranks that divides it" + (f" ({', '.join(map(str, fits))})" if fits else "")
                + ", or change --micro-batch-size, or pass --resume-allow-change global_batch with --grad-accum "
                "to continue with another global batch.")
        accum = g // (micro * dp)
    target = Layout(world, sp, micro, accum)
    if target.global_batch != g:
        if "global_batch" not in cfg.resume_allow_change:
            raise LongctxError(
                f"cannot resume {ckpt}: the global batch changed: it was written by {source.describe()}; this run "
                f"has {target.describe()}. Keep {g} rows per step (--micro-batch-size x --grad-accum x "
                f"data-parallel ranks), or pass {FLAG} global_batch to continue with {target.global_batch} (the "
                "data order from there is the new batch's).")
        allowed = sorted(set(allowed) | {"global_batch"})
    step = int(_TAG.match(Path(ckpt).name).group(1))
    return dataclasses.replace(cfg, grad_accum=accum), Resume(Path(ckpt), step, source, target, allowed)


def check_stage(r: Resume, ds_config: dict) -> None:
    """A recut of the optimizer partitions needs a ZeRO-3 checkpoint and a ZeRO-3 run (universal.py)."""
    from . import dsconfig, universal

    if not r.reshard:
        return
    if not (universal.is_zero3_checkpoint(r.ckpt) and dsconfig.is_zero3(ds_config)):
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        raise LongctxError(
            f"cannot resume {r.ckpt} on {r.target.world} ranks (sequence parallel {r.target.sp}): it was "
            f"written by {r.source.world} ranks (sequence parallel {r.source.sp}), and only ZeRO-3 "
            f"checkpoints resumed under ZeRO-3 are converted to the world-size-free form here (this run: ZeRO stage "
            f"{stage}{'' if universal.is_zero3_checkpoint(r.ckpt) else '; the checkpoint: not ZeRO-3'}). Resume "
            f"on {r.source.world} ranks with --sequence-parallel {r.source.sp}, or use a ZeRO-3 ds_config "
            "(ds_configs/zero3.json, zero3_offload.json) from the start.")
