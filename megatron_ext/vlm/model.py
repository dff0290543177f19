"""The discrete VLM: a megatron-core GPT whose visual positions are embedded from ViQ codes.

``VisionLanguageModel`` wraps a ``GPTModel``. On the first pipeline stage it builds ``decoder_input`` itself:
text and special ids go through the (vocab-parallel) word embedding; each visual position's ``G`` code ids go
through :class:`VisualEmbedding` and are scattered into their positions. Later stages receive hidden states
from the pipeline as usual. Packed rows arrive as one ``thd`` sequence with ``cu_seqlens``
(``PackedSeqParams``): attention never crosses documents.

Checkpoint keys of the GPT part are those of a plain ``GPTModel`` (so ``resize-vocab`` outputs and text LM
checkpoints load into ``model.gpt``); the visual module's keys start with ``visual.``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import nn

from megatron_ext.training.loop import masked_loss
from megatron_ext.training.parallel import device
from viq_mllm.recipe import VisualSection
from viq_mllm.viq import PoolingProjector, ViQTokenizer
from viq_mllm.vocab import Vocab


class VisualEmbedding(nn.Module):
    """``[n, G]`` code ids (vocabulary ids) -> ``[n, hidden]``.

    ``table``: ``sum_g slot[g] * E[id_g]`` with ``E`` the model's own (extended) word embedding and one learned
    per-slot vector (init 1), so the order of the codes in a position matters.
    ``embedder``: ids -> codes -> ViQ code embedder -> 2x2 pooling projector (G = 16: 4 patches x 4 codes).
    """

    def __init__(self, section: VisualSection, vocab: Vocab, hidden: int, word_embeddings: nn.Module):
        super().__init__()
        self.mode, self.group, self.code_offset = section.embedding, section.group, vocab.code_offset
        self._word_embeddings = [word_embeddings]  # not a submodule: owned (and checkpointed) by the GPT
        if self.mode == "table":
            self.slot = nn.Parameter(torch.ones(section.group, hidden))
        else:
            tokenizer = ViQTokenizer.from_pretrained(section.viq)
            self.embedder = tokenizer.head.embedder
            self.embedder.requires_grad_(section.train_embedder)
            self.projector = PoolingProjector(tokenizer.config.width, hidden, with_markers=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "table":
            rows = self._word_embeddings[0](ids)  # [n, G, hidden]
            return (rows * self.slot).sum(dim=1)
        n = ids.shape[0]
        patches = self.embedder(ids.reshape(-1) - self.code_offset)  # [4n, C]
        return self.projector.pool_windows(patches.view(n, 4, -1))


class ContinuousVisualEmbedding(nn.Module):
    """Pixels -> a vision encoder inside the step -> 2x2 pooling projector: the continuous baseline, and the
    visual path of the ViQ tokenizer stages.

    ``encoder(pixels, grids) -> (features [T, C], cu_seqlens)``: the ViQ tokenizer's ViT (the baseline) or a
    :class:`viq_mllm.viq_training.objectives.StageModel`. ``trained=False`` runs it forward-only (frozen); ``True``
    trains it (the parameters it marks trainable). ``markers=False``: one vector per 2x2 window, in the window
    order of the discrete layout (markers are special text tokens); ``True``: the projector also writes the
    learned begin / row-end / end vectors, filling a ``SequenceBuilder.projected_image`` block.
    """

    def __init__(self, encoder: nn.Module, width: int, hidden: int, trained: bool, markers: bool = False):
        super().__init__()

        self.encoder, self.trained, self.markers = encoder, trained, markers
        if not trained:
            self.encoder.requires_grad_(False)
        self.projector = PoolingProjector(width, hidden, with_markers=markers)

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
        with torch.set_grad_enabled(self.trained and torch.is_grad_enabled()):
            tokens, _ = self.encoder(pixels, grids)
        per_image = tokens.split([h * w for h, w in grids])
        if self.markers:
            return torch.cat([self.projector(t.view(h, w, -1)) for t, (h, w) in zip(per_image, grids)])
        windows = [t.view(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(-1, 4, t.shape[-1])
                   for t, (h, w) in zip(per_image, grids)]
        return self.projector.pool_windows(torch.cat(windows))


class VisionLanguageModel(MegatronModule):
    def __init__(self, gpt: MegatronModule, visual: Optional[VisualEmbedding]):
        super().__init__(config=gpt.config)
        # Named ``module`` so megatron's ``get_attr_wrapped_model`` (schedules, grad finalisation) unwraps to
        # the GPT as it does through DDP: pre_process, decoder, shared embedding weights are found there.
        self.module = gpt
        self.visual = visual
        self.model_type = gpt.model_type

    @property
    def gpt(self) -> MegatronModule:
        return self.module

    def set_input_tensor(self, input_tensor) -> None:
        self.gpt.set_input_tensor(input_tensor)

    def embed(self, batch: dict) -> torch.Tensor:
        """``tokens [1, S]`` -> ``decoder_input [S, 1, hidden]``; visual positions from their codes, or from
        ``pixels`` / ``grids`` through the continuous baseline's encoder (a batch of text-only documents has
        neither)."""
        tokens, visual = batch["tokens"], batch["visual"]
        hidden = self.gpt.embedding.word_embeddings(tokens)
        if batch.get("pixels"):
            vectors = self.visual(batch["pixels"], batch["grids"])
        elif batch["codes"].numel():
            vectors = self.visual(batch["codes"])
        else:
            vectors = None
        if vectors is not None:
            hidden = hidden.masked_scatter(visual.unsqueeze(-1).expand_as(hidden), vectors.to(hidden.dtype))
        hidden = F.dropout(hidden, p=self.config.hidden_dropout, training=self.training)
        return hidden.transpose(0, 1).contiguous()

    def forward(self, batch: dict, packed_seq_params: Optional[PackedSeqParams] = None, labels: bool = True):
        batch = {k: _to_device(v) for k, v in batch.items()}
        decoder_input = None
        if self.gpt.pre_process:
            decoder_input = self.embed(batch)
        return self.gpt(batch["tokens"], batch["position_ids"], None, decoder_input=decoder_input,
                        labels=batch["labels"] if labels else None, packed_seq_params=packed_seq_params,
                        loss_mask=batch["loss_mask"] if labels else None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """GPT tensors under their plain GPTModel storage keys; structure keys match ``state_dict()``."""
        gpt = self.gpt.sharded_state_dict(prefix, sharded_offsets, metadata)
        state = {f"module.{k}": v for k, v in gpt.items()}
        if self.visual is not None:  # replicated over TP ranks: the TP group must be named (megatron's default
            # leaves it out once the metadata names the data-parallel group, and every TP rank then claims the
            # main replica, which dist_checkpointing refuses)
            state.update(sharded_state_dict_default(self.visual, f"{prefix}visual.", sharded_offsets, metadata,
                                                    tp_group=parallel_state.get_tensor_model_parallel_group()))
        return state


def continuous_batch(batch: dict, vocab: Vocab, pixels: list[torch.Tensor], grids: list[tuple[int, int]]) -> dict:
    """The continuous baseline's view of a packed discrete batch: the same positions, masks and packing; code
    ids replaced by a special id (the baseline's vocabulary has no codes) and the images' pixels attached, so
    :class:`ContinuousVisualEmbedding` fills exactly the visual positions the codes would have."""
    placeholder = torch.tensor(vocab.special("image_start"))
    out = {**batch, "pixels": pixels, "grids": grids}
    for key in ("tokens", "labels"):
        out[key] = torch.where(vocab.is_code(batch[key]), placeholder, batch[key])
    return out


def packed_params(batch: dict) -> PackedSeqParams:
    cu = batch["cu_seqlens"].to(device())
    top = int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=top, max_seqlen_kv=top)


def _to_device(value):
    if isinstance(value, torch.Tensor):
        return value.to(device())
    if isinstance(value, list):
        return [_to_device(v) for v in value]
    return value


def vlm_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = {k: _to_device(v) for k, v in next(data_iterator).items()}
    output = model(batch, packed_params(batch))
    return output, partial(masked_loss, batch["loss_mask"], batch["real_tokens"])


def viq_fingerprint(viq_dir: str | Path) -> str:
    config = Path(viq_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model.visual.viq={viq_dir}: no config.json (a ViQ tokenizer folder)")
    return json.loads(config.read_text())["fingerprint"]
