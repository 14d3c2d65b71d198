"""The distributed optimizer's Adam state for a checkpoint save, built on the device.

Our checkpoints store the distributed optimizer in megatron-core's ``fully_reshardable`` format: one
tensor per model parameter and state (``optimizer.state.{param,exp_avg,exp_avg_sq}.<parameter key>``,
fp32, the parameter's global shape), so that they reshard over TP/PP/DP and load into the plain
optimizer. megatron-core 0.16.1 builds that save state in ``get_parameter_state_dp_zero``: it
zero-fills host buffers for the whole state, copies every parameter's state to them one by one
(pageable, synchronous), copies them back to the device for an all-gather, copies the result to the
host again and concatenates it; the save then clones every parameter's slice of those buffers (a view
of a larger storage would be written whole). For the 2.44B decoder that is ~29 GiB moved five times
while training waits (on one H200 the async save call blocked 37.9 s, the gather being most of it).

``fully_reshardable_save_state`` returns the same ShardedTensors (keys, shapes, dtypes, replica ids;
the files on disk are identical) with the data moved once:

* data-parallel size 1: the optimizer's own state tensors, viewed in the parameter's shape: no copy
  here; megatron-core's save then copies them to pinned host memory (its preload) in one pass.
* data-parallel size > 1: per bucket and state, the DP ranks' shards are all-gathered on the device
  (one bucket of one state at a time: the extra device memory is one bucket's worth), and the rank
  that saves a parameter (its main replica: DP rank 0) copies that parameter's slice to the host
  (pinned when CUDA is there). Entries this rank does not save carry no data (a zero-stride tensor of
  the right shape): megatron-core validates their metadata and skips them when writing.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")  # the fully_reshardable format's per-parameter tensors
PREFIX = "optimizer.state"


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host tensor with its own storage, copied from ``t`` (asynchronously from a GPU: synchronize
    before reading it)."""
    if t.device.type == "cpu":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(t, non_blocking=True)
    return host


def _states(opt, model_param) -> dict:
    """The main parameter and Adam moments of ``model_param``'s range on this rank, flat. A parameter
    not stepped yet has no moments: Adam's initial ones are zeros."""
    tensors = opt._get_main_param_and_optimizer_states(model_param)
    main = tensors["param"]
    return {k: tensors[k] if k in tensors else torch.zeros_like(main) for k in STATE_KEYS}


def _whole_states(opt, buffer, per_bucket, meta_of, group) -> dict:
    """``{model_param: {state key: fp32 tensor in the parameter's shape}}`` for every parameter of
    ``buffer``; data only where this rank holds the main replica (others: a zero-stride stand-in)."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    dp = group.size() if group is not None else 1
    whole = {}
    if dp == 1:  # every parameter's range on this rank is the whole parameter
        for range_map in per_bucket:
            for model_param in range_map["param_map"]:
                shape = meta_of[model_param].data.shape
                whole[model_param] = {k: v.float().view(shape) for k, v in _states(opt, model_param).items()}
        return whole
    for bucket_idx, range_map in enumerate(per_bucket):
        bucket = buffer.buckets[bucket_idx]
        world_numel = bucket.grad_data.numel()
        local_numel = world_numel // dp
        mine = {p: _states(opt, p) for p in range_map["param_map"]}
        params = [p for p, (_, _, b) in buffer.param_index_map.items() if b == bucket_idx]
        device = bucket.grad_data.device
        for key in STATE_KEYS:
            local = torch.zeros(local_numel, dtype=torch.float32, device=device)
            for p, ranges in range_map["param_map"].items():
                local[ranges["gbuf_local"].start:ranges["gbuf_local"].end].copy_(mine[p][key])
            world = torch.empty(world_numel, dtype=torch.float32, device=device)
            dist.all_gather_into_tensor(world, local, group=group)
            for p in params:
                shape = meta_of[p].data.shape
                if is_main_replica(meta_of[p].replica_id):
                    start, end, _ = buffer.param_index_map[p]
                    data = _host_copy(world[start - bucket.offset:end - bucket.offset].view(shape))
                else:
                    data = torch.zeros((), dtype=torch.float32, device=device).expand(shape)
                whole.setdefault(p, {})[key] = data
    return whole


@torch.no_grad()
def fully_reshardable_save_state(opt, model_sharded_state_dict: dict, metadata: dict | None = None) -> dict:
    """What ``DistributedOptimizer.sharded_param_state_fully_reshardable`` returns for a save
    (``is_loading=False``): ``{i: {state key: ShardedTensor}}`` over the buffers' parameters in
    megatron-core's order, without its host round trip (module docstring)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    meta_of = {sh.data: sh for sh in nested_values(tensors)}
    state, idx = {}, 0
    for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
        buffer = opt.buffers[gbuf_idx]
        if len(gbuf_range_maps) != 1:
            raise NotImplementedError("a distributed-optimizer buffer with several dtypes")
        (per_bucket,) = gbuf_range_maps.values()
        for model_param in buffer.param_index_map:
            if model_param not in meta_of:
                raise ValueError(f"a model parameter of shape {tuple(model_param.shape)} is not in the model's "
                                 f"sharded state dict: its optimizer state has no checkpoint key")
            if meta_of[model_param].flattened_range is not None:
                raise ValueError(f"flattened model tensor {meta_of[model_param].key}: not supported")
        whole = _whole_states(opt, buffer, per_bucket, meta_of, opt.data_parallel_group)
        for model_param in buffer.param_index_map:
            sh = meta_of[model_param]
            entry = {}
            for key in STATE_KEYS:
                kwargs = dict(key=f"{PREFIX}.{key}.{sh.key}", data=whole[model_param][key], dtype=torch.float32,
                              replica_id=sh.replica_id)
                if isinstance(sh, ShardedTensorFactory):
                    kwargs.pop("dtype")
                entry[key] = replace(sh, **kwargs)
                entry[key].validate_metadata_integrity()
            state[idx] = entry
            idx += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the host copies are complete before anything reads them
    return state


def save_with_device_gather(optimizer):
    """Context for a checkpoint save: each distributed optimizer in ``optimizer`` (chained or not)
    builds its ``fully_reshardable`` save state with ``fully_reshardable_save_state`` (this instance,
    for the duration of the block). Loading is not affected."""
    import contextlib

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    @contextlib.contextmanager
    def ctx():
        patched = []
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if not isinstance(opt, DistributedOptimizer) or opt.ddp_config.use_megatron_fsdp:
                continue

            def build(model_sd, is_loading=False, metadata=None, _opt=opt,
                      _orig=opt.sharded_param_state_fully_reshardable):
                if is_loading:
                    return _orig(model_sd, is_loading, metadata)
                return fully_reshardable_save_state(_opt, model_sd, metadata)

            opt.sharded_param_state_fully_reshardable = build
            patched.append(opt)
        try:
            yield
        finally:
            for opt in patched:
                del opt.sharded_param_state_fully_reshardable

    return ctx()
