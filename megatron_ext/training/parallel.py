"""Process groups: gloo on CPU, NCCL on GPU; megatron's tensor/pipeline/data-parallel groups; seeds.

Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR from the environment) and as a plain single
process (creates a one-rank group on a free local port), so the same training code serves both.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_ext import patches


@dataclass(frozen=True)
class Layout:
    """Where this process sits: global rank and its tensor / pipeline / data-parallel coordinates."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vpp_size: int = 1  # model chunks per pipeline rank (interleaved 1F1B); 1 without virtual stages

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def chunks(self) -> range:
        """The model chunks this rank holds: with ``pp`` ranks and ``vpp`` chunks each, chunk c of pipeline rank r
        is virtual stage ``c * pp + r`` (megatron's interleaving: rank 0 holds stages 0 and pp, ...)."""
        return range(self.vpp_size)

    def holds_embedding(self, chunk: int) -> bool:
        """Whether ``chunk`` is the first virtual stage (the input embedding, the visual module)."""
        return self.first_stage and chunk == 0

    def holds_output(self, chunk: int) -> bool:
        """Whether ``chunk`` is the last virtual stage (the output layer and the loss)."""
        return self.last_stage and chunk == self.vpp_size - 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(tp: int, pp: int, seed: int, vpp: int = 1, timeout_s: float = 1800.0) -> Layout:
    """Create the process groups and seed every RNG megatron uses (``vpp``: virtual pipeline stages per pipeline
    rank; ``timeout_s``: how long a collective waits for a rank before it raises). Idempotent for the same
    layout."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:  # launched by torchrun / SLURM
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain single process; leaves the environment alone so child processes launch cleanly
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    patches.install()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                             # megatron makes a timedelta of it: minutes need not be whole
                                             distributed_timeout_minutes=timeout_s / 60)
    seed_everything(seed)
    return current_layout()


def seed_everything(seed: int) -> None:
    """Same seed on every rank for the model init (megatron initialises on CPU and slices per TP rank)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def current_layout() -> Layout:
    ps = parallel_state
    return Layout(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        vpp_size=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
