"""A megatron-core ``GPTModel`` (Llama/Qwen2 style) from a recipe's model section.

CPU: the local layer spec with :class:`SDPACoreAttention`, which also applies RoPE (the GPT is built with
``position_embedding_type="none"``), and :class:`SwiGLUMLP` (the same ``linear_fc1`` parameter, computed as two
GEMMs). Both keep megatron's parameter names and shapes, so checkpoints move freely between specs. GPU: the
Transformer Engine spec, megatron's RoPE, when the recipe asks for ``parallel.transformer_impl:
transformer_engine`` (imported lazily; FP8 needs it). The loss is :mod:`megatron_ext.model.cross_entropy`'s where
that patch is active (:mod:`megatron_ext.patches`), megatron's fused one otherwise.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import layers
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext import patches
from megatron_ext.model import init
from megatron_ext.model.attention import SDPACoreAttention
from megatron_ext.model.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.model.swiglu import SwiGLUMLP
from megatron_ext.training import checkpoint
from megatron_ext.training.parallel import Layout, device
from viq_mllm.recipe import ModelSection, ParallelSection


def transformer_config(model: ModelSection, parallel: ParallelSection = ParallelSection(),
                       precision: str = "fp32", fp8_recipe: str = "delayed") -> TransformerConfig:
    """megatron's config of ``model`` for a layout and a precision (``train.precision``, ``train.fp8_recipe``); the
    defaults are one process in fp32, what conversion and inference build."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp > 1 else None,
        # Megatron-LM's defaults for the interleaved schedule. Not batched is also what keeps it right at PP=2:
        # a batched exchange sends activations and gradients to the same peer on one group, and gloo pairs the
        # two messages crosswise (measured: micro-batches 3 and 4 of a step got the wrong inputs); the unbatched
        # exchange sends each direction on its own group
        overlap_p2p_comm=parallel.vpp > 1,
        batch_p2p_comm=parallel.vpp == 1,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=precision in ("bf16", "fp8"),
        fp8="hybrid" if precision == "fp8" else None,
        fp8_recipe=fp8_recipe,
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        # apex's kernel on GPU. On CPU megatron's linear layers run faster as torch's F.linear (plain_linear) than
        # through cpu_compat's fused stand-in; SwiGLUMLP still uses the stand-in
        gradient_accumulation_fusion=on_gpu and layers._grad_accum_fusion_available,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=on_gpu and not patches.enabled("cross_entropy"),
    )


