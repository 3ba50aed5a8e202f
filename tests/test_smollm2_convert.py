"""longctx.models.from_gguf on the real SmolLM2-135M-Instruct GGUF (CPU, fp32).

* the written directory is a plain Hugging Face model: it reloads with from_pretrained (no GGUF, no quantizer)
  and gives the converter's NLL on the check text again, a sane one for English (about 1.9 nats);
* the same architecture with random weights is refused by the sanity check (ln 49152 = 10.8 nats);
* context extension: the NTK-aware rope_theta and an explicit one land in the config, the rotary frequencies follow
  the new base, and the model stays sane with it (the converter's "before training" number).
"""

from __future__ import annotations

import json
import math

import pytest

from longctx.errors import LongctxError
from longctx.models import from_gguf


def test_written_model_reloads_with_a_sane_nll(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, facts = smollm2_dir
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["max_position_embeddings"] == 8192 and cfg["vocab_size"] == 49152
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
    nll = from_gguf.text_nll(model, tok, from_gguf.check_text())
    assert nll == pytest.approx(facts["nll_check_text"], rel=1e-6)
    assert 1.0 < nll < 3.0


def test_random_weights_are_refused(smollm2_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out, _ = smollm2_dir
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    nll = from_gguf.text_nll(model, AutoTokenizer.from_pretrained(out), from_gguf.check_text())
    assert abs(nll - math.log(49152)) < 1.0
    with pytest.raises(LongctxError, match="outside the sane range"):
        from_gguf.check_sane(nll, "random")


def test_context_extension_sets_the_rope_base(smollm2_dir):
    from transformers import AutoConfig

    out, _ = smollm2_dir
    cfg = AutoConfig.from_pretrained(out)
    changed = from_gguf.extend_context(cfg, 32768, None)
    # NTK-aware: theta * 4 ** (64 / 62), rounded to thousands
    assert cfg.rope_parameters["rope_theta"] == 418000.0 and cfg.max_position_embeddings == 32768
    assert changed == {"max_position_embeddings": (8192, 32768), "rope_theta": (100000.0, 418000.0)}
    cfg = AutoConfig.from_pretrained(out)
    from_gguf.extend_context(cfg, 32768, 1e6)
    assert cfg.rope_parameters["rope_theta"] == 1e6
    # --rope-factor 8: a 32K config whose base is made for 64K (headroom), the NTK formula written out here
    cfg = AutoConfig.from_pretrained(out)
    changed = from_gguf.extend_context(cfg, 32768, None, "ntk", 8.0)
    theta = round(100000.0 * 8.0 ** (64 / 62), -3)
    assert theta == 856000.0 and cfg.rope_parameters["rope_theta"] == theta
    assert changed == {"max_position_embeddings": (8192, 32768), "rope_theta": (100000.0, theta)}
    assert cfg.max_position_embeddings == 32768
    with pytest.raises(LongctxError, match="--rope-factor 0.5: expected a factor >= 1"):
        from_gguf.extend_context(AutoConfig.from_pretrained(out), 32768, None, "ntk", 0.5)


def test_extended_model_uses_the_new_base(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, facts = smollm2_dir
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    from_gguf.extend_model(model, 32768, None)
    expected = 1.0 / 418000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected)
    nll = from_gguf.text_nll(model, AutoTokenizer.from_pretrained(out), from_gguf.check_text())
    assert facts["nll_check_text"] < nll < 1.2 * facts["nll_check_text"]  # costs a little before training


@pytest.mark.parametrize("rope,factor", [("yarn", None), ("llama3", None), ("yarn", 8.0)])
def test_scaled_rope_variants(smollm2_dir, tmp_path, rope, factor):
    """write_variant: the converted directory with YaRN or Llama-3 scaling to 32K in its config (weights linked, not
    copied); the rotary frequencies it loads with keep the highest frequency and divide the lowest by the factor
    (both methods interpolate only wavelengths beyond the native 8K), YaRN's cos/sin scale is 0.1 ln(4) + 1, and
    the model stays sane on the check text. With --rope-factor 8 the lowest frequency is divided by 8, not 4."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, facts = smollm2_dir
    dst = tmp_path / rope
    rp = from_gguf.write_variant(out, dst, 32768, rope, factor)
    f = factor or 4.0
    assert rp["rope_type"] == rope and rp["factor"] == f and rp["rope_theta"] == 100000.0
    assert rp["original_max_position_embeddings"] == 8192
    assert json.loads((dst / "config.json").read_text())["max_position_embeddings"] == 32768
    assert (dst / "model.safetensors").stat().st_ino == (out / "model.safetensors").stat().st_ino
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    base = 1.0 / 100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    inv = model.model.rotary_emb.inv_freq
    assert inv[0] == pytest.approx(float(base[0])) and inv[-1] == pytest.approx(float(base[-1]) / f, rel=1e-5)
    assert 2 * math.pi / base[-1] > 8192 and 2 * math.pi / base[0] < 2048  # the band the check spans
    scale = model.model.rotary_emb.attention_scaling
    assert scale == pytest.approx(0.1 * math.log(f) + 1 if rope == "yarn" else 1.0)
    nll = from_gguf.text_nll(model, AutoTokenizer.from_pretrained(dst), from_gguf.check_text())
    assert facts["nll_check_text"] <= nll < 1.2 * facts["nll_check_text"]


@pytest.mark.parametrize("args,message", [
    (["--max-position-embeddings", "32768", "--rope-factor", "0.5"], "--rope-factor 0.5: expected a factor >= 1"),
    # a RoPE choice without a longer context would be ignored: refused (it was silently a no-op)
    (["--rope-factor", "2"], "--rope-factor 2 scales the RoPE for a longer context, so it needs "
                             "--max-position-embeddings above the native 8192 (given: none)"),
    (["--max-position-embeddings", "8192", "--rope", "yarn"], "--rope yarn scales the RoPE for a longer context"),
])
def test_bad_rope_args_are_refused_before_the_gguf_is_read(tmp_path, capsys, args, message):
    """The CLI checks its RoPE arguments first: a GGUF path that does not exist is never reached (reading one takes
    ~20 s)."""
    with pytest.raises(SystemExit) as e:
        from_gguf.main(["--out", str(tmp_path / "m"), *args, "--gguf", str(tmp_path / "absent.gguf")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_rope_factor_needs_a_longer_context(smollm2_dir):
    """extend_context (and so write_variant) refuses a factor at the native length instead of ignoring it; the config
    is left as it was."""
    from transformers import AutoConfig

    out, _ = smollm2_dir
    cfg = AutoConfig.from_pretrained(out)
    with pytest.raises(LongctxError, match="--rope-factor 2 scales the RoPE for a longer context"):
        from_gguf.extend_context(cfg, 8192, None, "ntk", 2.0)
    with pytest.raises(LongctxError, match="--rope yarn scales"):
        from_gguf.extend_context(cfg, None, None, "yarn")
    assert cfg.rope_parameters["rope_theta"] == 100000.0 and cfg.max_position_embeddings == 8192
