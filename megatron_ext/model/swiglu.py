"""SwiGLU MLP for the local (CPU) spec: megatron's fused ``linear_fc1`` weight, used as two GEMMs.

megatron stores the gate and up projections as one ``linear_fc1.weight`` of ``[2 f, h]`` per tensor-parallel
rank (gate rows first, then up rows), computes one ``[n, 2 f]`` GEMM and applies ``silu(gate) * up`` to its two
strided halves. On CPU that costs more than two ``[n, f]`` GEMMs on contiguous outputs. :class:`SwiGLUMLP`
keeps the parameter (same name, shape, sharding and checkpoint) and computes, in one autograd function,

    gate = x @ W[:f].T,   up = x @ W[f:].T,   y = silu(gate) * up

with a hand-written backward that writes the weight gradient's two halves into one ``[2 f, h]`` tensor, or, where
the kernel of megatron's ``gradient_accumulation_fusion`` exists (apex's on GPU, ``cpu_compat``'s ``addmm_`` on CPU)
and DDP gave the weight a ``main_grad`` buffer, GEMM-accumulates them straight into that buffer with the protocol
of megatron's linear layers (``wgrad_gemm_accum_*``, ``grad_added_to_main_grad`` and a dummy gradient). On CPU
this holds even though megatron's own linear layers run without the fusion (``plain_linear``): this function is a
Python autograd node either way, so the fusion only saves the gradient's buffer and its addition. Shapes:
``x [s, b, h] -> y [s, b, f]`` (``f`` = ffn_hidden_size / tp), then megatron's ``linear_fc2`` as before.
Tensor parallel: the input enters through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce
of the input gradient backward), as ``ColumnParallelLinear`` does without sequence parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, layers
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    """``silu(x W_gate^T) * (x W_up^T)`` for ``weight = [W_gate; W_up]``; ``x`` is ``[n, h]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, accumulate: bool) -> torch.Tensor:
        ctx.accumulate = accumulate
        w_gate, w_up = weight.chunk(2)
        gate, up = x @ w_gate.t(), x @ w_up.t()
        act = F.silu(gate)
        ctx.save_for_backward(x, weight, gate, act, up)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, gate, act, up = ctx.saved_tensors
        w_gate, w_up = weight.chunk(2)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        d_up = grad * act
        d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_x = torch.addmm(d_gate @ w_gate, d_up, w_up)
        if ctx.needs_input_grad[1]:
            d_w = torch.empty_like(weight)
            if ctx.accumulate:  # megatron's linear-layer protocol: d_w is a dummy, DDP's hook skips it
                kernels = layers.fused_weight_gradient_mlp_cuda  # apex on GPU, cpu_compat's stand-in on CPU
                fp32 = weight.main_grad.dtype == torch.float32
                accumulate = kernels.wgrad_gemm_accum_fp32 if fp32 else kernels.wgrad_gemm_accum_fp16
                for target, d in zip(weight.main_grad.chunk(2), (d_gate, d_up)):
                    accumulate(x, d, target)
                weight.grad_added_to_main_grad = True
            else:
                for target, d in zip(d_w.chunk(2), (d_gate, d_up)):
                    torch.mm(d.t(), x, out=target)
        return d_x, d_w, None


class SwiGLUMLP(MLP):
    """megatron's ``MLP`` (same submodules and parameters) with ``linear_fc1`` + SwiGLU as :class:`_SwiGLU`.

    Only the configuration our recipes build is accepted: gated SiLU, no bias, no clamp, no sequence parallelism.
    """

    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, **kwargs)
        c = config
        if not (c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear
                and c.activation_func_clamp_value is None and c.glu_linear_offset == 0
                and not c.sequence_parallel and not c.use_te_activation_func):
            raise ValueError("SwiGLUMLP needs gated SiLU without bias, clamp, offset or sequence parallelism")

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise NotImplementedError("SwiGLUMLP has no per-token scale (MoE experts)")
        x = hidden_states
        if self.tp_group.size() > 1:
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        weight = self.linear_fc1.weight  # apex's kernel on GPU, cpu_compat's on CPU; DDP gives the buffer
        accumulate = layers._grad_accum_fusion_available and hasattr(weight, "main_grad")
        hidden = _SwiGLU.apply(x.reshape(-1, x.shape[-1]), weight, accumulate)
        return self.linear_fc2(hidden.view(*x.shape[:-1], -1))
