"""Process groups on top of megatron-core: device and backend choice, TP/PP/DP groups, seeds.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) and as a
single process with no launcher at all (world size 1). NCCL on GPU, gloo on CPU, chosen automatically.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.parallel.cpu import enable_cpu_mode


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    device: torch.device

    @property
    def is_logging_rank(self) -> bool:
        """The last rank: it holds the last pipeline stage, where the loss is."""
        return self.rank == self.world_size - 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it), for a single-process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(dist_backend: str = "auto", timeout_minutes: int = 10) -> torch.device:
    """Start torch.distributed (if not started) and pick this process's device."""
    use_cuda = torch.cuda.is_available()
    backend = dist_backend if dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.dist_backend: 'nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        enable_cpu_mode()
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size_from_env() > 1:
                raise ConfigError("WORLD_SIZE > 1 but MASTER_PORT is not set: start multi-process runs with "
                                  "torchrun (it sets both)")
            # Without a launcher there is no one to agree a port with: any free one does, so two runs on one
            # machine (or a port held by another program) never collide.
            os.environ["MASTER_PORT"] = str(free_port(os.environ["MASTER_ADDR"]))
        dist.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size_from_env(),
            timeout=timedelta(minutes=timeout_minutes),
        )
    return device


def init_model_parallel(tp: int, pp: int, vpp: int | None = None, cp: int = 1) -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )


def set_seeds(seed: int) -> None:
    """Same host seed everywhere (data order, layout-independent init); megatron's per-TP-rank RNG
    streams (dropout inside TP regions) seeded from it as megatron-core does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # the call above moves the CPU generator on CPU-only runs


def setup_parallel(tp: int, pp: int, vpp: int | None, cp: int, seed: int,
                   dist_backend: str = "auto") -> ParallelInfo:
    device = init_distributed(dist_backend)
    init_model_parallel(tp, pp, vpp, cp)
    set_seeds(seed)
    world = dist.get_world_size()
    return ParallelInfo(rank=dist.get_rank(), world_size=world, tp=tp, pp=pp,
                        dp=world // (tp * pp * cp), device=device)


def teardown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
