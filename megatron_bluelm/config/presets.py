"""Model presets. Numbers the BlueLM-2.5-3B report (arXiv 2507.05934) does not publish are our choice.

The report gives: a ~2.5B decoder, 2.9B parameters in total with a ~400M SigLIP2 ViT. The layer widths
below are ours, chosen so the decoder lands at ~2.44B parameters with a 100k vocabulary (see
``megatron_bluelm.models.counting`` and ``python -m megatron_bluelm.models.counting bluelm-2.5-3b``).
"""
from __future__ import annotations

from megatron_bluelm.config.errors import ConfigError

PRESETS: dict[str, dict] = {
    "bluelm-2.5-3b": dict(
        num_layers=28,
        hidden_size=2560,
        ffn_hidden_size=6912,
        num_attention_heads=20,  # head dim 128
        num_query_groups=4,
        vocab_size=100_000,
        rotary_base=1_000_000.0,  # our choice: long-context friendly (4k -> 32k)
        norm_eps=1e-6,
        init_std=0.02,
    ),
    # Same shape family, small enough to run every test and the demo on a CPU in seconds.
    "tiny": dict(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=344,
        num_attention_heads=4,  # head dim 32
        num_query_groups=2,
        vocab_size=None,  # from the tokenizer
        rotary_base=10_000.0,
        norm_eps=1e-6,
        init_std=0.02,
    ),
}


# 8 layers of the full decoder: the benchmark proxy (same widths, same per-layer cost).
PRESETS["bluelm-2.5-3b-proxy8"] = dict(PRESETS["bluelm-2.5-3b"], num_layers=8)


def apply_preset(model_cfg) -> None:
    """Fill every None field of ``model_cfg`` from its preset (explicit values are kept)."""
    if model_cfg.preset not in PRESETS:
        raise ConfigError(
            f"model.preset: unknown preset {model_cfg.preset!r}; choose one of {sorted(PRESETS)}"
        )
    for key, value in PRESETS[model_cfg.preset].items():
        if getattr(model_cfg, key) is None:
            setattr(model_cfg, key, value)
