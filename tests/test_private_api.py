"""Guards for the private megatron-core internals we override or reach into (parallel/cpu.py's names have
their own, tests/test_cpu_compat.py). Each entry says where we depend on it; an upgrade that renames or
reshapes one fails here, naming it, instead of silently taking another path at run time."""
import dataclasses
import importlib
import inspect

import pytest

# (module, qualified name, parameters our code passes or reads (in order, after self), where we use it)
SIGNATURES = [
    ("megatron.core.models.gpt.gpt_model", "GPTModel._preprocess",
     ["input_ids", "position_ids", "decoder_input", "inference_context", "packed_seq_params", "padding_mask"],
     "models/decoder.py: BlueLMModel._preprocess (per-token RoPE; calls super positionally)"),
    ("megatron.core.models.gpt.gpt_model", "GPTModel._postprocess",
     ["hidden_states", "input_ids", "position_ids", "labels"],
     "models/decoder.py: BlueLMModel._postprocess (fused loss; reads kwargs['loss_mask'])"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._set_main_param_and_optimizer_states",
     ["model_param", "tensors"],
     "training/checkpointing.py: the torch-Adam 'step' fix wraps it per instance during load_state_dict"),
    ("megatron.core.tensor_parallel.layers", "LinearWithGradAccumulationAndAsyncCommunication.forward",
     ["input", "weight", "bias", "gradient_accumulation_fusion", "allreduce_dgrad", "sequence_parallel",
      "grad_output_buffer", "wgrad_deferral_limit", "tp_group"],
     "models/vision.py: _BiasEpilogueLinear.forward takes the same arguments and sets the ctx fields its "
     "inherited backward reads"),
    ("megatron.core.tensor_parallel.layers", "ColumnParallelLinear._forward_impl", ["input", "weight"],
     "models/vision.py: EpilogueColumnParallelLinear._forward_impl (megatron-core calls it with keywords)"),
    ("megatron.core.tensor_parallel.layers", "ColumnParallelLinear.forward",
     ["input_", "weight", "runtime_gather_output"],
     "models/vision.py: EpilogueColumnParallelLinear.forward (fc1's skipped bias added by the GEMM)"),
    ("megatron.core.tensor_parallel.layers", "RowParallelLinear.forward", ["input_"],
     "models/vision.py: EpilogueRowParallelLinear.forward (the bias in the GEMM without TP)"),
    ("megatron.core.transformer.attention", "SelfAttention.get_query_key_value_tensors",
     ["hidden_states", "key_value_states", "output_gate", "split_qkv"],
     "models/attention.py: BlueLMSelfAttention takes the unsplit QKV output (split_qkv=False) for split_rope_fn"),
]
# (module, attribute, where we use it)
ATTRIBUTES = [
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "_results_queue",
     "training/checkpointing.py: the async writer's results queue (our own Manager, stopped at exit)"),
    ("megatron.core.tensor_parallel.layers", "_grad_accum_fusion_available",
     "training/model_setup.py: use_fused_wgrad_accumulation supplies fused_weight_gradient_mlp_cuda without Apex"),
    ("megatron.core.tensor_parallel.layers", "custom_fwd",
     "models/vision.py: _BiasEpilogueLinear.forward is decorated as megatron-core's linear function is"),
    ("megatron.core.optimizer.distrib_optimizer", "HAVE_APEX_OR_TE",
     "training/checkpointing.py: the 'step' fix applies only to the torch-Adam fallback"),
]


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            pytest.fail(f"megatron-core has no {module}.{qualname}")
    return obj


@pytest.mark.parametrize("module,name,params,where", SIGNATURES, ids=[s[1] for s in SIGNATURES])
def test_overridden_private_methods_keep_their_signature(module, name, params, where):
    sig = list(inspect.signature(_resolve(module, name)).parameters)[1:]  # after self
    assert sig[: len(params)] == params, f"{module}.{name}{sig} changed; used by {where}"
    if name.endswith("_postprocess"):
        assert "loss_mask" in sig, f"{name} no longer takes loss_mask; used by {where}"


@pytest.mark.parametrize("module,name,where", ATTRIBUTES, ids=[a[1] for a in ATTRIBUTES])
def test_private_attributes_exist(module, name, where):
    assert hasattr(importlib.import_module(module), name), f"megatron-core has no {module}.{name}; used by {where}"


def test_use_te_activation_func_still_builds_the_spec_activation():
    """models/decoder.py sets TransformerConfig.use_te_activation_func for the fused backend so that MLP
    builds the activation module given in the layer spec (our SwiGLU): guard that meaning, not the name."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    assert "use_te_activation_func" in {f.name for f in dataclasses.fields(TransformerConfig)}
    src = inspect.getsource(MLP.__init__)
    assert "self.config.use_te_activation_func" in src and "submodules.activation_func" in src, (
        "MLP no longer builds submodules.activation_func under use_te_activation_func (models/decoder.py)")


def test_mlp_adds_a_returned_bias_only_when_there_is_one():
    """models/vision.py: fc1 (built with skip_bias_add) returns None as its bias once the GEMM added it;
    megatron-core's MLP must then skip its own bias add (the unfused activation path)."""
    from megatron.core.transformer.mlp import MLP

    src = inspect.getsource(MLP.forward)
    assert "if bias_parallel is not None:" in src, "MLP.forward no longer skips a None fc1 bias (models/vision.py)"


def test_vocab_parallel_embedding_forward_is_what_ours_repeats():
    """models/embedding.py: MainGradVocabParallelEmbedding.forward repeats megatron-core's forward around
    its own lookup (the mask of ids outside this rank's vocabulary shard, their zeroed output rows, the
    all-reduce or reduce-scatter): guard those steps, so that an upgrade changing them fails here."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    src = inspect.getsource(VocabParallelEmbedding.forward)
    for step in ("input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)",
                 "masked_input = input_.clone() - self.vocab_start_index", "masked_input[input_mask] = 0",
                 "output_parallel[input_mask, :] = 0.0", "if self.reduce_scatter_embeddings:",
                 "output_parallel.transpose(0, 1).contiguous()", "reduce_scatter_to_sequence_parallel_region(",
                 "reduce_from_tensor_model_parallel_region("):
        assert step in src, f"VocabParallelEmbedding.forward no longer has {step!r} (models/embedding.py repeats it)"


def test_linear_backward_still_reads_use_bias_from_ctx():
    """models/vision.py's _BiasEpilogueLinear.backward clears ctx.use_bias so that megatron-core's backward
    skips its bias sum (ours replaces it): guard that the inherited backward still decides by that field."""
    from megatron.core.tensor_parallel.layers import LinearWithGradAccumulationAndAsyncCommunication as F

    src = inspect.getsource(F.backward)
    assert "use_bias = ctx.use_bias" in src and "if use_bias else None" in src, (
        "LinearWithGradAccumulationAndAsyncCommunication.backward no longer takes the bias gradient from "
        "ctx.use_bias; used by models/vision.py: _BiasEpilogueLinear.backward")
