"""Build the model chunks of this rank, initialize them, wrap them in megatron-core DDP, and build
the optimizer and LR scheduler."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MCoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel import layers as tp_layers

from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.models.decoder import param_dtype
from megatron_bluelm.models.embedding import MainGradVocabParallelEmbedding
from megatron_bluelm.models.init import init_decoder_


def build_model_chunks(cfg: RunConfig, build_chunk: Callable, device: torch.device) -> List[torch.nn.Module]:
    """One chunk per virtual pipeline stage (one without interleaving). ``build_chunk(pre_process,
    post_process, vp_stage)`` returns an un-wrapped megatron module."""
    vpp = cfg.parallel.vpp or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if cfg.parallel.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk = build_chunk(pre_process=pre, post_process=post, vp_stage=stage)
        chunk.to(device)
        init_decoder_(chunk, cfg.training.seed, cfg.model.init_std, cfg.model.num_layers)
        chunks.append(chunk)
    return chunks


def wrap_ddp(cfg: RunConfig, chunks: List[torch.nn.Module]) -> List[DistributedDataParallel]:
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,  # ours instead: skip_nonfinite_steps (why there)
        bucket_size=None if p.overlap_grad_reduce else 0,  # one bucket per chunk when not overlapping
    )
    config = chunks[0].config
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk buckets when overlapping: megatron-core's own rule for VPP.
            disable_bucketing=i > 0,
        ))
    for model in wrapped:
        model.broadcast_params()  # identical already (same seed); cheap insurance for DP replicas
    # CUDA only: on the CPU the fused path is the slower one (a test layout took 20.4 vs 16.3 s), and
    # CPU runs are tests and demos; tests/test_wgrad_fusion.py switches it on there to check it
    if cfg.training.fused_wgrad_accumulation and any(p.is_cuda for c in chunks for p in c.parameters()):
        use_fused_wgrad_accumulation(chunks)
    return wrapped


def wgrad_accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` ([tokens, out]^T x [tokens, in] -> [out, in]) as one
    GEMM whose epilogue adds into ``main_grad``: on CUDA, bf16/fp16 inputs with an fp32 output and
    accumulator (``torch.addmm(..., out_dtype=float32)``, cuBLAS). Apex's ``wgrad_gemm_accum_fp32``
    contract, which megatron-core's linears call under ``gradient_accumulation_fusion``."""
    if main_grad.is_cuda and main_grad.dtype == torch.float32 and total_input.dtype != torch.float32:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


def use_fused_wgrad_accumulation(chunks: List[torch.nn.Module]) -> int:
    """Let the weight-gradient GEMM of every megatron-core column / row parallel linear that DDP gave
    an fp32 ``main_grad`` accumulate into it directly (``wgrad_accumulate``), instead of writing a bf16
    gradient that DDP's backward hook then adds to ``main_grad`` in a separate pass (10 bytes per
    parameter per micro-batch: 11.8 ms of every 4096-token micro-batch of the 2.9B multimodal model on
    one H200). This is megatron-core's own ``gradient_accumulation_fusion`` path, with Apex's kernel
    (absent here) supplied by ``wgrad_accumulate``; Apex's stays where it is installed.

    Switched per module, after wrapping, and only where ``main_grad`` exists: a model that is never
    wrapped (inference, tests that call backward on a bare module) keeps the unfused path, which is
    the one that works without ``main_grad``. Linears whose weight is shared with another module (a
    tied output layer) stay unfused: megatron-core's fused path would hand autograd a placeholder
    gradient in place of the sum over both uses. The decoder's token embedding takes the same switch
    (``models/embedding.py``: its rows go into ``main_grad``, no dense gradient per micro-batch).
    Returns how many modules were switched."""
    if not tp_layers._grad_accum_fusion_available:
        tp_layers.fused_weight_gradient_mlp_cuda = SimpleNamespace(
            wgrad_gemm_accum_fp32=wgrad_accumulate, wgrad_gemm_accum_fp16=wgrad_accumulate)
        tp_layers._grad_accum_fusion_available = True
    switched = 0
    for chunk in chunks:
        for module in chunk.modules():
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, MainGradVocabParallelEmbedding)):
                continue
            weight = module.weight
            if weight is None or not weight.requires_grad or getattr(weight, "shared", False):
                continue
            if hasattr(weight, "main_grad"):
                module.gradient_accumulation_fusion = True
                switched += 1
    return switched


