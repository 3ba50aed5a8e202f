"""Shifted sparse attention (S²-Attn, LongLoRA) as a transformers attention function.

Semantics, for one row of S tokens, group size G (even), H query heads:
  1. pad q, k, v with zeros at the end to S' = ceil(S / G) * G tokens;
  2. for the second half of the heads (h >= H/2), roll the sequence by -G/2: position i of the rolled
     tensor holds token (i + G/2) mod S'. The first half is left as it is;
  3. split the S' positions into S'/G consecutive groups of G and run causal attention inside each
     group (every head, every group independently);
  4. roll the second half of the heads' output back by +G/2 and drop the padding.
A row that fits in one group (S <= G) is not shifted: there is no group boundary to bridge, and the
roll would only make its first G/2 tokens attend to its last ones. It gets full causal attention.
This is LongLoRA's reference `shift(qkv)` (Chen et al. 2023, Algorithm 1): the unshifted heads see
groups [0, G), [G, 2G), ...; the shifted heads see [G/2, 3G/2), ..., so information crosses group
boundaries. As in the reference, the roll wraps around: in the shifted heads the first G/2 tokens
share the last group with the last G/2 tokens (and, when S is not a multiple of G, with the
padding), which come later in the sequence: a look-ahead in training for G/2 of S' tokens, in half
of the heads, whose result also depends on how far the row is padded (micro-batches pad to their
longest row). LongLoRA's flash-attn training path avoids both by not wrapping; this follows Alg. 1.
With GQA, query head h uses key/value head h // (H / H_kv), so shifting the second half of both
the query heads and the key/value heads keeps them paired (H_kv odd: k/v heads are repeated first).

Training only: in eval mode (module.training False; evaluation, generation) the call goes unchanged
to the base implementation, i.e. full causal attention. The grouped attention itself is also the
base implementation ("sdpa", "longctx_varlen" or "flash_attention_2"), called on the groups laid
out as a batch of B * S'/G rows of G tokens with no mask, so it is causal per group.
Packed rows are refused (config_problems): fixed token groups would cross document boundaries.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NAME = "longctx_s2attn"
# Bases that are causal without a mask (train.py picks sdpa, longctx_varlen or flash_attention_2; bench/ its own
# varlen). Eager and flex attention take causality from the mask, which grouped rows do not get.
NEEDS_MASK = ("eager", "flex_attention", "paged|eager")
# what the varlen path leaves out for grouped rows: its segment metadata describes the ungrouped rows
_ROW_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")


def config_problems(cfg) -> list[str]:
    """Checks of --s2-attn that need only the config (called by config.validate). The group size is decided by
    longctx.resolve (resolve_s2_group): a size given here must be one it can take."""
    if cfg.s2_attn is None:
        return []
    problems = []
    g = cfg.s2_attn  # 0: --s2-attn alone, max_seq_len / 4 (always even and within the row)
    if g and (g < 2 or g % 2):
        problems.append(f"--s2-attn {cfg.s2_attn}: the group size must be an even number >= 2 (half a group is "
                        "the shift)")
    elif g > cfg.max_seq_len:
        problems.append(f"--s2-attn {g} is larger than --max-seq-len {cfg.max_seq_len}: every row would be one "
                        "group (full attention, padded); use a group size <= --max-seq-len")
    if cfg.packing:
        problems.append("--s2-attn cannot be used with packing (on by default): S²-Attn's fixed token groups "
                        "would cross document boundaries in a packed row. Add --no-packing.")
    if getattr(cfg, "sequence_parallel", 1) > 1:
        problems.append("--s2-attn with --sequence-parallel is not supported: Ulysses gives each rank a subset of "
                        "the heads, so 'half of the heads' would not be the model's half")
    if cfg.attn_implementation == "eager":
        problems.append("--s2-attn runs on sdpa, varlen or flash_attention_2, not eager (eager relies on a "
                        "mask that grouped rows do not get)")
    return problems


# --------------------------------------------------------------------------------------------
# The layout change: (B, H, S, D) <-> groups
# --------------------------------------------------------------------------------------------

def _shift_half(x: torch.Tensor, shift: int, seq_dim: int, head_dim: int) -> torch.Tensor:
    h = x.shape[head_dim] // 2
    first, second = x.split([h, x.shape[head_dim] - h], dim=head_dim)
    return torch.cat([first, second.roll(shift, dims=seq_dim)], dim=head_dim)


def to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, H, S', D) with S' % G == 0 -> (B * S'/G, H, G, D), second half of the heads rolled by -G/2."""
    B, H, S, D = x.shape
    x = _shift_half(x, -(group_size // 2), seq_dim=2, head_dim=1)
    return x.view(B, H, S // group_size, group_size, D).transpose(1, 2).reshape(-1, H, group_size, D)


def from_groups(out: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * n, G, H, D), the attention functions' output layout -> (B, n*G, H, D), rolled back."""
    Bn, G, H, D = out.shape
    out = out.reshape(batch, (Bn // batch) * G, H, D)
    return _shift_half(out, G // 2, seq_dim=1, head_dim=2)


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------

def s2_attention(base: Callable, group_size: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                 scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """(B, H, S, D) query, (B, H_kv, S, D) key/value in; (B, S, H, D) out, like every attention function."""
    if not module.training:
        return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None:
        raise RuntimeError(f"{NAME} takes no attention mask in training (rows are unpacked, padding is at the end)")
    B, Hq, S, _ = query.shape
    if Hq % 2:
        raise RuntimeError(f"S²-Attn shifts half of the heads; this model has {Hq} query heads (odd)")
    if key.shape[1] % 2:  # keep q/k/v head halves paired (MQA, odd KV head counts)
        rep = Hq // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    rest = {k_: v_ for k_, v_ in kwargs.items() if k_ not in _ROW_KWARGS}
    if S <= group_size:  # one group: full causal attention, unshifted (see the module docstring)
        return base(module, query, key, value, None, dropout=dropout, scaling=scaling, **rest)
    pad = -S % group_size
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    q, k, v = (to_groups(t, group_size) for t in (query, key, value))
    out, _ = base(module, q, k, v, None, dropout=dropout, scaling=scaling, **rest)
    out = from_groups(out, B)
    return (out[:, :S] if pad else out), None


def register(base_impl: str, group_size: int) -> str:
    """Register NAME with transformers' AttentionInterface, on top of the base implementation."""
    from transformers import AttentionInterface

    if base_impl in NEEDS_MASK or base_impl not in AttentionInterface._global_mapping:
        raise ValueError(f"S²-Attn runs on an attention implementation that is causal without a mask (sdpa, varlen, "
                         f"flash_attention_2), not {base_impl!r}")
    base = AttentionInterface._global_mapping[base_impl]

    def s2attn_forward(module, query, key, value, attention_mask, **kwargs):
        return s2_attention(base, group_size, module, query, key, value, attention_mask, **kwargs)

    s2attn_forward.base_impl, s2attn_forward.group_size = base_impl, group_size
    AttentionInterface.register(NAME, s2attn_forward)
    return NAME
