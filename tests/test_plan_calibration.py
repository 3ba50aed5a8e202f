"""The planner against every recorded GPU measurement: predicted peak GPU memory (and peak host RSS where
recorded) within +-10%, over at least 6 configurations.

Sources, read afresh on every run so new benchmark JSON is covered without editing this file:
  * bench/results/*.json                      bench/train_bench.py runs (bench/run.py's collected JSON)
  * bench/results/offload_checkpointing/*.json the checkpointing benchmark (1 GPU, no optimizer, no LM head)
  * tests/fixtures/plan_calibration/*.json     real figures recorded before the bench wrote JSON
Synthetic fixtures (tests/fixtures/bench_results) and CPU runs are not measurements of a GPU and are skipped.

What was fitted: FRAMEWORK_GPU_BYTES and CKPT_EXTRA_UNITS on the 32K rows of the checkpointing benchmark (its
128K rows are the check); HOST_INIT_BYTES_PER_PARAM on the host RSS of the 3B baseline 16K row (provisional: the
only clean host row so far). Everything else is a check. The formulas themselves are counted per op (longctx/plan.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longctx.flops import ModelShape
from longctx.plan import GiB, Setup, plan

ROOT = Path(__file__).resolve().parent.parent
TOL = 0.10
ABS_FLOOR = 1.0 * 1024 ** 3  # below this a miss is allocator noise (block rounding, caching, free timing)
MIN_CONFIGS = 6
KNOWN_SHAPES = {"Llama-3.1-8B": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                                     vocab=128256)}
OFFLOAD_MODES = {"plain": ("plain", "fork", False), "plain_reentrant": ("plain", "fork", True),
                 "fork": ("offload", "fork", False), "fork_reentrant": ("offload", "fork", True),
                 "upstream": ("offload", "upstream", False), "upstream_reentrant": ("offload", "upstream", True)}
TIED_SHAPES = {"llama3.2-3b"}  # bench/shapes.py: tie_word_embeddings=True (ModelShape does not carry it)
BENCH_CKPT = {"gc": ("plain", "fork"), "upstream_offload": ("offload", "upstream"), "fork_offload": ("offload", "fork")}


def _offload_bench_cases(path: Path) -> list[dict]:
    d = json.loads(path.read_text())
    cfg = d["config"]
    shape = ModelShape(layers=int(cfg["layers"]), **KNOWN_SHAPES[cfg["shape"]])
    out = []
    for r in d["rows"]:
        if r.get("status") != "ok" or r["mode"] not in OFFLOAD_MODES:
            continue
        ckpt, impl, reentrant = OFFLOAD_MODES[r["mode"]]
        setup = Setup(shape, int(r["seq_len"]), zero_stage=0, offload_params=False, offload_optimizer=False,
                      optimizer="none", precision="bf16", checkpointing=ckpt, offload_impl=impl, reentrant=reentrant,
                      loss="none", lm_head=False, attention="flash")
        out.append({"id": f"{path.name}:{r['mode']}@{r['seq_len']}", "setup": setup,
                    "gpu": r["peak_gib"] * GiB, "host": None, "fitted": r["seq_len"] == 32768})
    return out


def clean_host(d: dict, row: dict) -> bool:
    """Host RSS is comparable only while no offloaded checkpoint has been pinned in that process: torch's
    caching host allocator keeps every pinned block it ever handed out (the bench's pinned peak grows rung by
    rung: 37.4, 40.9, 47.9, 61.9 GiB in the 3B run), so later rows carry earlier rows' checkpoints."""
    for r in d["rows"]:
        if r is row:
            return (row.get("features") or {}).get("ckpt", "gc") == "gc"
        if (r.get("features") or {}).get("ckpt", "gc") != "gc" and r.get("status") in ("ok", "oom", "crashed"):
            return False
    return False


def _is_gpu_run(d: dict) -> bool:
    dev = str(d.get("device", ""))
    return not ("SYNTHETIC" in dev.upper() or dev.lower().startswith("cpu") or "rows" not in d
                or "model_shape" not in d)


