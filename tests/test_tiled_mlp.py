"""longctx.tiled_mlp: the tiled MLP gives the untiled gradients, and the model train.py builds runs its MLPs in the
shard count resolve decided (and the memory plan assumed), not one recomputed from the row."""

from __future__ import annotations

import json

import torch

from helpers_train import (assert_same_loss_and_grads, loss_and_grads, tiny_config, tiny_lm_fp64,
                           tiny_model_config, token_batch)
from longctx import config, modeling, resolve, sequence_parallel, tiled_mlp
from longctx.modeling import CausalLMWithLoss


def test_tiled_mlp_gives_untiled_gradients():
    lm = tiny_lm_fp64()
    model = CausalLMWithLoss(lm)
    ids, pos, labels = token_batch()
    plain = loss_and_grads(model, ids, pos, labels)
    assert tiled_mlp.enable(lm, shards=4) == 2
    calls = []
    from deepspeed.runtime.sequence_parallel import ulysses_sp

    orig = ulysses_sp.TiledMLP.apply
    ulysses_sp.TiledMLP.apply = lambda *a: calls.append(a[3]) or orig(*a)
    try:
        tiled = loss_and_grads(model, ids, pos, labels)
    finally:
        ulysses_sp.TiledMLP.apply = orig
    assert calls == [4, 4]  # every decoder MLP went through DeepSpeed's TiledMLP, 4 chunks
    assert_same_loss_and_grads(tiled, plain)
    tiled_mlp.disable(lm)
    assert "forward" not in vars(lm.model.layers[0].mlp)


def test_shard_count_is_lowered_only_where_torch_chunk_would_cut_fewer_pieces():
    for length in range(1, 40):
        for shards in range(1, 12):
            assert tiled_mlp.pieces(length, shards) == len(torch.chunk(torch.empty(length), shards))
    x = torch.empty(1, 100, 8)
    assert tiled_mlp.shards_for(x, 8) == 8  # 100 tokens: 8 pieces of 13
    assert tiled_mlp.shards_for(torch.empty(1, 9, 8), 4) == 3  # torch.chunk cuts 9 into 3 pieces of 3, not 4
    assert tiled_mlp.shards_for(torch.empty(1, 3, 8), 8) == 3
    assert tiled_mlp.shards_for(torch.empty(2, 3, 8), 4) == 3  # backward cuts the 6 flattened tokens: 3 pieces of 2
    lm = tiny_lm_fp64()
    ids, pos, labels = token_batch(S=9)
    plain = loss_and_grads(CausalLMWithLoss(lm), ids, pos, labels)
    tiled_mlp.enable(lm, shards=4)
    assert_same_loss_and_grads(loss_and_grads(CausalLMWithLoss(lm), ids, pos, labels), plain)


def test_the_built_model_runs_the_resolved_shard_count(tmp_path):
    """build_model with what resolve decided for a 512-token run of a hidden-64 model: ceil(512 / 64) = 8 shards,
    where the row's own ceil(100 / 64) would be 2. Counted as down_proj calls in a real forward."""
    (tmp_path / "m.json").write_text(json.dumps(tiny_config()))
    cfg = config.parse(["--model", str(tmp_path / "m.json"), "--max-seq-len", "512", "--tiled-mlp",
                        "--deepspeed", "ds_configs/zero2.json"])
    model_config = tiny_model_config()
    settings = resolve.resolve(cfg, resolve.Facts(), tiny_config(), world=1)
    assert settings.tiled_mlp and settings.tiled_mlp_shards == 8 and settings.zero_stage != 3
    model, _ = modeling.build_model(cfg, model_config, "random", settings, sequence_parallel.Layout.make(1, 0, 1))
    layers = model.lm.model.layers
    calls = []
    for layer in layers:
        layer.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    model.lm(input_ids=torch.randint(3, 100, (1, 100)))  # forward only: the backward's recompute would add calls
    assert len(calls) == 8 * len(layers)
