"""Rank function of test_save_state.py (module level: ``run_distributed`` pickles it by name)."""
from __future__ import annotations

import os

import torch

VOCAB, SEQ = 256, 32


def _build(tp: int, out: str):
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.training.loop import prepare_config, setup_run

    cfg = load_config(None, ["--model.preset", "tiny", "--model.vocab_size", str(VOCAB), "--data.mock", "true",
                             "--data.seq_length", str(SEQ), "--training.micro_batch_size", "2",
                             "--training.global_batch_size", str(2 * (int(os.environ["WORLD_SIZE"]) // tp)),
                             "--parallel.tp", str(tp), "--parallel.distributed_optimizer", "true",
                             "--training.train_steps", "10", "--schedule.warmup_steps", "1",
                             "--logging.tensorboard", "false", "--logging.output_dir", f"{out}/log"])
    prepare_config(cfg)
    return setup_run(cfg, lambda **kw: build_decoder(cfg, VOCAB, **kw), flops_per_token=0.0)


def _train(run, steps: int) -> None:
    from megatron_bluelm.training.step import train_step

    gen = torch.Generator().manual_seed(1 + torch.distributed.get_rank())

    def batches():
        while True:
            x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
            yield {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(2, SEQ),
                   "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous(), "attention_mask": None}

    data = [batches()]
    for _ in range(steps):
        train_step(run.model, run.optimizer, run.scheduler, data, num_microbatches=1, seq_length=SEQ,
                   micro_batch_size=2, device=run.info.device)


def _flat(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flat(v, path + (k,))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _flat(v, path + (i,))
    else:
        yield path, x


def _differences(ours: dict, theirs: dict) -> tuple[list[str], int, int]:
    """(what differs, ShardedTensors compared, of which main replicas whose data was compared)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, is_main_replica

    a, b = dict(_flat(ours)), dict(_flat(theirs))
    diffs = [f"only in ours: {p}" for p in a.keys() - b.keys()] + [f"only in megatron-core's: {p}"
                                                                   for p in b.keys() - a.keys()]
    n = mains = 0
    for path in a.keys() & b.keys():
        x, y = a[path], b[path]
        if isinstance(y, ShardedBase):
            n += 1
            for field in ("key", "global_shape", "local_shape", "global_offset", "axis_fragmentations", "dtype",
                          "replica_id", "flattened_range"):
                if getattr(x, field, None) != getattr(y, field, None):
                    diffs.append(f"{path} {field}: {getattr(x, field, None)} vs {getattr(y, field, None)}")
            if type(x) is not type(y):
                diffs.append(f"{path}: {type(x).__name__} vs {type(y).__name__}")
            elif is_main_replica(y.replica_id):
                mains += 1
                if isinstance(y.data, torch.Tensor):
                    if not (isinstance(x.data, torch.Tensor) and torch.equal(x.data.cpu(), y.data.cpu())):
                        diffs.append(f"{path} ({y.key}): data differs")
                elif x.data != y.data:  # a ShardedObject's payload
                    diffs.append(f"{path} ({y.key}): {x.data!r} vs {y.data!r}")
        elif isinstance(y, torch.Tensor):
            if not torch.equal(x, y):
                diffs.append(f"{path}: {x} vs {y}")
        elif x != y:
            diffs.append(f"{path}: {x!r} vs {y!r}")
    return sorted(diffs), n, mains


def _checkpoint_bytes(root: str) -> dict:
    """Every shard file's bytes (torch DCP's ``.metadata`` pickles object ids, so it is left out)."""
    return {name: open(os.path.join(root, name), "rb").read() for name in sorted(os.listdir(root))
            if name.endswith(".distcp")}


def compare_save_states(phases: list[tuple[int, int]], out: str) -> list[dict]:
    """Per ``(tp, port)``: one training step, then our save state vs megatron-core's (structure,
    metadata, main-replica data) and the shard files each one writes (byte for byte)."""
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.checkpointing import (
        SHARDED_METADATA,
        build_sharded_state_dict,
        model_sharded_state_dict,
    )

    results = []
    for tp, port in phases:
        os.environ["MASTER_PORT"] = str(port)
        run = _build(tp, out)
        try:
            _train(run, 1)
            original = DistributedOptimizer.get_parameter_state_dp_zero

            def host_round_trip(*a, **kw):
                raise AssertionError("a save went through megatron-core's host round trip")

            DistributedOptimizer.get_parameter_state_dp_zero = host_round_trip
            try:
                ours = build_sharded_state_dict(run, is_loading=False, rng=False)
            finally:
                DistributedOptimizer.get_parameter_state_dp_zero = original
            theirs = model_sharded_state_dict(run.model)
            theirs["optimizer"] = run.optimizer.sharded_state_dict(theirs, is_loading=False,
                                                                   metadata=SHARDED_METADATA)
            diffs, n, mains = _differences(ours, theirs)
            files = []
            for name, sd in (("ours", ours), ("theirs", theirs)):
                path = os.path.join(out, f"tp{tp}", name)
                if torch.distributed.get_rank() == 0:
                    os.makedirs(path)
                torch.distributed.barrier()
                dist_checkpointing.save(sd, path)
                files.append(_checkpoint_bytes(path) if torch.distributed.get_rank() == 0 else None)
            results.append({"tp": tp, "dp": run.info.dp, "diffs": diffs, "compared": n, "main_replicas": mains,
                            "same_files": files[0] == files[1], "files": sorted(files[0] or {})})
        finally:
            teardown()
    return results
