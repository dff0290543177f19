"""HF <-> megatron-core conversion for Llama and Qwen2 checkpoints, declared as a table of parameter mappings.

Three kinds of mapping, each converting both ways on full (unsharded) tensors:

- :class:`Plain`: one tensor renamed (optionally with vocabulary padding, added on import, stripped on export);
- :class:`FusedQKV`: HF ``q_proj`` / ``k_proj`` / ``v_proj`` <-> megatron ``linear_qkv``, grouped per query group
  ``[q heads of group g; k_g; v_g]`` (weights and Qwen2's biases);
- :class:`FusedGatedMLP`: HF ``gate_proj`` / ``up_proj`` <-> megatron ``linear_fc1 = [gate; up]``.

Strict both ways: an HF tensor no mapping claims, or a megatron parameter no mapping fills, is an error. The
megatron side is written with ``dist_checkpointing`` from one process (TP-agnostic: it loads at any TP/PP) with a
``model.json`` that records the shapes and the HF config, so export needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from megatron_ext.model.gpt import build_gpt, gpt_from_checkpoint, transformer_config
from megatron_ext.training import checkpoint
from megatron_ext.training.parallel import init_distributed, shutdown
from viq_mllm import artifact
from viq_mllm.recipe import ModelSection, ParallelSection, RecipeError, check_model_layout
from viq_mllm.vocab import padded_vocab_size
from viq_mllm.vocab.text_tokenizers import hf_tokenizer_fingerprint

SUPPORTED = {"LlamaForCausalLM", "Qwen2ForCausalLM"}


class ConversionError(ValueError):
    """Unmapped or missing tensors, or an unsupported architecture."""


@dataclass(frozen=True)
class Plain:
    hf: str
    mcore: str
    vocab: bool = False  # rows are vocabulary entries: pad on import, strip on export

    def to_mcore(self, hf: dict, ctx: "Shapes") -> dict:
        tensor = hf.pop(self.hf)
        if self.vocab:
            pad = ctx.padded_vocab - tensor.shape[0]
            tensor = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])])
        return {self.mcore: tensor}

    def to_hf(self, mc: dict, ctx: "Shapes") -> dict:
        tensor = mc.pop(self.mcore)
        return {self.hf: tensor[: ctx.vocab] if self.vocab else tensor}


@dataclass(frozen=True)
class FusedQKV:
    q: str
    k: str
    v: str
    mcore: str

    def to_mcore(self, hf: dict, ctx: "Shapes") -> dict:
        g, per, d = ctx.groups, ctx.heads // ctx.groups, ctx.head_dim
        q, k, v = hf.pop(self.q), hf.pop(self.k), hf.pop(self.v)
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
        return {self.mcore: fused.reshape(-1, *rest)}

    def to_hf(self, mc: dict, ctx: "Shapes") -> dict:
        g, per, d = ctx.groups, ctx.heads // ctx.groups, ctx.head_dim
        fused = mc.pop(self.mcore)
        rest = fused.shape[1:]
        q, k, v = fused.reshape(g, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
        return {self.q: q.reshape(-1, *rest), self.k: k.reshape(-1, *rest), self.v: v.reshape(-1, *rest)}


@dataclass(frozen=True)
class FusedGatedMLP:
    gate: str
    up: str
    mcore: str

    def to_mcore(self, hf: dict, ctx: "Shapes") -> dict:
        return {self.mcore: torch.cat([hf.pop(self.gate), hf.pop(self.up)])}

    def to_hf(self, mc: dict, ctx: "Shapes") -> dict:
        gate, up = mc.pop(self.mcore).chunk(2)
        return {self.gate: gate, self.up: up}


Mapping = Union[Plain, FusedQKV, FusedGatedMLP]


@dataclass(frozen=True)
class Shapes:
    layers: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    qkv_bias: bool
    tied: bool


def mappings(s: Shapes) -> list[Mapping]:
    """The whole table for one model."""
    table: list[Mapping] = [Plain("model.embed_tokens.weight", "embedding.word_embeddings.weight", vocab=True),
                            Plain("model.norm.weight", "decoder.final_layernorm.weight")]
    if not s.tied:
        table.append(Plain("lm_head.weight", "output_layer.weight", vocab=True))
    for i in range(s.layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        kinds = ["weight", "bias"] if s.qkv_bias else ["weight"]
        table += [FusedQKV(*(f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv"), f"{mc}self_attention.linear_qkv.{kind}")
                  for kind in kinds]
        table += [
            Plain(f"{hf}input_layernorm.weight", f"{mc}input_layernorm.weight"),
            Plain(f"{hf}self_attn.o_proj.weight", f"{mc}self_attention.linear_proj.weight"),
            Plain(f"{hf}post_attention_layernorm.weight", f"{mc}pre_mlp_layernorm.weight"),
            FusedGatedMLP(f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight", f"{mc}mlp.linear_fc1.weight"),
            Plain(f"{hf}mlp.down_proj.weight", f"{mc}mlp.linear_fc2.weight"),
        ]
    return table


def model_section(config: dict) -> ModelSection:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConversionError(f"architecture {arch} is not supported (supported: {sorted(SUPPORTED)})")
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        raise ConversionError("head_dim != hidden_size / num_attention_heads is not supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConversionError(f"RoPE scaling {rope} is not supported")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))  # transformers >= 5 nests it
    return ModelSection(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        seq_length=min(int(config.get("max_position_embeddings", 4096)), 32768),
        rope_theta=float(theta), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def hf_config(model: ModelSection, vocab: int) -> dict:
    """The HF config of a GPT trained here (the inverse of :func:`model_section`): Qwen2 when the query / key /
    value projections have biases, Llama otherwise; ``vocab``: the text rows (padding rows are not exported)."""
    qwen2 = model.qkv_bias
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": vocab, "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups, "max_position_embeddings": model.seq_length,
        "rms_norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings, "hidden_act": "silu",
        "rope_theta": model.rope_theta,  # transformers < 5; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta}, "torch_dtype": "float32",
    }


def shapes_of(model: ModelSection, vocab: int) -> Shapes:
    return Shapes(model.num_layers, model.num_attention_heads, model.query_groups,
                  model.hidden_size // model.num_attention_heads, vocab, padded_vocab_size(vocab), model.qkv_bias,
                  model.tie_embeddings)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def apply(table: list[Mapping], source: dict, ctx: Shapes, direction: str) -> dict:
    source = dict(source)
    out: dict = {}
    try:
        for m in table:
            out.update(getattr(m, direction)(source, ctx))
    except KeyError as err:
        raise ConversionError(f"missing tensor {err.args[0]}") from None
    if source:
        raise ConversionError(f"unmapped tensors: {sorted(source)[:10]}{' ...' if len(source) > 10 else ''}")
    return out


def check_parallel(model: ModelSection, tp: int, pp: int) -> None:
    try:
        check_model_layout(model, ParallelSection(tp=tp, pp=pp))
    except RecipeError as err:
        raise ConversionError(str(err)) from None


def hf_to_mcore(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1) -> dict:
    hf_dir, out = Path(hf_dir), Path(out)
    config = json.loads((hf_dir / "config.json").read_text())
    model = model_section(config)
    check_parallel(model, tp, pp)
    ctx = shapes_of(model, config["vocab_size"])
    weights = read_hf_weights(hf_dir)
    if model.tie_embeddings:
        weights.pop("lm_head.weight", None)  # a saved copy of the tied embedding
    state = apply(mappings(ctx), weights, ctx, "to_mcore")
    meta = checkpoint.CheckpointMeta(
        model=model, hf_config=config, converted_for={"tp": tp, "pp": pp},
        vocab=checkpoint.VocabRecord(text_size=ctx.vocab, padded_size=ctx.padded_vocab,
                                     text_fingerprint=hf_tokenizer_fingerprint(hf_dir)))
    layout = init_distributed(1, 1, 0)
    try:
        gpt = build_gpt(transformer_config(model), model, ParallelSection(),
                        ctx.padded_vocab, layout, 0)
        expected = {k for k in gpt.state_dict() if not k.endswith("_extra_state")}
        if expected != set(state):
            raise ConversionError(f"megatron parameters not filled: {sorted(expected - set(state))}")
        gpt.load_state_dict(state, strict=False)
        checkpoint.save_model(out, gpt, meta)
    finally:
        shutdown()
    return meta


def mcore_to_hf(ckpt: str | Path, out: str | Path) -> dict:
    ckpt, out = Path(ckpt), Path(out)
    meta = checkpoint.read_meta(ckpt)
    if meta.model.visual is not None:
        raise ConversionError(f"{ckpt}: a VLM checkpoint; its vocabulary holds ViQ codes, which no HF text model has")
    model = meta.model
    ctx = shapes_of(model, meta.vocab.text_size)
    config = meta.hf_config or hf_config(model, ctx.vocab)  # trained here, or converted from HF
    try:
        gpt, _ = gpt_from_checkpoint(ckpt, init_distributed(1, 1, 0))
        state = {k: v.detach().clone() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    finally:
        shutdown()
    hf = apply(mappings(ctx), state, ctx, "to_hf")
    from safetensors.torch import save_file

    stage = artifact.Staging.begin(out, artifact.Spec("hf-model", 1, {"checkpoint": str(ckpt.resolve())}))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(stage.path / "model.safetensors"))
    stage.write_json("config.json", config)
    stage.seal()
    return meta
