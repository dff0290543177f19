"""Layout-independent initialisation: the same seed gives the same model at any TP / PP.

megatron-core draws initial weights from one RNG stream in construction order, so a pipeline stage that
builds only layers 3-4 draws different numbers than a single process that built layers 1-4 first: TP=1 and
PP=2 runs start from different models and cannot be compared. Here every parameter is drawn from its own
generator, seeded by ``(seed, global parameter name)``, as the full unsharded tensor, then sliced the way
megatron shards it (contiguous chunks along ``partition_dim``; megatron's fused QKV and gated-MLP layouts are
grouped by query group, the gated MLP uses megatron's ``partition_stride``, see :func:`shard`).

Rules (megatron's defaults for a GPT): norms -> 1, biases -> 0, ``linear_proj`` / ``linear_fc2`` weights ->
N(0, std / sqrt(2 * num_layers)), every other weight -> N(0, std). A tied output layer on the last pipeline
stage is drawn under the embedding's name, so it equals the first stage's embedding.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state

_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def global_name(local_name: str, layer_offset: dict[int, int], tied: bool) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<global>.x``; a tied output layer -> the embedding."""
    if tied and local_name.endswith("output_layer.weight"):
        return local_name.replace("output_layer.weight", "embedding.word_embeddings.weight")
    match = re.search(r"decoder\.layers\.(\d+)\.", local_name)
    if match is None:
        return local_name
    global_index = layer_offset[int(match.group(1))]
    return local_name[: match.start(1)] + str(global_index) + local_name[match.end(1) :]


def _draw(name: str, shape: torch.Size, std: float, num_layers: int, seed: int) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    if name.endswith(_SCALED):
        std = std / math.sqrt(2.0 * num_layers)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=generator) * std


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """megatron's TP slicing: split into ``size * stride`` chunks, rank r keeps chunks r, r + size, ...

    ``stride`` > 1 for fused layouts such as SwiGLU's ``[gate; up]``, where each rank holds a slice of both.
    """
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def initialize(model: torch.nn.Module, seed: int, std: float, num_layers: int, tied: bool) -> None:
    """Overwrite every parameter of a (non-DDP-wrapped) megatron GPT with its layout-independent value."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    layer_offset = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    with torch.no_grad():
        for local_name, param in model.named_parameters():
            name = global_name(local_name, layer_offset, tied)
            sharded = getattr(param, "tensor_model_parallel", False) and tp_size > 1
            shape = list(param.shape)
            if sharded:
                shape[param.partition_dim] *= tp_size
            full = _draw(name, torch.Size(shape), std, num_layers, seed)
            if sharded:
                full = shard(full, param.partition_dim, getattr(param, "partition_stride", 1), tp_rank, tp_size)
            param.copy_(full.to(param.dtype))
