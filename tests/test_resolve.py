"""longctx.resolve: every "auto" decided once, from the config, the device facts and the model config; `--plan`
shows the same resolution, and a run writes it to resolved.json."""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers_train import REPO
from longctx import config, placement, resolve, runs
from longctx.errors import LongctxError
from longctx.flops import ModelShape
from longctx.plan import plan
from longctx.plan_report import cli_plan
from longctx.plan_search import check_fit, layer_sub_group_size, split_at
from longctx.plan_settings import setup_from_resolved
from longctx.plan_states import optimizer_sub_groups

L8B_8L = json.loads((REPO / "longctx" / "default_data" / "llama3.1-8b.json").read_text()) | {"num_hidden_layers": 8}
H200 = resolve.Facts("cuda", "NVIDIA H200", (9, 0), 141 << 30, gpus=1, host_mem=125 << 30, varlen_attn=True,
                     liger=True, fork=True)
A6000 = dataclasses.replace(H200, name="NVIDIA RTX A6000", capability=(8, 6), gpu_mem=48 << 30)
GiB = 1 << 30


def _optimizer_on_cpu() -> str:
    """zero3_offload.json with offload_optimizer.ratio 1: every optimizer state on the CPU, the placement under which
    the parameter rule, tiling and kept attention were measured."""
    import tempfile
    from pathlib import Path

    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["offload_optimizer"]["ratio"] = 1
    f = Path(tempfile.mkdtemp(prefix="longctx-test-resolve-")) / "zero3_offload_cpu.json"
    f.write_text(json.dumps(ds))
    return str(f)


OPTIMIZER_ON_CPU = _optimizer_on_cpu()


def settings(facts, *flags, world=1, model=L8B_8L):
    if "--deepspeed" not in flags:
        flags = ("--deepspeed", OPTIMIZER_ON_CPU) + flags
    return resolve.resolve(config.parse(list(flags)), facts, model, world)


def auto_settings(facts, *flags, world=1, model=L8B_8L):
    """With the shipped zero3_offload.json: offload_optimizer.ratio "auto"."""
    return resolve.resolve(config.parse(list(flags)), facts, model, world)


