"""GPU checks (skipped without CUDA): bf16 packing and gradient parity of the kernels auto picks (fa4 where
flash-attn-4 is installed on sm90+, else SDPA per document, which routes some documents to varlen), Liger under the
training loss, and train.py end to end on one GPU with the automatic choices.

Run on a GPU machine:  pytest -m gpu tests/test_train_gpu.py tests/test_attention_backend.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers_train import (fast_args, read_jsonl, reference_step, run_train, small_dataset, text_rows, tiny_lm,
                           tiny_config_file, tiny_model_dir, write_jsonl)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                 reason="needs a CUDA GPU of sm80+")]
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel missing")


def _lm(impl, dtype=torch.bfloat16):
    return tiny_lm(dtype=dtype, attn_implementation=impl, hidden_size=256, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64).cuda()


@pytest.mark.parametrize("impl", ["sdpa_per_doc", "varlen", "fa4"])
def test_packed_rows_equal_documents_one_by_one_with_gradients(impl):
    """Packing parity and gradient parity of the kernels `auto` can pick, in bf16 on the GPU (cuDNN first for
    sdpa_per_doc): a packed row of documents of odd lengths gives the loss and the weight gradients of the same
    documents run one by one (transformers' own SDPA, fp32 reference)."""
    from longctx import attention, fa4, resolve
    from longctx.modeling import CausalLMWithLoss

    if impl == "fa4" and not (torch.cuda.get_device_capability() >= (9, 0) and fa4.installed_version()):
        pytest.skip("fa4 needs flash-attn-4 on a GPU of sm90+")
    name = attention.register({"sdpa_per_doc": resolve.SDPA_PER_DOC, "varlen": resolve.VARLEN, "fa4": resolve.FA4}[impl])
    torch.manual_seed(1)
    lens = [7, 300, 45, 5000, 66, 129, 4500]  # short runs go to varlen, long documents to SDPA one by one
    docs = [torch.randint(3, 2000, (n,)) for n in lens]
    ids = torch.cat(docs)[None].cuda()
    pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    labels = ids.clone()
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    labels[0, starts.cuda()] = -100
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lens), "max_length_k": max(lens)}
    if impl != "sdpa_per_doc":
        kw = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    model = CausalLMWithLoss(_lm(name))
    packed = model(ids, pos, labels, **kw)
    packed.backward()
    got = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    ref_model = CausalLMWithLoss(_lm("sdpa", dtype=torch.float32))
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # the same weights
    ref = sum(ref_model(d[None].cuda(), torch.arange(len(d))[None].cuda(),
                        torch.cat([torch.tensor([-100]), d[1:]])[None].cuda()) for d in docs)
    ref.backward()
    assert float(packed.detach()) == pytest.approx(float(ref.detach()), rel=2e-2)
    for n, p in ref_model.named_parameters():
        err = (got[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert float(err) < 5e-2, f"{n}: relative gradient error {float(err):.3g}"


@needs_liger
def test_liger_is_applied_and_its_loss_matches():
    from longctx import modeling
    from longctx.modeling import CausalLMWithLoss, LinearCrossEntropySum

    check = modeling.apply_liger("llama")
    lm = _lm("sdpa", dtype=torch.float32)
    assert check(lm) == []
    h = torch.randn(500, lm.config.hidden_size, device="cuda", requires_grad=True)
    y = torch.randint(0, lm.config.vocab_size, (500,), device="cuda")
    w = lm.lm_head.weight
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    a = LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, y)
    b = LinearCrossEntropySum.apply(h, w, y, 128)
    assert float(a) == pytest.approx(float(b), rel=1e-4)
    assert isinstance(CausalLMWithLoss(lm, fused_ce=True), torch.nn.Module)


@pytest.mark.parametrize("ds,precision", [("zero3", "auto"), ("zero3_offload", "auto"), ("zero2", "fp16")])
def test_train_py_on_one_gpu(tmp_path, ds, precision):
    data = small_dataset(tmp_path / "data")
    model = tiny_config_file(tmp_path / "model")
    out = tmp_path / "run"
    args = fast_args(out, data, model, steps=8, extra=["--max-seq-len", "512", "--precision", precision])
    args[1] = f"ds_configs/{ds}.json"
    p = run_train(args, nproc=1, timeout=900)
    want = "bf16" if precision == "auto" else precision
    assert f"precision {want}" in p.stdout
    assert "attention longctx_varlen" in p.stdout or "attention flash_attention_2" in p.stdout
    if importlib.util.find_spec("liger_kernel") is not None:
        assert "liger on" in p.stdout  # --liger auto, and the modules were checked as replaced
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["peak_gpu_mem_gb"] > 0 and rows[0]["mfu"] is not None
    if precision == "fp16":
        assert rows[-1]["loss_scale"] is not None
    assert (out / "final_model" / "model.safetensors").exists()


def test_fp16_loss_scale_collapse_stops_the_run(tmp_path):
    import json

    from helpers_train import REPO

    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["fp16"].update(initial_scale_power=2, hysteresis=1, min_loss_scale=1)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    data = small_dataset(tmp_path / "data")
    model = tiny_config_file(tmp_path / "model")
    args = fast_args(tmp_path / "run", data, model, steps=20, extra=["--precision", "fp16"])
    args[1] = str(f)
    p = run_train(args, nproc=1, env={"LONGCTX_TEST_NAN_AT_STEP": "2+"}, check=False, timeout=900)
    assert p.returncode == 3, (p.stdout + p.stderr)[-3000:]
    assert "fp16 loss scale collapsed" in p.stderr


@needs_liger
def test_liger_fused_ce_under_zero3_equals_one_by_one_reference(tmp_path):
    """Liger's fused linear cross-entropy reads lm_head.weight without calling lm_head; under ZeRO-3 the
    weight is partitioned and only gathered because it is registered as an external parameter. fp32 on
    the GPU (so SDPA attention), step 1's loss and grad norm against the CPU one-by-one reference."""
    data_file = write_jsonl(tmp_path / "docs.jsonl", text_rows(40, seed=5, lo=5, hi=50))
    model_dir = tiny_model_dir(tmp_path / "init")
    out = tmp_path / "run"
    p = run_train(fast_args(out, [str(data_file)], model_dir, steps=1,
                            extra=["--grad-accum", "2", "--max-seq-len", "256", "--no-save-final-model",
                                   "--precision", "fp32", "--liger", "on"]), nproc=1, timeout=900)
    assert "liger on" in p.stdout and "ZeRO-3" in p.stdout
    row = read_jsonl(out / "metrics.jsonl")[0]
    ids = read_jsonl(out / "samples.jsonl")[0]["sample_ids"]
    ref_loss, ref_norm = reference_step(model_dir, data_file, ids)
    assert row["loss"] == pytest.approx(ref_loss, rel=1e-3)  # Triton tl.dot may use TF32
    assert row["grad_norm"] == pytest.approx(ref_norm, rel=1e-2)
