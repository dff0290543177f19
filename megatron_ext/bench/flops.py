"""FLOP accounting of one training step, every factor named.

A GEMM of ``m x k`` by ``k x n`` costs ``2mkn`` FLOPs; training runs each GEMM three times (forward, weight
gradient, data gradient), hence the ``6`` per parameter per token and the ``3x`` on attention scores.

LLM (per step, ``T`` tokens in documents of lengths ``L_i``, logits at ``T_out`` of them):
    6 * N_layers * T                       N_layers: the weights multiplied per token in the layers
  + 6 * V_padded * h * T_out               the output layer: at every position (T_out = T), or at the supervised
                                           ones only (what training computes, megatron_ext.model.gpt.GPT)
  + 12 * layers * q_dim * sum(L_i^2)       QK^T and AV (2 * 2 * q_dim * L_i^2 forward), x3; full square, as megatron

Vision encoder inside the step (continuous baseline), per image of ``N`` patches:
    (2 * N_enc * N + 4 * layers_enc * width * N^2) x (3 if the encoder trains, 1 if frozen)

For a single document of length ``s`` the LLM part equals megatron-LM's ``num_floating_point_operations``
(tested against a transcription of it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPTShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    query_groups: int
    vocab: int  # padded
    kv_channels: int | None = None
    gated: bool = True

    @property
    def q_dim(self) -> int:
        return (self.kv_channels or self.hidden // self.heads) * self.heads

    @property
    def layer_params(self) -> int:
        kv_dim = self.q_dim * self.query_groups // self.heads
        attention = self.hidden * self.q_dim * 2 + self.hidden * kv_dim * 2  # Q, O, K, V
        mlp = self.hidden * self.ffn * (3 if self.gated else 2)
        return self.layers * (attention + mlp)


def llm_step_flops(shape: GPTShape, document_lengths: list[int], logit_positions: int | None = None) -> float:
    """``logit_positions``: where the output layer runs (None: every position)."""
    tokens = sum(document_lengths)
    logits = tokens if logit_positions is None else logit_positions
    attention = 12 * shape.layers * shape.q_dim * sum(length * length for length in document_lengths)
    return 6.0 * (shape.layer_params * tokens + shape.vocab * shape.hidden * logits) + attention


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    width: int
    params: int  # matmul parameters of the encoder (patch embedding, blocks, head, projector)


def encoder_step_flops(shape: EncoderShape, patches_per_image: list[int], trained: bool) -> float:
    forward = sum(2.0 * shape.params * n + 4.0 * shape.layers * shape.width * n * n for n in patches_per_image)
    return forward * (3 if trained else 1)


def predicted_speedup(discrete: float, continuous: float) -> float:
    """The paper's ratio, 1 - t_discrete / t_continuous, with FLOPs standing in for time."""
    return 1.0 - discrete / continuous
