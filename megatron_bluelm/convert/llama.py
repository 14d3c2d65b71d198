"""The BlueLM decoder as a Hugging Face ``LlamaForCausalLM``: the mapping table and the config.

The decoder is Llama-shaped (pre-norm RMSNorm, SwiGLU, GQA, RoPE with rotate-half, no biases, untied
embeddings), so no custom modeling code is needed on the HF side. megatron-core's RoPE (non-interleaved)
is HF's rotate-half convention: q/k rows need no permutation.
"""
from __future__ import annotations

from megatron_bluelm.convert import hf_tokenizer
from megatron_bluelm.convert.mapping import ParamMap

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."

TABLE: tuple[ParamMap, ...] = (
    ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0, vocab=True),
    ParamMap(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    ParamMap(L + "self_attention.linear_qkv.weight",
             (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
             tp_dim=0, fuse="qkv"),
    ParamMap(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), tp_dim=1),
    ParamMap(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    ParamMap(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), tp_dim=0, fuse="glu"),
    ParamMap(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), tp_dim=1),
    ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ParamMap("output_layer.weight", ("lm_head.weight",), tp_dim=0, vocab=True),
)

HF_ARCHITECTURE = "LlamaForCausalLM"


def export_config(cfg, vocab_size: int, dtype: str, special_ids: dict) -> dict:
    """config.json from a run config (the interface ``convert.api`` calls on every architecture)."""
    return hf_config(cfg.model, vocab_size, cfg.data.seq_length, dtype, special_ids)


def import_config(config: dict):
    """HF config.json -> a ``RunConfig`` with the model shape and ``data.seq_length`` set; raises
    ValueError / KeyError when the config is not convertible."""
    from megatron_bluelm.config.schema import RunConfig

    cfg = RunConfig()
    for key, value in model_fields_from_hf(config).items():
        setattr(cfg.model, key, value)
    cfg.data.seq_length = config.get("max_position_embeddings", 4096)
    return cfg


def hf_config(model_cfg, vocab_size: int, max_positions: int, dtype: str, special_ids: dict) -> dict:
    """config.json for ``transformers.LlamaConfig`` from our (preset-resolved) ``ModelConfig``."""
    m = model_cfg
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "rope_theta": float(m.rotary_base),  # transformers < 5 reads it here
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": m.init_std,
        # The exported tokenizer's ids (convert/hf_tokenizer.py): no BOS is ever added, pad = eos = <|end|>.
        "bos_token_id": None,
        "eos_token_id": [special_ids["</s>"], special_ids[hf_tokenizer.EOS]],
        "pad_token_id": special_ids[hf_tokenizer.PAD],
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers < 5 reads it here
        "use_cache": True,
    }


def model_fields_from_hf(config: dict) -> dict:
    """HF config.json -> our ``ModelConfig`` fields (the inverse of :func:`hf_config`)."""
    if HF_ARCHITECTURE not in config.get("architectures", []) and config.get("model_type") != "llama":
        raise ValueError(f"architectures {config.get('architectures')}")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if config.get(flag):
            raise ValueError(f"{flag}: true (the BlueLM decoder has no biases and untied embeddings)")
    _check_representable(config)
    rope = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    heads = config["num_attention_heads"]
    if config.get("head_dim", config["hidden_size"] // heads) != config["hidden_size"] // heads:
        raise ValueError("head_dim != hidden_size / num_attention_heads")
    return dict(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
                num_query_groups=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
                rotary_base=float(rope), norm_eps=config["rms_norm_eps"],
                init_std=config.get("initializer_range", 0.02))


def _check_representable(config: dict) -> None:
    """Refuse, by name, what the BlueLM decoder does not compute: converting would silently change the
    model (a dropped RoPE scaling or another activation gives other logits)."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act: {act!r} (the BlueLM decoder's MLP is SwiGLU: silu only)")
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{key}: rope_type {kind!r} (the BlueLM decoder implements plain RoPE only; "
                             f"dropping the {kind} scaling would change the model at every position)")
