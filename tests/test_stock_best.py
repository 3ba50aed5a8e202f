"""The stock stacks (bench/techniques.py's stock_*): what a skilled user of stock transformers + DeepSpeed + Liger
runs, as train.py flags. Their flags parse and resolve, on an H100 as the benchmark profile runs them, to stock
settings only: transformers' own attention names, no fork offloader (plain checkpointing, or upstream's save_on_cpu),
attention kept only by torch's selective checkpointing (non-reentrant), no tiled MLP. transformers'
flash_attention_4 cannot be kept (its kernels run outside torch's dispatcher): refused when asked, off by auto.
On CPU, stock SDPA kept by selective checkpointing, checkpoints on the device and through upstream's save_on_cpu,
gives the loss and gradients of no checkpointing, with attention run once per layer."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from bench import techniques as T
from helpers_train import REPO, attention_calls, tiny_config, tiny_model_weights
from longctx import config, modeling, resolve
from longctx.errors import LongctxError

L8B = json.loads((REPO / "longctx" / "default_data" / "llama3.1-8b.json").read_text())
L8B_8L = L8B | {"num_hidden_layers": 8}
H100 = resolve.Facts("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, gpus=1, host_mem=125 << 30,
                     varlen_attn=True, liger=True, fork=True, fa4="4.0.0b36")
K = 1024
STOCK_NAMES = ("flash_attention_4", "sdpa")  # transformers' own registrations


@pytest.fixture(scope="module")
def ds_file(tmp_path_factory):
    """The benchmark's ds_config for the stock stacks (bench/train_bench.py): the default's, placement auto."""
    assert T.get("stock_best").offload_param == "auto" and T.get("stock_best").optimizer_ratio is None
    return str(REPO / "ds_configs" / "zero3_offload.json")


def picked(name: str, n: int, facts, ds_file: str, model=L8B_8L):
    """(flags, resolved settings) of technique `name` at n tokens, picked as the benchmark worker picks them."""
    base = ["--deepspeed", ds_file, "--max-seq-len", str(n)]
    flags = T.flags_at(T.get(name), n, lambda f: T.plan_fits(base + list(f), facts, model, 1))
    return flags, resolve.resolve(config.parse(base + list(flags)), facts, model, 1)


def assert_stock(s) -> None:
    assert s.attention in STOCK_NAMES and s.attn_impl == s.attention  # no longctx_* registration
    assert s.checkpointing == "plain" or (s.checkpointing, s.offload_impl) == ("offload", "upstream")
    assert not s.tiled_mlp and s.sequence_parallel == 1 and s.s2_group is None
    assert not s.keep_attention or (s.keep_attention_by, s.reentrant) == ("selective", False)
    assert not s.overlap_step  # the overlapped CPU step is this project's


@pytest.mark.parametrize("n", [16 * K, 64 * K, 128 * K, 256 * K])
def test_stock_best_resolves_to_stock_settings_on_an_h100(n, ds_file):
    flags, s = picked("stock_best", n, H100, ds_file)
    assert_stock(s)
    if n < resolve.KEEP_ATTENTION_MIN_TOKENS:  # the faster kernel, recomputed
        assert (s.attention, s.keep_attention, s.reentrant, s.liger) == ("flash_attention_4", False, True, True)
        assert s.attn_varlen_kwargs  # transformers' padding-free path takes the collator's cu_seq_lens
    else:  # SDPA, its outputs kept by torch's selective checkpointing
        assert (s.attention, s.keep_attention, s.keep_attention_by, s.reentrant) == ("sdpa", True, "selective", False)
    # on the GPU where the plan fits the step there, else upstream's offload
    gc = tuple(f for f in flags if f not in T.UPSTREAM_OFFLOAD)
    fits = T.plan_fits(["--deepspeed", ds_file, "--max-seq-len", str(n), *gc], H100, L8B_8L, 1)
    assert s.checkpointing == ("plain" if fits else "offload")


def test_checkpoints_go_to_host_memory_where_the_plan_does_not_fit_them(ds_file):
    """The full-depth 8B at 256K: 32 layers of checkpoints and kept attention outputs do not fit 80 GB."""
    _, s = picked("stock_best", 256 * K, H100, ds_file, model=L8B)
    assert (s.checkpointing, s.offload_impl, s.num_offloaded_layers) == ("offload", "upstream", 32)
    assert_stock(s)
    _, s = picked("stock_best", 16 * K, H100, ds_file, model=L8B)
    assert s.checkpointing == "plain"


def test_without_flash_attn_4_stock_best_recomputes_sdpa_below_64k(ds_file):
    _, s = picked("stock_best", 16 * K, dataclasses.replace(H100, fa4=None), ds_file)
    assert (s.attention, s.keep_attention, s.reentrant) == ("sdpa", False, True)
    assert_stock(s)


@pytest.mark.parametrize("name, attention, kept", [("stock_fa4", "flash_attention_4", False),
                                                   ("stock_sdpa_keep", "sdpa", True)])
def test_the_candidates_keep_their_attention_at_every_length(name, attention, kept, ds_file):
    for n in (16 * K, 128 * K):
        _, s = picked(name, n, H100, ds_file)
        assert (s.attention, s.keep_attention) == (attention, kept)
        assert_stock(s)


def test_on_cpu_stock_best_runs_sdpa_with_checkpoints_in_place(ds_file):
    tiny = tiny_config()
    flags, s = picked("stock_best", 512, resolve.Facts(), ds_file, model=tiny)
    assert s.attention == "sdpa" and s.checkpointing == "plain" and not s.liger
    assert "--offload-gradient-checkpointing" not in flags


def test_a_technique_whose_candidates_are_all_refused_says_so():
    with pytest.raises(ValueError, match="refuses every candidate"):
        T.flags_at(T.get("stock_fa4"), 16 * K, lambda f: None)
    assert T.flags_at(T.get("longctx"), 16 * K, lambda f: pytest.fail("fixed flags need no plan")) == \
        T.get("longctx").flags


def test_upstream_best_is_also_upstream_sdpa():
    assert T.get("upstream_sdpa") is T.get("upstream_best")
    assert "upstream_sdpa" in T.get("upstream_best").desc


def test_transformers_flash_attention_4_cannot_be_kept():
    """Its kernels run outside torch's dispatcher: keeping them is refused when asked, and auto leaves it off
    (without this, the header and the plan would count kept outputs that selective checkpointing never saw)."""
    flags = ["--max-seq-len", str(128 * K), "--attn-implementation", "flash_attention_4"]
    with pytest.raises(LongctxError, match="outside torch's dispatcher"):
        resolve.resolve(config.parse(flags + ["--keep-attention"]), H100, L8B_8L, 1)
    s = resolve.resolve(config.parse(flags), H100, L8B_8L, 1)
    assert not s.keep_attention and s.reentrant and "dispatcher" in s.why["keep_attention"]
    assert s.attn_impl == "flash_attention_4" and "transformers'" in s.why["attention"]


@pytest.mark.parametrize("facts, flags, match", [
    (dataclasses.replace(H100, fa4=None), (), "flash-attn-4 is not installed"),
    (dataclasses.replace(H100, capability=(8, 0), name="A100"), (), "sm90"),
    (H100, ("--precision", "fp32"), "bf16/fp16"),
])
def test_transformers_flash_attention_4_needs_what_it_runs_on(facts, flags, match):
    with pytest.raises(LongctxError, match=match):
        resolve.resolve(config.parse(["--attn-implementation", "flash_attention_4", *flags]), facts, L8B_8L, 1)


# ---- the stock checkpointing on CPU, through the product's enable_checkpointing --------------------------------
LAYERS = 2
ROWS, SEQ = 2, 48  # one document per row, as the stock SDPA stacks train (--no-packing)


@pytest.fixture(scope="module")
def weights():
    return tiny_model_weights(LAYERS)


def run(weights, ckpt):
    from transformers import AutoModelForCausalLM

    cfg, state = weights
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    lm.load_state_dict(state)
    lm.train()
    if ckpt is not None:
        modeling.enable_checkpointing(lm, ckpt)
        assert lm.checkpoint_offloader is None  # the fork's offloader is not in the stock path
    ids = torch.randint(0, cfg.vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    with attention_calls() as counted:
        logits = lm(input_ids=ids, position_ids=torch.arange(SEQ).expand(ROWS, SEQ)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in lm.named_parameters()}, counted.calls


@pytest.mark.parametrize("checkpointing", ["plain", "offload"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
def test_stock_checkpointing_gives_the_gradients_of_none(weights, checkpointing, keep):
    ref_loss, ref_grads, ref_calls = run(weights, None)
    assert ref_calls == LAYERS  # the counter sees the kernel SDPA dispatches to here
    ckpt = SimpleNamespace(checkpointing=checkpointing, offload_impl="upstream", keep_attention=keep,
                           keep_attention_by="selective", reentrant=not keep, num_offloaded_layers=0)
    loss, grads, calls = run(weights, ckpt)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert calls == (ref_calls if keep else 2 * ref_calls)  # kept: the recompute took the saved outputs