def _setup(d: dict, r: dict) -> Setup:
    """The planner's Setup for one bench row (bench/train_bench.py's model, DeepSpeed config and technique)."""
    zero = (d.get("ds_config") or {}).get("zero_optimization", {}) or {}

    def off(sec):
        return ((zero.get(sec) or {}).get("device") or "none") != "none"

    f = r.get("features") or {}
    ckpt, impl = BENCH_CKPT[f.get("ckpt", "gc")]
    shape = ModelShape(**{**d["model_shape"], "layers": int(r.get("layers") or d["model_shape"]["layers"])})
    docs = int(r.get("docs") or 1)
    world = int(r.get("n_gpus") or d.get("n_gpus") or 1)
    sp = world if f.get("sp") else 1  # bench: Ulysses over all GPUs, one sample per node
    tokens = -(-int(r["seq_len"]) // sp)
    shards = -(-tokens // shape.hidden) if f.get("tiled_mlp") else 1
    attention = "dense_mask" if f.get("attn") == "sdpa" and docs > 1 else "flash"
    return Setup(shape, int(r["seq_len"]), world=world, sp=sp, tiled_mlp_shards=shards,
                 zero_stage=int(zero.get("stage", 3)), offload_params=off("offload_param"),
                 offload_optimizer=off("offload_optimizer"),
                 pin_memory=bool((zero.get("offload_param") or {}).get("pin_memory", True)),
                 precision="bf16", checkpointing=ckpt, offload_impl=impl, reentrant=False,
                 loss="liger" if f.get("liger") else "full", liger_kernels=bool(f.get("liger")),
                 attention=attention, head_gathered_throughout=False,
                 tied_embeddings=d.get("shape") in TIED_SHAPES,  # bench: loss through lm_head module
                 reduce_bucket_size=int(zero.get("reduce_bucket_size") or 0),
                 prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size") or 0),
                 overlap_comm=bool(zero.get("overlap_comm", True)))


def _bench_cases(path: Path) -> list[dict]:
    d = json.loads(path.read_text())
    if not _is_gpu_run(d):
        return []
    out = []
    for r in d["rows"]:
        if r.get("status") != "ok" or r.get("peak_gpu_alloc_gib") is None or r.get("excluded"):
            continue
        setup = _setup(d, r)
        shape = setup.shape
        host = r.get("peak_rss_gib") if clean_host(d, r) else None
        out.append({"id": f"{path.name}:{r.get('technique')}@{r['seq_len']}x{shape.layers}L",
                    "setup": setup, "gpu": r["peak_gpu_alloc_gib"] * GiB,
                    "host": host * GiB if host else None, "fitted": False,
                    "host_fitted": d.get("shape") == "llama3.2-3b" and int(r["seq_len"]) == 16384})
    return out


def recorded_cases() -> list[dict]:
    cases = []
    for p in sorted((ROOT / "bench" / "results" / "offload_checkpointing").glob("*.json")):
        cases += _offload_bench_cases(p)
    for p in sorted((ROOT / "bench" / "results").glob("*.json")):
        cases += _bench_cases(p)
    for p in sorted((ROOT / "tests" / "fixtures" / "plan_calibration").glob("*.json")):
        cases += _bench_cases(p)
    return cases


def residual_table(cases: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """Every row; those outside +-TOL; those outside +-TOL and more than ABS_FLOOR off."""
    lines, bad, far = [], [], []
    for c in cases:
        p = plan(c["setup"])
        for what, pred, meas in (("gpu", p.gpu_peak, c["gpu"]), ("host", p.host_per_rank, c["host"])):
            if meas is None:
                continue
            rel = pred / meas - 1
            fitted = c["fitted"] if what == "gpu" else c.get("host_fitted", False)
            line = (f"{c['id']:<70} {what:<4} predicted {pred / GiB:7.2f} measured {meas / GiB:7.2f} GiB "
                    f"{rel:+7.2%}{' (fitted)' if fitted else ''}")
            lines.append(line)
            if abs(rel) > TOL:
                bad.append(line)
                if abs(pred - meas) > ABS_FLOOR:
                    far.append(line)
    return lines, bad, far


def test_plan_matches_recorded_measurements():
    """The issue's criterion: at least 6 recorded configurations, across models, lengths and techniques, whose
    predicted peak GPU memory (and host RAM where recorded) is within +-10%; none of them fitted. Every row is
    printed; misses stay visible here and in docs/RESULTS.md. Known miss (2026-11-22): varlen + upstream offload +
    Liger on the 3B shape measures about 2 GiB above the plan at every length; not explained yet."""
    cases = recorded_cases()
    lines, bad, far = residual_table(cases)
    print("\n" + "\n".join(lines))
    good = [c for c in cases if not c["fitted"] and not any(c["id"] in b for b in bad)]
    assert len(good) >= MIN_CONFIGS, f"only {len(good)} held-out configurations within +-10%; need {MIN_CONFIGS}"
    assert len({c["setup"].shape.hidden for c in good}) >= 2, "the matches must cover more than one model"
    assert len({c["setup"].seq_len for c in good}) >= 2, "the matches must cover more than one length"
    assert len({(c["setup"].checkpointing, c["setup"].offload_impl, c["setup"].loss) for c in good}) >= 3
    # the planner is a tool, not a fit: most of what was ever measured must be within tolerance. Short lengths
    # read a few GiB, where +-10% is a few hundred MiB: a row counts as a miss when it is off by more than both.
    # (2026-11-22, 82 rows: 22 such misses, most of them 16K-32K rows 1-2 GiB above the plan; listed in RESULTS.md.)
    assert len(far) <= len(lines) // 3, ("more than a third of the recorded rows are off by more than 10% and "
                                         f"{ABS_FLOOR / GiB:.0f} GiB:\n" + "\n".join(far))


def recorded_outcomes() -> list[dict]:
    """Every capped bench row that ended in a full step (ok) or a CUDA OOM, with the cap it ran under."""
    out = []
    for p in sorted((ROOT / "bench" / "results").glob("*.json")) + \
            sorted((ROOT / "tests" / "fixtures" / "plan_calibration").glob("*.json")):
        d = json.loads(p.read_text())
        if not _is_gpu_run(d):
            continue
        for r in d["rows"]:
            cap = r.get("mem_cap_gib") or d.get("mem_cap_gib")
            if cap and r.get("status") in ("ok", "oom") and not r.get("excluded"):
                out.append({"id": f"{p.name}:{r.get('technique')}@{r['seq_len']}x{r.get('layers')}L",
                            "setup": _setup(d, r), "cap": float(cap) * GiB, "ok": r["status"] == "ok"})
    return out


def test_plan_decides_fit_like_the_gpu_did():
    """What a user asks of the planner: does this length fit this card? Every capped row that ran or ran out of
    memory must get the same verdict from the plan (predicted peak plus allocator slack against the cap; the
    cap is torch's per-process fraction, so the CUDA context is outside it), except inside +-10% of the cap,
    where the plan says "borderline" instead of a verdict."""
    from longctx.plan import ALLOCATOR_SLACK

    outcomes = recorded_outcomes()
    assert sum(o["ok"] for o in outcomes) >= 10 and sum(not o["ok"] for o in outcomes) >= 3
    wrong, judged = [], 0
    for o in outcomes:
        need = plan(o["setup"]).gpu_peak * (1 + ALLOCATOR_SLACK)
        if abs(need / o["cap"] - 1) <= TOL:
            continue
        judged += 1
        if (need <= o["cap"]) != o["ok"]:
            wrong.append(f"{o['id']}: needs {need / GiB:.1f} GiB of {o['cap'] / GiB:.0f}, "
                         f"but the GPU said {'ok' if o['ok'] else 'OOM'}")
    assert judged >= 10
    assert not wrong, "\n".join(wrong)


def test_calibration_covers_techniques_and_lengths():
    cases = recorded_cases()
    held_out = [c for c in cases if not c["fitted"]]
    assert len(held_out) >= MIN_CONFIGS
    assert len({c["setup"].seq_len for c in cases}) >= 3
    assert len({(c["setup"].checkpointing, c["setup"].offload_impl, c["setup"].loss) for c in cases}) >= 4


@pytest.mark.parametrize("bad", [0.89, 1.11])
def test_calibration_check_can_fail(bad):
    """A measurement 11% away from the prediction is reported (the comparison is not vacuous)."""
    case = next(c for c in recorded_cases() if c["fitted"])
    wrong = dict(case, gpu=plan(case["setup"]).gpu_peak / bad)
    assert residual_table([wrong])[1]
