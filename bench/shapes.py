"""Model shapes for the benchmark, as transformers configs (random init; no weights are downloaded)."""

from __future__ import annotations

SHAPES = ("llama3.1-8b", "llama3.2-3b", "qwen2.5-7b")
# Beyond the checkpoints' 128K context: rotary tables are computed on the fly, this only has to be large.
BENCH_MAX_POSITIONS = 4 * 1024 * 1024

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def _rope_kwargs(cfg_cls, theta: float, scaling: dict | None) -> dict:
    """transformers 5.x takes `rope_parameters`; 4.x took rope_theta + rope_scaling. Support both."""
    import inspect
    params = inspect.signature(cfg_cls.__init__).parameters
    if "rope_parameters" in params:
        rp = dict(scaling) if scaling else {"rope_type": "default"}
        rp["rope_theta"] = theta
        return {"rope_parameters": rp}
    kw = {"rope_theta": theta}
    if scaling:
        kw["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
    return kw


def make_config(name: str, layers: int | None = None, max_positions: int = BENCH_MAX_POSITIONS):
    """transformers config for `name` (see SHAPES); `layers` overrides depth (per-GPU working set does
    not depend on depth, so reduced depth proves memory; host RAM for offloaded checkpoints does)."""
    from transformers import LlamaConfig, Qwen2Config

    if name == "llama3.1-8b":
        cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128, intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5,
                          max_position_embeddings=max_positions, tie_word_embeddings=False,
                          bos_token_id=128000, eos_token_id=128001,
                          **_rope_kwargs(LlamaConfig, 500000.0, _LLAMA3_ROPE))
    elif name == "llama3.2-3b":
        rope = dict(_LLAMA3_ROPE, factor=32.0)
        cfg = LlamaConfig(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                          head_dim=128, intermediate_size=8192, vocab_size=128256, rms_norm_eps=1e-5,
                          max_position_embeddings=max_positions, tie_word_embeddings=True,
                          bos_token_id=128000, eos_token_id=128001,
                          **_rope_kwargs(LlamaConfig, 500000.0, rope))
    elif name == "qwen2.5-7b":
        cfg = Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                          intermediate_size=18944, vocab_size=152064, rms_norm_eps=1e-6,
                          max_position_embeddings=max_positions, tie_word_embeddings=False,
                          use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
                          **_rope_kwargs(Qwen2Config, 1000000.0, None))
    elif name == "tiny-llama":  # CPU smoke tests only
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, intermediate_size=128, vocab_size=512, max_position_embeddings=max_positions,
                          tie_word_embeddings=False, **_rope_kwargs(LlamaConfig, 10000.0, None))
    else:
        raise ValueError(f"unknown shape {name!r}; choose from {SHAPES + ('tiny-llama',)}")
    if layers is not None:
        cfg.num_hidden_layers = int(layers)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[: int(layers)] + \
                [cfg.layer_types[-1]] * max(0, int(layers) - len(cfg.layer_types))
    return cfg
