"""``viq-mllm export hf``: a trained discrete VLM -> a Hugging Face causal-LM folder, served with no vision tower.

ViQ codes are vocabulary, so the VLM is a Llama / Qwen2 causal LM with a larger embedding table. The folder holds:

- ``config.json`` + ``model.safetensors``: the GPT (``convert/hf.py``'s table), every extended row kept (text,
  image markers, codes), the vocabulary padding stripped;
- the extended tokenizer (the vocabulary folder's ``save_pretrained`` output) with the chat template training laid
  chats out with (the base model's own, or ``User: ...<eod>Assistant: ...<eod>``), and ``vocab.json`` (the id
  layout);
- ``generation_config.json``: the text end-of-document (and the base model's end ids) as ``eos_token_id``, and every
  image-marker (and, at ``G = 1``, code) id in ``suppress_tokens``, so ``generate`` writes text only, as
  ``viq-mllm generate`` does; ``max_position_embeddings`` and ``bos_token_id`` are the base HF model's when the run
  started from one (``init.hf`` / a converted checkpoint), not the training sequence length;
- ``viq/``: the ViQ tokenizer the codes come from, and ``viq_mllm.json``: how an image becomes ids.

How a visual position is embedded decides what a stock model can run:

- ``group: 1`` with ``embedding: table``: a position is one code's row times the learned slot vector; the slot is
  folded into the code rows of ``embed_tokens`` (the output layer, if tied, is written untied with the unscaled rows),
  so the folder is a stock ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` fed ``input_ids``;
- ``group: 4 | 16``: a position sums 4 or 16 code rows, each scaled by its slot vector; the code rows and the slots go
  to ``viq_slots.safetensors``, out of the model's vocabulary (which ends before the first code, so code ids given
  as ``input_ids`` fail as out of range instead of running wrong), and :func:`viq_mllm.hf.inputs_embeds` computes
  the ``inputs_embeds`` to pass to the stock model;
- ``embedding: embedder`` (and the continuous baseline) run the ViQ tokenizer's own modules per position: not a
  causal-LM folder, refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_ext.convert.hf import ConversionError, apply, hf_config, mappings, shapes_of
from megatron_ext.training import checkpoint
from megatron_ext.training.parallel import shutdown
from megatron_ext.vlm.inference import load_for_inference
from viq_mllm import artifact
from viq_mllm.hf import CONFIG_FILE, SLOTS_FILE
from viq_mllm.vocab import Vocab

#: files of a vocabulary folder that are not the tokenizer (its record of where the base tokenizer lives)
_NOT_TOKENIZER = {"text_tokenizer.json", artifact.MANIFEST}
KIND = "hf-export"


def export_hf(ckpt: str | Path, out: str | Path) -> dict:
    """Write the VLM checkpoint ``ckpt`` as an HF folder ``out`` (see the module); returns ``viq_mllm.json``."""

    ckpt, out = Path(ckpt), Path(out)
    meta = checkpoint.read_meta(ckpt)
    visual = meta.model.visual
    if visual is None:
        raise ConversionError(f"{ckpt}: a text checkpoint; use `viq-mllm convert mcore-to-hf`")
    if visual.embedding != "table":
        raise ConversionError(f"{ckpt}: model.visual.embedding={visual.embedding} embeds visual positions with the "
                              "ViQ tokenizer's modules, which a causal-LM folder cannot hold; only `table` exports")
    vocab = Vocab.load(meta.vocab.vocab_dir)
    try:
        vlm, tokenizer, _ = load_for_inference(ckpt)
        state = {k: v.detach().cpu().clone() for k, v in vlm.gpt.state_dict().items() if not k.endswith("_extra_state")}
        slots = vlm.visual.slot.detach().cpu().clone()
    finally:
        shutdown()
    shapes = shapes_of(meta.model, vocab.size)
    weights = apply(mappings(shapes), state, shapes, "to_hf")
    tied = meta.model.tie_embeddings
    side = {}
    if visual.group == 1:
        tied = _fold_slot(weights, slots[0], vocab, tied)
    else:
        side = {"slots": slots.contiguous(), "code_rows": _split_code_rows(weights, vocab)}
    rows = weights["model.embed_tokens.weight"].shape[0]
    from safetensors.torch import save_file

    made_from = {"checkpoint": str(ckpt.resolve()), "vocab_fingerprint": vocab.fingerprint,
                 "viq_fingerprint": vocab.viq_fingerprint}
    stage = artifact.Staging.begin(out, artifact.Spec(KIND, 1, made_from))
    out = stage.path
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    if side:
        save_file(side, str(out / SLOTS_FILE))
    eod = tokenizer.text.eod
    config = {**hf_config(meta.model, rows), **_from_base(meta.hf_config), "tie_word_embeddings": tied,
              "eos_token_id": eod, "torch_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch.")}
    _write_json(out / "config.json", config)
    base_eos = (meta.hf_config or {}).get("eos_token_id")
    eos = sorted({eod, *(base_eos if isinstance(base_eos, list) else [base_eos] if base_eos is not None else [])})
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.get("bos_token_id"), "eos_token_id": eos if len(eos) > 1 else eod,
        "pad_token_id": eod, "do_sample": False, "suppress_tokens": list(range(vocab.text_size, rows))})
    _copy_tokenizer(Path(meta.vocab.vocab_dir), out, tokenizer.text.chat_template)
    shutil.copytree(meta.vocab.viq_dir, out / "viq", dirs_exist_ok=True, ignore=shutil.ignore_patterns(artifact.MANIFEST))
    record = {"group": visual.group, "vocab_fingerprint": vocab.fingerprint, "viq_fingerprint": vocab.viq_fingerprint,
              "text_tokenizer_fingerprint": vocab.text_fingerprint, "checkpoint": str(ckpt.resolve())}
    _write_json(out / CONFIG_FILE, record)
    stage.seal(record)
    return record


#: what an export takes from the HF model its run started from: the context it serves and its special ids (the
#: network's shape and rotary base come from the checkpoint itself)
BASE_FIELDS = ("max_position_embeddings", "bos_token_id")


def _from_base(base: Optional[dict]) -> dict:
    return {k: base[k] for k in BASE_FIELDS if base and base.get(k) is not None}


def _split_code_rows(weights: dict, vocab: Vocab) -> torch.Tensor:
    """Take the code rows out of the input embedding (and out of the output layer, which never predicts a code):
    the folder's vocabulary then ends before the first code, so a code id fed as ``input_ids`` (what a stock
    server or llama.cpp's converter does) fails as out of range instead of embedding one code where a position
    sums ``G``; :func:`viq_mllm.hf.inputs_embeds` reads the rows from the side file. Returns the code rows."""
    table = weights["model.embed_tokens.weight"]
    codes = table[vocab.code_offset:vocab.code_offset + vocab.codebook_size].clone()
    weights["model.embed_tokens.weight"] = table[:vocab.code_offset].clone()
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = weights["lm_head.weight"][:vocab.code_offset].clone()
    return codes.contiguous()


def _fold_slot(weights: dict, slot: torch.Tensor, vocab: Vocab, tied: bool) -> bool:
    """Scale the code rows of the input embedding by the (one) slot vector; returns whether the output layer is
    still tied (not when it was: its code rows must stay unscaled)."""
    table = weights["model.embed_tokens.weight"]
    if tied:
        weights["lm_head.weight"] = table.clone()
    rows = slice(vocab.code_offset, vocab.code_offset + vocab.codebook_size)
    table[rows] = table[rows] * slot.to(table.dtype)
    return False


def _copy_tokenizer(vocab_dir: Path, out: Path, chat_template: str) -> None:
    """The extended tokenizer, with the chat template training laid chats out with (:mod:`viq_mllm.data.chat`) as
    its one ``chat_template``: ``chat_template.jinja``, none left in ``tokenizer_config.json`` to shadow it."""
    for path in sorted(vocab_dir.iterdir()):
        if path.is_file() and path.name not in _NOT_TOKENIZER:
            shutil.copy2(path, out / path.name)
    (out / "chat_template.jinja").write_text(chat_template)
    config = out / "tokenizer_config.json"
    if config.is_file():
        fields = json.loads(config.read_text())
        if fields.pop("chat_template", None) is not None:
            _write_json(config, fields)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))