def build_optimizer(cfg: RunConfig, model: List[torch.nn.Module]):
    o = cfg.optimizer
    dtype = param_dtype(cfg)
    mcore_cfg = MCoreOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(mcore_cfg, model)
    use_foreach_grad_kernels()
    use_deferred_clip()
    use_fused_adam(optimizer)
    skip_nonfinite_steps(optimizer)
    return optimizer, build_scheduler(cfg, optimizer)


def skip_nonfinite_steps(optimizer) -> None:
    """Never apply an update computed from NaN/inf gradients: the optimizer step reports failure
    (``optimizer.step()`` returns ``(False, grad_norm, ...)``, the step's ``skipped``) and leaves
    parameters, Adam moments and the LR schedule untouched; ``training.nan_policy`` decides what the
    loop does then. Without a loss scaler megatron-core checks nothing: bf16/fp32 steps with a NaN
    gradient norm are applied (its clip coefficient ``max_norm / nan`` is not < 1, so not even clipped).

    The test reuses the global gradient norm megatron-core computes for clipping (all-reduced over
    the model-parallel and, with the distributed optimizer, data-parallel ranks, so every rank decides
    alike): a NaN/inf element makes the norm NaN/inf, and the check costs one comparison. With
    ``clip_grad 0`` no norm is computed, so the check computes it (one extra pass over the gradients).
    megatron-core's own ``check_for_nan_in_grad`` is not used: it raises on the rank that sees the NaN
    only, leaving the others in a collective, and it cannot skip."""
    norms: list = []

    def record(fn):
        def wrapped(*args, **kwargs):
            norm = fn(*args, **kwargs)
            norms.append(norm)
            return norm
        return wrapped

    optimizer.get_grad_norm = record(optimizer.get_grad_norm)  # ChainedOptimizer.step's norm
    if hasattr(optimizer, "clip_grad_norm"):
        optimizer.clip_grad_norm = record(optimizer.clip_grad_norm)  # a single optimizer's
    step_with_ready_grads = optimizer.step_with_ready_grads

    def guarded_step() -> bool:
        norm = norms[-1] if norms else optimizer.get_grad_norm()
        norms.clear()
        if not math.isfinite(float(norm)):
            return False
        return step_with_ready_grads()

    optimizer.step_with_ready_grads = guarded_step


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The global L2 norm of ``tensor_lists`` as megatron-core's ``multi_tensor_l2norm`` returns it
    ((norm [1] fp32 on the tensors' device, None)), computed on the device: per-tensor norms with one
    ``_foreach_norm`` and their norm, with no value read on the host. megatron-core's fallback without
    Apex / Transformer Engine (``local_multi_tensor_l2_norm``) reads every per-tensor norm back to
    build a host list (171 device syncs in each optimizer step of the 2.44B decoder, the GPU idle
    after each) and copies the total to ``"cuda"`` by name."""
    tensors = [t for group in tensor_lists for t in group]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """``multi_tensor_scale``'s contract (dst = src * scale) in ``_foreach`` kernel groups without
    temporaries: in place when the lists are the same tensors (gradient clipping), a copy (with the
    dtype cast) at scale 1 (main params to model params), else per tensor."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        for a, b in zip(src, dst):
            b.copy_(a * scale)


def use_foreach_grad_kernels() -> None:
    """Where megatron-core runs without Apex / Transformer Engine, its gradient-norm and clipping
    helpers become ``foreach_l2_norm`` / ``foreach_scale`` (same values; see there). A no-op when
    the fused kernels of Apex / TE are installed."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    if clip_grads.l2_norm_impl is mutils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, moptimizer):
        if module.multi_tensor_scale_impl is mutils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale


DEFER_CLIP = True  # False: megatron-core's clip multiply (benchmarks measure what the deferral saves)


def _clip_owner(params):
    """The one torch Adam(W) on the fused path that owns every parameter with a gradient, or None."""
    owners = {id(o): o for o in (getattr(p, "_bluelm_clip_owner", lambda: None)() for p in params
                                 if p.grad is not None)}
    if len(owners) != 1:
        return None
    (owner,) = owners.values()
    if owner is None or not all(g.get("fused") for g in owner.param_groups):
        return None
    return owner


def use_deferred_clip() -> None:
    """Gradient clipping by the global norm folded into the optimizer's kernel: megatron-core multiplies
    every fp32 gradient by ``max_norm / norm`` in a pass of its own (on an H200, 2.0 ms of each micro-batch
    of the 2.9B multimodal model at 8 a step: 16 ms a step whenever the norm is above the threshold);
    torch's fused Adam(W) divides each gradient by its ``grad_scale`` tensor as it reads it (the AMP
    unscale), so the coefficient goes there (``grad_scale = norm / max_norm``) and that pass is gone.
    Applies where one torch Adam(W) on the fused path (``use_fused_adam``) owns the clipped parameters;
    anything else (Apex / TE optimizers, decoupled gradients) takes megatron-core's multiply. The norm
    and its logging, the NaN guard and the update's value are unchanged (the same product, rounded
    the same way to within one ulp)."""
    from megatron.core.optimizer import optimizer as moptimizer

    current = moptimizer.clip_grad_by_total_norm_fp32
    if getattr(current, "_bluelm_deferred", False):
        return

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        params = [parameters] if torch.is_tensor(parameters) else list(parameters)
        owner = _clip_owner(params) if DEFER_CLIP and not use_decoupled_grad else None
        if owner is None or not math.isfinite(total_norm):  # a non-finite norm: megatron-core's own handling
            return current(params, max_norm, total_norm, use_decoupled_grad)
        coeff = max_norm / (total_norm + 1.0e-6)  # megatron-core's coefficient, applied where it applies
        owner._bluelm_clip_coeff = coeff if coeff < 1.0 else None

    clip_grad_by_total_norm_fp32._bluelm_deferred = True
    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _deferred_clip_hooks(inner) -> None:
    """Tag inner's parameters as its own and hand a pending clip coefficient to its step as
    ``grad_scale`` (dropped after the step); once per optimizer."""
    import weakref

    ref = weakref.ref(inner)
    for group in inner.param_groups:
        for p in group["params"]:
            p._bluelm_clip_owner = ref
    if getattr(inner, "_bluelm_clip_hooks", False):
        return

    def pre(opt, args, kwargs):
        coeff, opt._bluelm_clip_coeff = getattr(opt, "_bluelm_clip_coeff", None), None
        opt.__dict__.pop("grad_scale", None)  # never a scale left from a step that raised
        if coeff is not None:
            device = opt.param_groups[0]["params"][0].device
            opt.grad_scale = torch.tensor(1.0 / coeff, dtype=torch.float32, device=device)

    def post(opt, args, kwargs):
        opt.__dict__.pop("grad_scale", None)

    inner.register_step_pre_hook(pre)
    inner.register_step_post_hook(post)
    inner._bluelm_clip_hooks = True


def use_fused_adam(optimizer) -> None:
    """Run the torch Adam(W) that megatron-core falls back to without Apex / Transformer Engine as
    torch's fused kernel (one pass over parameter, gradient and both moments) instead of its
    default multi-pass ``foreach`` path: the optimizer step of the 2.44B decoder on one H100 goes
    from 88.7 to 42.2 ms. The fused kernel wants ``step`` as an fp32 tensor on the parameter's
    device, so steps made or loaded on the CPU are moved. Called after building the optimizer and
    again after loading a checkpoint (``load_state_dict`` restores the saved groups' flags)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # Apex / TE FusedAdam: already one kernel
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        _deferred_clip_hooks(inner)
        for param, state in inner.state.items():
            step = state.get("step")
            if torch.is_tensor(step) and step.device != param.device:
                state["step"] = step.to(device=param.device, dtype=torch.float32)


def build_scheduler(cfg: RunConfig, optimizer, total_steps: Optional[int] = None) -> OptimizerParamScheduler:
    """``total_steps``: optimizer steps the run makes (default ``training.train_steps``; RL makes
    ``rl.updates_per_step`` per step, see stages/rl.py)."""
    s, o, t = cfg.schedule, cfg.optimizer, cfg.training
    total = t.train_steps if total_steps is None else total_steps
    decay_steps = s.decay_steps if s.decay_steps is not None else total
    style = s.style if s.style != "wsd" else "WSD"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr if s.style != "constant" else o.lr,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=max(decay_steps, s.warmup_steps + 1),
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=s.wsd_decay_steps,
        lr_wsd_decay_style=s.wsd_decay_style,
    )