class _SwiGLUMLPIsKnown(logging.Filter):
    """megatron logs "Unknown MLP type ... Using default kwargs" for any MLP class but its own, because it then
    passes no ``tp_group``; :func:`layer_spec` passes it in the spec's params, so that line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_SwiGLUMLPIsKnown())


def layer_spec(model: ModelSection, parallel: ParallelSection) -> ModuleSpec:
    """TE spec (megatron applies RoPE), or the local spec whose SDPA core attention applies RoPE itself and whose
    MLP is :class:`SwiGLUMLP`. Call after process groups exist (the MLP is given the tensor-parallel group)."""
    if parallel.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SDPACoreAttention, params={"rope_theta": model.rope_theta})
    spec.submodules.mlp.module = SwiGLUMLP
    spec.submodules.mlp.params = {"tp_group": parallel_state.get_tensor_model_parallel_group()}
    return spec


class GPT(GPTModel):
    """megatron's ``GPTModel`` with two changes to the loss.

    - **Logits only where the loss is.** Given ``loss_mask`` with the labels, the output layer and the loss run
      on the supervised positions alone, and the per-token loss comes back ``[b, s]`` with zeros elsewhere, as
      megatron's would after the mask. Same loss, same gradients; what it saves is the output layer's share of
      the step at every unsupervised position: a VLM's visual positions, an SFT prompt, row padding. Example: a
      row of 512 positions whose 40 caption tokens are supervised computes ``[40, 1, V]`` logits, not
      ``[512, 1, V]``. ``all_logits=True`` (or no ``loss_mask``) computes them everywhere, as megatron does, and
      so does a model with sequence parallelism (its hidden states are split along the sequence).
    - Its unfused loss is :mod:`megatron_ext.model.cross_entropy`'s (bit-identical to megatron's unfused
      vocab-parallel cross-entropy, without its index-computing max and single-rank collectives).
      :func:`transformer_config` turns megatron's fused loss on where that patch is not active (a GPU by default).
    """

    def __init__(self, *args, all_logits: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.all_logits = all_logits

    def _postprocess(self, *, hidden_states: torch.Tensor, labels: torch.Tensor | None = None,
                     loss_mask: torch.Tensor | None = None, **rest):
        picked = self._supervised(labels, loss_mask)
        if picked is None:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, loss_mask=loss_mask, **rest)
        b, s = labels.shape
        hidden = hidden_states.flatten(0, 1).index_select(0, picked)  # [s, b, h] -> [n, h], no copy of the rest
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden.unsqueeze(1), weight=weight)  # [n, 1, V / tp]
        loss = self.compute_language_model_loss(labels.t().reshape(1, -1).index_select(1, picked), logits)  # [1, n]
        return loss.new_zeros(s * b).index_add(0, picked, loss.view(-1)).view(s, b).t().contiguous()

    def _supervised(self, labels: torch.Tensor | None, loss_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Indices into ``[s * b]`` (the hidden states' sequence-major order) of the positions to compute logits
        at; None for every position."""
        if (self.all_logits or labels is None or loss_mask is None or not self.post_process or self.mtp_process
                or self.config.mtp_num_layers is not None or self.config.sequence_parallel):
            return None
        picked = torch.nonzero(loss_mask.t().reshape(-1)).squeeze(1)
        return None if picked.numel() == loss_mask.numel() else picked

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())  # logits are [s, b, V/tp]
        return loss.transpose(0, 1).contiguous()  # [b, s], as megatron's


def build_gpt(
    config: TransformerConfig,
    model: ModelSection,
    parallel: ParallelSection,
    vocab_size: int,
    layout: Layout,
    seed: int,
    all_logits: bool = False,
    chunk: int = 0,
) -> GPTModel:
    """``vocab_size`` is the padded size (divisible by 128 x MAX_TP). Weights depend on ``seed`` only, not on
    the parallel layout (:mod:`megatron_ext.model.init`). The model comes back on the device it runs on: megatron puts
    its own layers there, but the local spec's torch norms are built on the CPU. ``all_logits``: see :class:`GPT`.
    ``chunk``: which of this rank's virtual pipeline stages to build (``parallel.vpp`` > 1; see
    :attr:`Layout.chunks`)."""
    gpt = GPT(
        config=config,
        transformer_layer_spec=layer_spec(model, parallel),
        vocab_size=vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=layout.holds_embedding(chunk),
        post_process=layout.holds_output(chunk),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope" if parallel.transformer_impl == "transformer_engine" else "none",
        rotary_base=int(model.rope_theta),
        all_logits=all_logits,
        vp_stage=chunk if layout.vpp_size > 1 else None,
    )
    init.initialize(gpt, seed, model.init_std, model.num_layers, model.tie_embeddings)
    return gpt.to(device())


def gpt_from_checkpoint(path, layout: Layout, seed: int = 0) -> tuple[GPTModel, checkpoint.CheckpointMeta]:
    """A GPT shaped by a checkpoint's ``model.json``, built for the current TP/PP layout, with its weights loaded
    (torch_dist checkpoints reshard on load). Returns (model in eval mode, the checkpoint's meta)."""
    meta = checkpoint.read_meta(path)
    model = meta.model
    parallel = ParallelSection(tp=layout.tp_size, pp=layout.pp_size)
    gpt = build_gpt(transformer_config(model, parallel), model, parallel,
                    meta.vocab.padded_size, layout, seed)
    checkpoint.load_model(path, gpt)
    return gpt.eval(), meta
