"""Serving an exported VLM (``viq-mllm export hf``) with plain ``transformers``: no vision tower, no custom model.

An image and a prompt become the ids of training's prompt layout (:func:`viq_mllm.data.chat.prompt_document`: the
folder's chat template, as ``apply_chat_template`` renders it, with the image's block between its two markers),
every visual position written as its ``G`` code ids in order; :func:`inputs_embeds` turns them into the embeddings
of the stock causal LM (for ``G = 1`` simply its ``embed_tokens`` rows, so ``input_ids`` work as they are).

    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("vlm_hf")
    >>> ids = prompt_ids("vlm_hf", "cat.png", "What is in this picture?")
    >>> out = model.generate(inputs_embeds=inputs_embeds(model, ids, "vlm_hf"), max_new_tokens=32)
    >>> text_of("vlm_hf", out[0].tolist())
    'A cat on a mat.'

A visual position of ``G`` codes ``c_1 .. c_G`` is ``sum_g slot_g * C[c_g]`` (``C``: the code rows and ``slot``: the
learned per-slot vectors, both in ``viq_slots.safetensors``, outside the model's vocabulary); ids outside code runs
are looked up in the model's input embedding as usual.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from viq_mllm.data.chat import prompt_document
from viq_mllm.viq import ViQTokenizer
from viq_mllm.vocab import Vocab
from viq_mllm.vocab.text_tokenizers import HFTextTokenizer, SentencePieceTokenizer, TextTokenizer

CONFIG_FILE = "viq_mllm.json"
SLOTS_FILE = "viq_slots.safetensors"


@dataclass(frozen=True)
class ExportedLayout:
    """What an exported folder says about its ids: the vocabulary layout, the group, the slot vectors, its text
    tokenizer (the extended one written beside the weights)."""

    folder: Path
    vocab: Vocab
    group: int
    slots: Optional[torch.Tensor]  # [G, hidden] at G > 1
    code_rows: Optional[torch.Tensor]  # [codebook, hidden] at G > 1: the code embeddings, kept out of the model
    text: TextTokenizer

    @classmethod
    def load(cls, folder: str | Path) -> "ExportedLayout":
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; is this the output of `viq-mllm export hf`?")
        record = json.loads((folder / CONFIG_FILE).read_text())
        vocab = Vocab.load(folder)
        side = {}
        if record["group"] > 1:
            from safetensors.torch import load_file

            side = load_file(str(folder / SLOTS_FILE))
        sentencepiece = (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file()
        text = SentencePieceTokenizer(str(folder / "tokenizer.model")) if sentencepiece else HFTextTokenizer(str(folder))
        return cls(folder, vocab, record["group"], side.get("slots"), side.get("code_rows"), text)


@functools.lru_cache(maxsize=4)
def _layout(folder: str) -> ExportedLayout:
    return ExportedLayout.load(folder)


@functools.lru_cache(maxsize=4)
def _viq(folder: str):
    return ViQTokenizer.from_pretrained(folder)


def prompt_ids(folder: str | Path, image, text: str = "") -> list[int]:
    """The prompt of an image (a path, a PIL image, or None: text only) and ``text`` (empty: caption the image),
    as flat ids."""

    layout = _layout(str(Path(folder).resolve()))
    codes = None if image is None else _viq(str(layout.folder / "viq")).encode([image])[0].numpy()
    return flat_ids(prompt_document(layout.text, layout.vocab, codes, text, layout.group))


def flat_ids(document) -> list[int]:
    """A document's ids with each visual position written out as its ``G`` code ids (the exported models' input)."""
    codes = iter(document.codes.tolist())
    return [i for token, visual in zip(document.tokens.tolist(), document.visual.tolist())
            for i in (next(codes) if visual else [token])]


def inputs_embeds(model: torch.nn.Module, ids: list[int] | torch.Tensor, folder: str | Path | None = None
                  ) -> torch.Tensor:
    """``[1, positions, hidden]`` for ``model`` (an exported folder loaded with ``AutoModelForCausalLM``): each run
    of ``G`` code ids one position, every other id its own. ``folder`` defaults to where ``model`` was loaded from."""
    layout = _layout(str(Path(folder or model.config.name_or_path).resolve()))
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    embedding = model.get_input_embeddings()
    if layout.group == 1:
        return embedding(ids.to(embedding.weight.device))[None]
    is_code = layout.vocab.is_code(ids)
    position, slot = _positions(is_code.tolist(), layout.group)
    rows = embedding.weight.new_zeros(len(ids), embedding.weight.shape[1])
    rows[~is_code] = embedding(ids[~is_code].to(embedding.weight.device))
    codes = ids[is_code] - layout.vocab.code_offset
    code = slot >= 0
    rows[is_code] = layout.code_rows.to(rows)[codes] * layout.slots.to(rows)[slot[code]]
    out = rows.new_zeros(int(position[-1]) + 1, rows.shape[-1])
    return out.index_add_(0, position.to(rows.device), rows)[None]


def _positions(is_code: list[bool], group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per id: the position it contributes to, and its slot (-1 for a non-code id)."""
    position, slot, current, run = [], [], -1, 0
    for code in [*is_code, False]:
        if not code and run % group:
            raise ValueError(f"a run of {run} code ids is not a whole number of {group}-code positions")
        run = run + 1 if code else 0
        if not code or (run - 1) % group == 0:
            current += 1
        position.append(current)
        slot.append((run - 1) % group if code else -1)
    return torch.tensor(position[:-1]), torch.tensor(slot[:-1])


def text_of(folder: str | Path, ids: list[int]) -> str:
    """Generated ids -> text (the end-of-document and anything after it dropped)."""
    layout = _layout(str(Path(folder).resolve()))
    if layout.text.eod in ids:
        ids = ids[: ids.index(layout.text.eod)]
    return layout.text.decode([i for i in ids if i < layout.vocab.text_size])


def load_model(folder: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.no_grad()
def generate(folder: str | Path, image, prompt: str = "", max_new_tokens: int = 32,
             model: Optional[torch.nn.Module] = None) -> tuple[list[int], str]:
    """Greedy generation with the stock HF model of an exported folder (loaded unless given); returns (new ids,
    text)."""
    model = model if model is not None else load_model(folder)
    embeds = inputs_embeds(model, prompt_ids(folder, image, prompt), folder)
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0].tolist()
    eod = _layout(str(Path(folder).resolve())).text.eod
    ids = ids[: ids.index(eod)] if eod in ids else ids
    return ids, text_of(folder, ids)


def answerer(folder: str | Path, max_new_tokens: int = 4):
    """``(image or None, question) -> answer`` with the exported model (``viq_mllm.evaluation``)."""
    model = load_model(folder)
    return lambda image, question: generate(folder, image, question, max_new_tokens, model)[1]