def test_defaults_on_a_large_card():
    s = settings(H200, "--max-seq-len", "131072", "--offload-gradient-checkpointing")
    assert (s.precision, s.attention, s.attn_impl, s.liger) == ("bf16", "sdpa_per_doc", resolve.SDPA_PER_DOC, True)
    assert (s.checkpointing, s.offload_impl, s.num_offloaded_layers) == ("offload", "fork", 8)
    assert s.keep_attention and not s.reentrant  # 8 GiB of kept attention outputs fit a 141 GiB card
    assert not s.tiled_mlp and "fits" in s.why["tiled_mlp"]  # 128K fits a 141 GiB card untiled: no recompute
    assert s.offload_params and s.offload_optimizer and s.zero_stage == 3  # they fit, but measured faster offloaded
    assert s.ds_config["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_tiled_mlp_only_when_the_plan_needs_it():
    """The same run on a smaller card: tiled MLP turns on exactly when the untiled plan does not fit it."""
    for gib in (16, 24, 32, 48, 80):
        facts = dataclasses.replace(A6000, gpu_mem=gib * GiB)
        s = settings(facts, "--max-seq-len", "131072", "--offload-gradient-checkpointing")
        cfg = config.parse(["--max-seq-len", "131072", "--offload-gradient-checkpointing"])
        untiled = plan(setup_from_resolved(dataclasses.replace(s, tiled_mlp=False, tiled_mlp_shards=1),
                                                     cfg, L8B_8L))
        hw = resolve.Facts.of_sizes(gpus=1, gpu_mem=gib * GiB, host_mem=125 * GiB)
        assert s.tiled_mlp == (not check_fit(untiled, hw).gpu_ok), gib
        assert s.tiled_mlp_shards == (32 if s.tiled_mlp else 1)  # ceil(128K / 4096)
    assert settings(dataclasses.replace(A6000, gpu_mem=16 * GiB), "--max-seq-len", "131072",
                    "--offload-gradient-checkpointing").tiled_mlp
    assert not settings(dataclasses.replace(A6000, gpu_mem=16 * GiB), "--max-seq-len", "131072", "--no-tiled-mlp",
                        "--offload-gradient-checkpointing").tiled_mlp  # an explicit choice stands


def test_params_go_to_cpu_when_they_do_not_fit_and_explicit_placement_stands(tmp_path):
    s = settings(H200, "--max-seq-len", "8192")
    assert s.offload_params  # the measured rule
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["offload_param"]["device"] = "none"
    ds["zero_optimization"]["offload_optimizer"]["ratio"] = 1
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    s = settings(H200, "--max-seq-len", "8192", "--deepspeed", str(tmp_path / "ds.json"))
    assert not s.offload_params and s.why["offload_params"] == "ds_config: offload_param.device none"


def test_cpu_resolution():
    s = settings(resolve.Facts(), "--max-seq-len", "512", model=json.loads(
        (REPO / "longctx" / "default_data" / "tiny_llama.json").read_text()))
    assert (s.precision, s.attention, s.liger, s.tiled_mlp, s.offload_params) == ("fp32", "sdpa_per_doc", False,
                                                                                   False, False)
    assert "offload_param" not in s.ds_config["zero_optimization"]


def test_refusals_are_decided_here():
    with pytest.raises(LongctxError, match="needs the patched transformers fork"):
        settings(dataclasses.replace(H200, fork=False), "--offload-gradient-checkpointing")
    assert settings(dataclasses.replace(H200, fork=False), "--offload-gradient-checkpointing", "--offload-impl",
                    "upstream").offload_impl == "upstream"
    with pytest.raises(LongctxError, match="liger-kernel is not installed"):
        settings(dataclasses.replace(H200, liger=False), "--liger", "on")
    with pytest.raises(LongctxError, match="--no-tiled-loss needs Liger"):
        settings(H200, "--no-tiled-loss")


def test_plan_prints_the_resolution_train_py_uses():
    """`--plan` for a target machine resolves through the same function: its resolved lines are the settings'."""
    args = ["--model", str(REPO / "longctx" / "default_data" / "llama3.1-8b.json"), "--max-seq-len", "65536",
            "--offload-gradient-checkpointing", "--liger", "on", "--gpus", "4", "--gpu-mem", "16GiB",
            "--host-mem", "512GiB"]
    cfg = config.parse(args + ["--plan"])
    text = cli_plan(cfg)
    facts = resolve.Facts.detect().as_target(gpus=4, gpu_mem=16 * GiB, host_mem=512 * GiB, precision="auto")
    s = resolve.resolve(cfg, facts, json.loads((REPO / "longctx" / "default_data" / "llama3.1-8b.json").read_text()), 4)
    assert s.tiled_mlp  # 64K on a 16 GiB card needs it
    for k, v in s.reasons():
        assert f"{k}: {v}" in text
    assert "; ".join(s.header()[:2]) in text
    assert "ds_configs/zero3.json" not in text  # 8B's states (128 GB) do not fit 4 x 16 GiB


def test_plan_points_to_zero3_json_where_the_whole_states_fit():
    """Where the optimizer is offloaded but parameters, gradients and Adam states all fit the GPUs, `--plan` says
    what ds_configs/zero3.json would plan to; not where they do not fit, nor where the config already keeps them."""
    tiny = ["--gpus", "1", "--gpu-mem", "80GiB", "--host-mem", "128GiB", "--plan", "--deepspeed", OPTIMIZER_ON_CPU]
    text = cli_plan(config.parse(tiny))
    assert "The whole model's states fit the GPUs: with --deepspeed ds_configs/zero3.json" in text
    on_gpu = config.parse(tiny[:-2] + ["--deepspeed", str(REPO / "ds_configs" / "zero3.json")])
    assert "ds_configs/zero3.json (parameters" not in cli_plan(on_gpu)
    eight_b = ["--model", str(REPO / "longctx" / "default_data" / "llama3.1-8b.json"), "--max-seq-len", "32768"]
    assert "states fit" not in cli_plan(config.parse(eight_b + tiny))  # 128 GB of states on one 80 GiB card
    assert "states fit" in cli_plan(config.parse(eight_b + tiny[:1] + ["8"] + tiny[2:]))  # 16 GB each of 8


def test_resolved_json_round_trips(tmp_path):
    s = settings(H200, "--max-seq-len", "16384")
    runs.write_resolved(tmp_path, s)
    d = json.loads((tmp_path / "resolved.json").read_text())
    assert d == json.loads(json.dumps(s.to_dict(), default=str))


def test_host_ram_is_not_a_reason_to_tile_or_move_parameters():
    """Tiling and placement answer to GPU memory; a host too small for the run is the preflight's refusal."""
    small_host = dataclasses.replace(H200, host_mem=8 * GiB)
    a = settings(small_host, "--max-seq-len", "65536", "--offload-gradient-checkpointing")
    b = settings(H200, "--max-seq-len", "65536", "--offload-gradient-checkpointing")
    assert (a.tiled_mlp, a.offload_params) == (b.tiled_mlp, b.offload_params) == (False, True)


def test_attention_is_kept_only_where_the_plan_fits_it():
    """--keep-attention auto: on exactly when the plan with every layer's attention output kept fits the card;
    the kept bytes are the layers' output + log-sum-exp; an explicit choice stands; no checkpointing, no keeping."""
    flags = ["--max-seq-len", "131072", "--offload-gradient-checkpointing"]
    cfg = config.parse(flags)
    seen = set()
    for gib in (16, 24, 32, 48, 80):
        facts = dataclasses.replace(A6000, gpu_mem=gib * GiB)
        s = settings(facts, *flags)
        kept = plan(setup_from_resolved(dataclasses.replace(s, keep_attention=True, reentrant=False),
                                                  cfg, L8B_8L))
        hw = resolve.Facts.of_sizes(gpus=1, gpu_mem=gib * GiB, host_mem=125 * GiB)
        assert s.keep_attention == check_fit(kept, hw).gpu_ok, gib
        assert s.reentrant == (not s.keep_attention)
        item = kept.components()["kept attention outputs"]
        assert item == 8 * 131072 * (32 * 128 * 2 + 32 * 4)  # layers x tokens x (bf16 output + fp32 LSE per head)
        seen.add(s.keep_attention)
    assert seen == {True, False}
    assert not settings(H200, *flags, "--no-keep-attention").keep_attention
    assert settings(dataclasses.replace(A6000, gpu_mem=16 * GiB), *flags, "--keep-attention").keep_attention
    assert not settings(H200, "--no-gradient-checkpointing").keep_attention
    short = settings(H200, "--max-seq-len", "32768", "--offload-gradient-checkpointing")
    assert not short.keep_attention and short.reentrant and "under 64K" in short.why["keep_attention"]
    assert settings(H200, "--max-seq-len", "32768", "--keep-attention").keep_attention  # an explicit choice stands
    assert not settings(resolve.Facts(), "--max-seq-len", "512", model=json.loads(
        (REPO / "longctx" / "default_data" / "tiny_llama.json").read_text())).keep_attention  # CPU: nothing to plan
    with pytest.raises(LongctxError, match="--keep-attention is a checkpointing mode"):
        config.parse(["--keep-attention", "--no-gradient-checkpointing"])
    # kept by replay: the same decision and plan, on the reentrant path plain checkpointing takes
    by_replay = settings(H200, *flags, "--keep-attention-by", "replay")
    selective = settings(H200, *flags)
    assert by_replay.keep_attention and by_replay.reentrant and by_replay.keep_attention_by == "replay"
    assert not selective.reentrant and selective.keep_attention_by == "selective"
    assert "attention kept (replayed)" in by_replay.header()[0]
    assert plan(setup_from_resolved(by_replay, cfg, L8B_8L)).components()["kept attention outputs"] == \
        plan(setup_from_resolved(selective, cfg, L8B_8L)).components()["kept attention outputs"]
    with pytest.raises(LongctxError, match="causal without a mask"):  # its custom name gets no mask from transformers
        settings(H200, *flags, "--keep-attention", "--keep-attention-by", "replay", "--attn-implementation", "sdpa",
                 "--max-seq-len", "4096")
    assert settings(H200, *flags, "--keep-attention", "--keep-attention-by", "replay", "--attn-implementation",
                    "sdpa", "--no-packing").keep_attention
    with pytest.raises(ValueError, match="needs non-reentrant"):
        setup_from_resolved(dataclasses.replace(selective, reentrant=True), cfg, L8B_8L)


def test_checkpoints_the_host_cannot_hold_stay_on_the_gpu():
    """--offload-gradient-checkpointing with --num-offloaded-layers unset: every layer's checkpoint goes to host RAM
    where the plan fits them there, else the most that fit (the 3B shape at 256K on a 125 GiB host), and the plan
    of the resolved run then fits the host; an explicit --num-offloaded-layers stands."""
    from bench.shapes import make_config

    m3b = make_config("llama3.2-3b").to_dict()
    h100 = dataclasses.replace(H200, name="NVIDIA H100", gpu_mem=80 * GiB)
    hw = resolve.Facts.of_sizes(gpus=1, gpu_mem=80 * GiB, host_mem=125 * GiB)
    flags = ("--max-seq-len", "262144", "--offload-gradient-checkpointing")
    s = settings(h100, *flags, model=m3b)
    setup = setup_from_resolved(s, config.parse(list(flags)), m3b)
    assert 0 < s.num_offloaded_layers < 28 and "stay on the GPU" in s.why["checkpointing"]
    assert check_fit(plan(setup), hw).host_ok
    more = dataclasses.replace(setup, num_offloaded_layers=s.num_offloaded_layers + 1)
    assert not check_fit(plan(more), hw).host_ok  # the most that fit, not fewer
    big = settings(dataclasses.replace(h100, host_mem=512 * GiB), *flags, model=m3b)
    assert big.num_offloaded_layers == 28
    assert settings(h100, *flags, "--num-offloaded-layers", "28", model=m3b).num_offloaded_layers == 28


# ---- where the optimizer states go: offload_optimizer.ratio "auto" ------------------------------------------
L8B = json.loads((REPO / "longctx" / "default_data" / "llama3.1-8b.json").read_text())
H100 = dataclasses.replace(H200, name="NVIDIA H100", gpu_mem=80 * GiB)


def test_optimizer_states_all_on_the_gpu_where_they_fit():
    """8B shape at 8 layers on an H200 at 16K: parameters, gradients and every Adam state fit beside the step, so
    auto keeps them all on the GPU (zero3.json's placement): no offload section is left in the ds_config."""
    s = auto_settings(H200, "--max-seq-len", "16384")
    assert not s.offload_optimizer and not s.offload_params and s.optimizer_ratio is None
    zero = s.ds_config["zero_optimization"]
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert s.ds_config["optimizer"]["params"]["torch_adam"]  # no CPU Adam
    assert s.why["optimizer"].startswith("auto: every state on the GPU")
    assert "zero3.json's placement" in s.why["offload_params"]
    assert "on CPU: nothing" in s.header()[1]


@pytest.mark.parametrize("facts,length,gpu_groups", [(H200, 32768, 33), (H200, 65536, 30), (H200, 131072, 23),
                                                     (H100, 32768, 16), (H100, 65536, 13)])
def test_optimizer_states_split_by_the_largest_gpu_share_that_fits(facts, length, gpu_groups):
    """Llama-3.1-8B at full depth on one GPU (issue "Full depth"): all on the GPU does not fit; auto keeps the most
    sub-groups' states on the GPU that the plan fits, fewer as the step's activations grow. One more would not fit."""
    s = auto_settings(facts, "--max-seq-len", str(length), model=L8B)
    assert s.offload_optimizer and s.offload_params and 0 < s.optimizer_ratio < 1
    zero = s.ds_config["zero_optimization"]
    assert zero["offload_optimizer"]["ratio"] == s.optimizer_ratio and zero["sub_group_size"] == layer_sub_group_size(ModelShape.from_config(L8B), 1)
    cfg = config.parse(["--max-seq-len", str(length)])
    chosen = setup_from_resolved(s, cfg, L8B)
    on, off = optimizer_sub_groups(chosen)
    assert (len(on), len(on) + len(off)) == (gpu_groups, 34)
    hw = resolve.Facts.of_sizes(gpus=1, gpu_mem=facts.gpu_mem, host_mem=facts.host_mem)
    assert check_fit(plan(chosen), hw).gpu_ok
    assert not check_fit(plan(split_at(chosen, gpu_groups + 1)), hw).gpu_ok
    assert f"{gpu_groups} of 34 sub-groups' states on the GPU" in s.why["optimizer"]
    assert f"optimizer (ratio {s.optimizer_ratio:g}: the rest on the GPU)" in s.header()[1]
    assert plan(chosen).components()["Twin-Flow sub-groups: fp32 master, grad, Adam m, v"] == 16 * sum(on)


def test_optimizer_states_all_on_the_cpu_where_not_one_sub_group_fits():
    small = dataclasses.replace(H200, gpu_mem=16 * GiB)
    s = auto_settings(small, "--max-seq-len", "65536", "--offload-gradient-checkpointing", model=L8B)
    assert s.offload_optimizer and s.optimizer_ratio == 1.0
    # no split; the overlapped step (auto: on here) takes one layer's sub-groups, without it DeepSpeed's default
    assert s.overlap_step and s.ds_config["zero_optimization"]["sub_group_size"] == 218_112_000
    off = auto_settings(small, "--max-seq-len", "65536", "--offload-gradient-checkpointing",
                        "--overlap-optimizer-step", "off", model=L8B)
    assert off.ds_config["zero_optimization"]["sub_group_size"] == 1_000_000_000
    assert s.why["optimizer"].startswith("auto: all on the CPU")
    cpu = auto_settings(resolve.Facts(), "--max-seq-len", "512", model=json.loads(
        (REPO / "longctx" / "default_data" / "tiny_llama.json").read_text()))
    assert cpu.optimizer_ratio == 1.0 and cpu.why["optimizer"] == "auto: all on the CPU (no GPU to plan against)"


def test_optimizer_states_stay_on_the_cpu_where_the_host_holds_them_though_a_split_would_fit():
    """A split is for hosts that cannot hold the states (its one measurement was slow, and it takes GPU room): with
    512 GiB of host RAM the 8B states stay on the CPU, where the same GPU with 125 GiB gets a split."""
    big_host = dataclasses.replace(H100, host_mem=512 * GiB)
    s = auto_settings(big_host, "--max-seq-len", "32768", model=L8B)
    assert s.offload_optimizer and s.optimizer_ratio == 1.0
    assert s.why["optimizer"].startswith("auto: all on the CPU (all on the GPU would plan") and "the host holds" in s.why["optimizer"]
    assert not s.tiled_mlp  # the room a split would have taken stays the activations'
    small_host = auto_settings(H100, "--max-seq-len", "32768", model=L8B)
    assert 0 < small_host.optimizer_ratio < 1 and "all on the CPU 156.7 GiB of host RAM" in small_host.why["optimizer"]


def test_optimizer_states_leave_the_gpu_where_that_is_what_lets_attention_be_kept():
    """8B shape at 8 layers on an H100, one 128K document: every state fits the GPU only with attention recomputed
    (measured slower than the states on the CPU with attention kept), so auto puts them on the CPU and keeps it.
    At 64K both fit the GPU; where the row is too short for keeping, or keeping is refused, the states stay."""
    s = auto_settings(H100, "--max-seq-len", "131072")
    assert (s.optimizer_ratio, s.keep_attention, s.overlap_step) == (1.0, True, True)
    assert s.why["optimizer"] == placement.KEEP_OVER_GPU_STATES_WHY
    # the step fits as resolved; with keeping refused, every state stays on the GPU
    cfg = config.parse(["--max-seq-len", "131072"])
    assert check_fit(plan(setup_from_resolved(s, cfg, L8B_8L)), H100).gpu_ok
    gpu = auto_settings(H100, "--max-seq-len", "131072", "--no-keep-attention")
    assert not gpu.offload_optimizer and not gpu.offload_params and not gpu.keep_attention
    for n in ("65536", "16384"):
        short = auto_settings(H100, "--max-seq-len", n)
        assert not short.offload_optimizer and short.keep_attention == (n == "65536")


def test_an_explicit_optimizer_ratio_wins_and_is_checked(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    for ratio in (0.5, 1, 0):
        ds["zero_optimization"]["offload_optimizer"]["ratio"] = ratio
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        s = auto_settings(H200, "--max-seq-len", "16384", "--deepspeed", str(tmp_path / "ds.json"))
        assert s.offload_optimizer and s.optimizer_ratio == ratio  # even 0: offloaded, every sub-group on the GPU
        assert s.why["optimizer"].startswith(f"ds_config: offload_optimizer.ratio {ratio:g}")
    for bad in (1.5, -0.1, "half", True):
        ds["zero_optimization"]["offload_optimizer"]["ratio"] = bad
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        with pytest.raises(LongctxError, match="offload_optimizer.ratio must be"):
            auto_settings(H200, "--deepspeed", str(tmp_path / "ds.json"))


def test_plan_shows_each_optimizer_placement():
    text = cli_plan(config.parse([
        "--model", str(REPO / "longctx" / "default_data" / "llama3.1-8b.json"), "--max-seq-len", "65536",
        "--gpus", "1", "--gpu-mem", "139GiB", "--host-mem", "125GiB", "--plan"]))
    rows = text.split("Optimizer states: each placement")[1].splitlines()[1:4]
    assert rows[0].startswith("  all on the GPU") and "NO | host" in rows[0]
    assert rows[1].startswith("  split, ratio 0.102941: 30/34") and rows[1].endswith("ok  <- this run")
    assert rows[2].startswith("  all on the CPU") and "host  156.7 NO" in rows[2]


def test_states_stay_on_the_cpu_where_the_ds_config_puts_the_parameters_there(tmp_path):
    """offload_param.device "cpu" in the ds_config with offload_optimizer.ratio "auto": the states stay on the CPU
    (states on the GPU beside CPU parameters measured 6.8 s a step at 16K, 2026-12-06), although they would fit."""
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds["zero_optimization"]["offload_param"]["device"] = "cpu"
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    s = settings(H200, "--max-seq-len", "16384", "--deepspeed", str(tmp_path / "ds.json"))
    assert s.offload_params and s.offload_optimizer and s.optimizer_ratio == 1.0
    assert "parameters on the CPU" in s.why["optimizer"]
    auto = auto_settings(H200, "--max-seq-len", "16384")  # the shipped config: both auto, both on the GPU
    assert not auto.offload_params and not auto.offload_optimizer


@pytest.mark.parametrize("facts, flags, world", [
    (resolve.Facts(), ("--model", str(REPO / "longctx" / "default_data" / "tiny_llama.json")), 1),
    (H200, ("--max-seq-len", "131072", "--offload-gradient-checkpointing", "--keep-attention-by", "replay"), 1),
    (dataclasses.replace(A6000, gpu_mem=16 * GiB), ("--max-seq-len", "65536", "--sequence-parallel", "2"), 2),
    (dataclasses.replace(A6000, capability=(7, 0), gpus=8), ("--precision", "fp16", "--deepspeed",
                                                             str(REPO / "ds_configs" / "zero2.json")), 8),
    (H200, ("--lora", "--s2-attn", "--no-packing", "--max-seq-len", "8192", "--lr-scheduler", "cosine_with_min_lr"),
     1),
])
def test_every_field_has_its_why(facts, flags, world):
    """Every field of Resolved says what decided it, before the data are read and after (the schedule)."""
    s = auto_settings(facts, *flags, world=world)
    fields = {f.name for f in dataclasses.fields(resolve.Resolved)} - {"why"}
    assert fields - set(s.why) == set()
    assert all(isinstance(v, str) and v for v in s.why.values())
    scheduled = resolve.resolve_schedule(s, config.parse(list(flags)), steps_per_epoch=7)
    assert fields - set(scheduled.why) == set() and scheduled.total_steps is not None
    assert {k for k, _ in s.reasons()} <= set(resolve.Resolved.REPORTED)  # the header shows the decisions only


def test_lr_is_decided_here_and_reaches_the_ds_config(tmp_path):
    """The embedded tiny model (random init) trains at 3e-3, a model you bring at 1e-5, --lr wins; the optimizer's
    lr in the filled ds_config is the resolved one."""
    own = tmp_path / "m.json"
    own.write_text(json.dumps(L8B_8L))
    for flags, want, why in (([], 3e-3, "embedded"), (["--model", str(own)], 1e-5, "bring"),
                             (["--model", str(own), "--lr", "2e-5"], 2e-5, "requested")):
        s = resolve.resolve(config.parse(flags), resolve.Facts(), L8B_8L, 1)
        assert s.lr == want and why in s.why["lr"]
        assert s.ds_config["optimizer"]["params"]["lr"] == want


@pytest.mark.parametrize("flags, per_epoch, want", [
    (["--max-steps", "40"], 7, (40, 2, None)),                       # 5% warmup of 40
    (["--epochs", "1.5"], 7, (11, 0, None)),                         # ceil(1.5 x 7); int(0.05 x 11)
    (["--epochs", "3", "--warmup-steps", "4", "--lr-scheduler", "cosine_with_min_lr"], 5, (15, 4, 0.1)),
    (["--epochs", "0.01", "--warmup-ratio", "0.5"], 10, (1, 0, None)),  # at least one step
])
def test_the_schedule_is_decided_here(flags, per_epoch, want):
    cfg = config.parse(flags)
    s = resolve.resolve_schedule(resolve.resolve(cfg, resolve.Facts(), L8B_8L, 1), cfg, per_epoch)
    assert (s.total_steps, s.warmup_steps, s.min_lr_rate) == want
    assert s.why["total_steps"].startswith("requested" if cfg.max_steps > 0 else f"--epochs {cfg.epochs:g}")


def test_the_tokenizer_fallback_is_decided_here(tmp_path):
    """--tokenizer, else the model directory's own, else the embedded one; the tokenizer train.py loads is it."""
    from helpers_train import TOKENIZER, tiny_config_file, tiny_model_dir
    from longctx import modeling

    model_dir = tiny_model_dir(tmp_path / "model")  # with a tokenizer beside the weights
    bare = tiny_config_file(tmp_path / "bare")
    for flags, want, why in ((["--model", model_dir], model_dir, "directory's own"),
                             (["--model", bare], str(TOKENIZER), f"--model {bare} has none"),
                             ([], str(TOKENIZER), "the embedded tokenizer"),
                             (["--model", bare, "--tokenizer", model_dir], model_dir, "requested")):
        cfg = config.parse(flags)
        path, note = resolve.resolve_tokenizer(cfg)
        assert path == want and why in note, (flags, note)
        assert modeling.load_tokenizer(cfg)[1] == want
        assert resolve.resolve(cfg, resolve.Facts(), L8B_8L, 1).tokenizer == want


def test_evaluation_attention_is_decided_here():
    """Evaluation decodes one sequence with a KV cache: flash-attn where it runs, else SDPA; flash_attention_2 by
    name where it cannot run is refused."""
    from longctx.evaluation import generate

    fa2 = dataclasses.replace(H200, flash_attn=True)
    assert resolve.resolve_eval_attention("auto", fa2, "bf16")[0] == "flash_attention_2"
    for facts, precision in ((fa2, "fp32"), (H200, "bf16"), (resolve.Facts(), "fp32")):
        assert resolve.resolve_eval_attention("auto", facts, precision)[0] == "sdpa"
    assert generate.choose_attention("eager", resolve.Facts(), "fp32") == "eager"
    with pytest.raises(LongctxError, match="needs the flash-attn package"):
        generate.choose_attention("flash_attention_2", H200, "bf16")
