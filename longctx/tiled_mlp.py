"""Tiled MLP: every decoder MLP runs over `shards` chunks of the sequence through DeepSpeed's `TiledMLP`, which
recomputes each chunk in backward, so the [tokens x intermediate] activations exist one chunk at a time.

The shard count is decided once, by longctx.resolve (`Resolved.tiled_mlp_shards`, the count the memory plan
assumed: plan.tiled_mlp_shards), and build_model hands it here. At each call the count is lowered only where
`torch.chunk` would cut the row into fewer pieces than asked (a row shorter than shards squared): DeepSpeed's
backward marks a ZeRO gradient ready only on the piece numbered shards - 1, so a missing piece would leave the
MLP's gradients unreduced. Under ZeRO-3 every piece gathers the MLP weights collectively, so with several ranks
the lowered count is agreed over all of them (rows of different lengths can need different counts).
"""

from __future__ import annotations

import types

import torch

from .dist import all_reduce


def pieces(size: int, shards: int) -> int:
    """How many pieces torch.chunk cuts `size` items into when asked for `shards`."""
    step = -(-size // shards)
    return -(-size // step) if size else 0


def usable_shards(length: int, tokens: int, shards: int) -> list[bool]:
    """For n = 1..shards: whether torch.chunk gives exactly n pieces both of the row (TiledMLP's forward cuts the
    sequence dimension) and of all its tokens flattened (its backward cuts batch x sequence)."""
    return [pieces(length, n) == n and pieces(tokens, n) == n for n in range(1, shards + 1)]


def shards_for(x: torch.Tensor, shards: int) -> int:
    """The largest count <= `shards` that every rank can run with exactly that many pieces."""
    ok = all_reduce(torch.tensor(usable_shards(x.shape[-2], x.numel() // x.shape[-1], shards), dtype=torch.int32),
                    "min", device=x.device)
    return int(ok.nonzero().max()) + 1  # n = 1 always cuts into exactly one piece


def _inner_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self._longctx_inner_forward(x)


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    return TiledMLP.apply(_inner_forward, self, x, shards_for(x, self._longctx_shards), list(self.parameters()))


def decoder_mlps(lm) -> list[torch.nn.Module]:
    base = getattr(lm, getattr(lm, "base_model_prefix", "model"), lm)
    return [layer.mlp for layer in base.layers]


def _is_tiled(mlp) -> bool:
    return getattr(vars(mlp).get("forward"), "__func__", None) is _tiled_forward


def enable(lm, shards: int) -> int:
    """Run every decoder MLP through TiledMLP in `shards` chunks; returns how many MLPs. The forward in place (the
    class's, or an instance patch such as Liger's SwiGLU applied to a live model) is what runs per chunk."""
    if shards < 1:
        raise ValueError(f"tiled MLP needs shards >= 1, got {shards}")
    mlps = decoder_mlps(lm)
    for mlp in mlps:
        mlp._longctx_shards = shards
        if not _is_tiled(mlp):
            mlp._longctx_inner_forward = mlp.forward
            mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)


def disable(lm) -> None:
    for mlp in decoder_mlps(lm):
        if _is_tiled(mlp):
            inner = mlp._longctx_inner_forward
            del mlp.forward
            if getattr(inner, "__func__", None) is not type(mlp).forward:
                mlp.forward = inner  # an instance patch that was there before
            del mlp._longctx_inner_forward


__all__ = ["decoder_mlps", "disable", "enable", "shards_for"]
