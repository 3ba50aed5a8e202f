"""longctx.flops: the strict model-FLOPs formula against a case multiplied out by hand."""

import math

import pytest

from longctx.flops import ModelShape, forward_flops, hardware_flops, mfu, peak_flops, train_flops

# hidden 8, 2 layers, 2 query heads and 1 kv head of dim 4, MLP 16, vocab 10
TINY = ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def test_hand_computed_single_document():
    S = 4
    # per token, per layer, forward (2 FLOPs per multiply-add):
    q = 2 * 8 * (2 * 4)           # 128
    o = 2 * (2 * 4) * 8           # 128
    k = v = 2 * 8 * (1 * 4)       # 64 each (GQA: one kv head)
    mlp = 3 * 2 * 8 * 16          # 768: gate, up, down
    linear_per_token = q + o + k + v + mlp
    assert linear_per_token == 1152
    # attention per layer: QK^T and PV, each 2 * heads * head_dim * S^2, halved for causal
    attn = (2 * (2 * 2 * 4 * S * S)) // 2
    assert attn == 256
    per_layer = linear_per_token * S + attn          # 4864
    lm_head = 2 * 8 * 10 * S                          # 640
    forward = 2 * per_layer + lm_head                 # 10368
    assert forward == 10368
    assert forward_flops(TINY, [S]) == forward
    assert train_flops(TINY, [S]) == 3 * 10368 == 31104
    # HFU: one more forward of both decoder layers (not the lm_head)
    assert hardware_flops(TINY, [S]) == 31104 + 2 * 4864 == 40832
    assert hardware_flops(TINY, [S], recompute_layers=0) == train_flops(TINY, [S])
    assert hardware_flops(TINY, [S], recompute_layers=1) == 31104 + 4864


def test_non_causal_counts_full_square():
    assert train_flops(TINY, [4], causal=False) - train_flops(TINY, [4]) == 3 * 2 * 256


def test_packed_documents_are_summed_per_document():
    # two documents of 2 tokens: same linear FLOPs as one of 4, attention 2 * (2*2*2*4*4/2) = 128 instead of 256
    linear = 2 * (1152 * 4) + 2 * 8 * 10 * 4
    attn = 2 * 2 * ((2 * (2 * 2 * 4 * 2 * 2)) // 2)
    assert forward_flops(TINY, [2, 2]) == linear + attn
    assert train_flops(TINY, [2, 2]) < train_flops(TINY, [4])
    assert train_flops(TINY, []) == 0


def test_strict_vs_hfu():
    shape = ModelShape(4096, 32, 32, 8, 128, 14336, 128256)
    for S in (1024, 131072):
        strict, hw = train_flops(shape, [S]), hardware_flops(shape, [S])
        lm_head = 3 * 2 * 4096 * 128256 * S
        # HFU = strict + one layer-stack forward = strict * 4/3 minus the lm_head's share
        assert math.isclose(hw, strict + (strict - lm_head) / 3, rel_tol=1e-12)
        assert hw > strict


def test_mfu_arithmetic():
    assert mfu(1e15, 2.0, 4, 1e14) == pytest.approx(1.25)
    assert mfu(989e12 * 3, 3.0, 1, 989e12) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1, 1.0)


def test_8b_anchor_from_device_notes():
    """NOTES: 8B, 4xH200, 64K at 43.5 s/step is about 150 TFLOP/s per GPU, 15% strict MFU."""
    shape = ModelShape(4096, 32, 32, 8, 128, 14336, 128256)
    per_gpu = train_flops(shape, [65536])
    assert per_gpu / 43.5 / 1e12 == pytest.approx(145.6, abs=1.0)
    assert mfu(4 * per_gpu, 43.5, 4, peak_flops("NVIDIA H200", "bf16")) == pytest.approx(0.147, abs=0.002)


def test_from_config_mapping_and_transformers():
    cfg = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "vocab_size": 152064}
    assert ModelShape.from_config(cfg) == ModelShape(3584, 28, 28, 4, 128, 18944, 152064)
    from bench.shapes import make_config
    assert ModelShape.from_config(make_config("llama3.1-8b")) == ModelShape(4096, 32, 32, 8, 128, 14336, 128256)
    assert ModelShape.from_config(make_config("llama3.2-3b", layers=8)) == ModelShape(3072, 8, 24, 8, 128, 8192, 128256)


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H200", "torch.bfloat16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("NVIDIA RTX A6000", "bf16", 154.8), ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-SXM2-16GB", "bf16", None), ("Some Future GPU", "bf16", None), ("NVIDIA H200", "fp32", None),
])
def test_peak_flops(name, dtype, tflops):
    got = peak_flops(name, dtype)
    assert (got is None) if tflops is None else got == pytest.approx(tflops * 1e12)


def test_no_torch_import_at_module_level():
    import subprocess
    import sys
    code = "import sys, longctx.flops; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
