"""Strict import of foreign checkpoints into :class:`ViQTokenizer`: the authors' release and SigLIP2 towers.

Each format is data: a table of prefix renames (theirs -> ours), the prefixes of ours it must fill, and the
prefixes of theirs it knowingly ignores. Every tensor of the source must land on a parameter of the same shape
(after the declared transforms), and every parameter in scope must be filled; otherwise
:class:`WeightImportError` lists the missing, unexpected and mis-shaped keys. Nothing is loaded on error.

Formats (the release's own key names; ``viq-mllm import-viq`` imports a release folder):

- ``siglip2_open_clip``: ``visual.trunk.*`` (timm names) -> ``vit.*``; text tower ignored.
- ``siglip2_timm``: timm names at the top level -> ``vit.*``.
- ``viq_encoder`` (``model_viq_fsq.pth``): timm trunk at the top level, head under ``fusion_block.*``.
- ``viq_embedder`` (``embedder.pth``): ``projector_1/2/3``, ``_weight``, ``_bias``; ``ori_codebook`` is checked
  against our FSQ table (a wrong preset fails here).
- ``viq_index_drawer`` (``index_drawer.pth``): the embedder part as above; the Qwen-Image VAE adapter is
  reported as ignored (our pixel decoder replaces it).

The learned position table is resized bicubically when the source has a different grid (SigLIP2's 24 x 24 ->
our 128 x 128), as the release does at load time. Sub-module names that the reference does not spell out
(``fc1``/``fc2`` inside MLPs, ``norm1/attn/norm2/mlp`` inside blocks, ``decrease_dim``/``increase_dim`` in the
RoPE attention, the head's affine ``vq_low_affine_weight``/``_bias``) follow timm's and the release's
conventions; the tests use synthetic state dicts with exactly these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

from viq_mllm.viq.tokenizer import ViQTokenizer

StateDict = dict[str, torch.Tensor]


class WeightImportError(ValueError):
    """The source does not map onto the model; the message lists every problem."""


@dataclass(frozen=True)
class Format:
    renames: tuple[tuple[str, str], ...]  # (their prefix, our prefix); longest match wins
    fills: tuple[str, ...]  # our prefixes that must all be loaded
    ignores: tuple[str, ...] = ()  # their prefixes dropped on purpose
    check_codebook: str | None = None  # their key holding the FSQ table, compared to ours


_HEAD = (
    ("fusion_block.vq_low_preprocess_layers.", "head.pre_blocks."),
    ("fusion_block.vq_low_pre_token_shuffle_head.", "head.expand."),
    ("fusion_block.vq_low_post_token_shuffle_head.", "head.subtoken_mlp."),
    ("fusion_block.vq_low.fsq_pre_attn.", "head.rope_blocks."),
    ("fusion_block.vq_low.project_in.", "head.project_in."),
    ("fusion_block.vq_low.project_out.", "head.embedder.project_out."),
    ("fusion_block.vq_low_inverse_token_shuffle_head.", "head.embedder.post.merge."),
    ("fusion_block.vq_low_postprocess_layers.", "head.embedder.post.layers."),
    ("fusion_block.vq_low_affine_weight", "head.embedder.post.affine_weight"),
    ("fusion_block.vq_low_affine_bias", "head.embedder.post.affine_bias"),
)
_EMBEDDER = (
    ("projector_1.", "head.embedder.project_out."),
    ("projector_2.", "head.embedder.post.merge."),
    ("projector_3.", "head.embedder.post.layers."),
    ("_weight", "head.embedder.post.affine_weight"),
    ("_bias", "head.embedder.post.affine_bias"),
)
_TIMM_TRUNK = ("patch_embed.", "pos_embed", "blocks.", "norm.", "attn_pool.")

FORMATS: dict[str, Format] = {
    "siglip2_open_clip": Format(
        renames=tuple((f"visual.trunk.{p}", f"vit.{p}") for p in _TIMM_TRUNK),
        fills=("vit.",),
        ignores=("text.", "logit_scale", "logit_bias", "visual.head."),
    ),
    "siglip2_timm": Format(renames=tuple((p, f"vit.{p}") for p in _TIMM_TRUNK), fills=("vit.",), ignores=("head.",)),
    "viq_encoder": Format(
        renames=tuple((p, f"vit.{p}") for p in _TIMM_TRUNK) + _HEAD,
        fills=("vit.", "head."),
        ignores=("teacher.", "lpips.", "vae."),
    ),
    "viq_embedder": Format(renames=_EMBEDDER, fills=("head.embedder.",), check_codebook="ori_codebook.weight"),
    "viq_index_drawer": Format(
        renames=_EMBEDDER,
        fills=("head.embedder.",),
        ignores=("vae_preprocess_layers.", "vae_head.", "vae.", "head."),
        check_codebook="ori_codebook.weight",
    ),
}


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors, ignored {len(self.ignored)}, resized {self.resized or 'none'}"]
        for name in ("missing", "unexpected", "mismatched"):
            items = getattr(self, name)
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"{name}: {shown}")
        return "\n".join(lines)


def read_checkpoint(source: Union[str, Path, StateDict]) -> StateDict:
    """A state dict from a dict, a safetensors file or a torch file (``weights_only=True``)."""
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if set(state) == {wrapper}:
            state = state[wrapper]
    return state


def _rename(key: str, fmt: Format) -> str | None:
    best = max((r for r in fmt.renames if key.startswith(r[0])), key=lambda r: len(r[0]), default=None)
    return None if best is None else best[1] + key[len(best[0]) :]


def _resize_positions(tensor: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """[1, g*g, C] -> [1, G*G, C], bicubic, as the release resizes SigLIP2's 24 x 24 table."""
    g, big = int(round(tensor.shape[1] ** 0.5)), int(round(target[1] ** 0.5))
    grid = tensor.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(big, big), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(target).to(tensor.dtype)


def import_weights(model: torch.nn.Module, source: Union[str, Path, StateDict], fmt: str) -> ImportReport:
    """Map ``source`` onto ``model`` with the named format; raises :class:`WeightImportError` unless exact."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec, state = FORMATS[fmt], read_checkpoint(source)
    ours = model.state_dict()
    report, updates, seen = ImportReport(), {}, set()
    for key, tensor in state.items():
        if spec.check_codebook == key:
            _check_codebook(model, tensor)
            report.ignored.append(key)
            continue
        target = _rename(key, spec)
        if target is None:
            (report.ignored if key.startswith(spec.ignores) else report.unexpected).append(key)
            continue
        if target not in ours:
            report.unexpected.append(f"{key} (-> {target})")
            continue
        seen.add(target)
        if tensor.shape != ours[target].shape:
            if target.endswith("pos_embed") and tensor.dim() == 3 and tensor.shape[2] == ours[target].shape[2]:
                tensor = _resize_positions(tensor, ours[target].shape)
                report.resized.append(target)
            else:
                report.mismatched.append(f"{key}: {tuple(tensor.shape)} vs ours {tuple(ours[target].shape)}")
                continue
        updates[target] = tensor
        report.loaded.append(target)
    report.missing = [k for k in ours if k.startswith(spec.fills) and k not in seen]
    if not report.ok:
        raise WeightImportError(f"cannot import {fmt} weights:\n{report}")
    model.load_state_dict(updates, strict=False)
    return report


def _check_codebook(model: torch.nn.Module, table: torch.Tensor) -> None:
    fsq = model.head.embedder.fsq
    ours = fsq.indices_to_codes(torch.arange(fsq.codebook_size))
    if table.shape != ours.shape or not torch.allclose(table.float(), ours, atol=1e-6):
        raise WeightImportError(
            f"the checkpoint's code table {tuple(table.shape)} is not our FSQ table {tuple(ours.shape)} "
            f"(levels {fsq.levels_list}): wrong preset?"
        )


#: the authors' release: file name -> its format (the encoder file is required, the embedder optional)
RELEASE_FILES = {"model_viq_fsq.pth": "viq_encoder", "embedder.pth": "viq_embedder"}


def import_release(release: Union[str, Path], config: str = "giant", preset: str = "16k"):
    """A :class:`ViQTokenizer` with the authors' released encoder (``model_viq_fsq.pth``) and, where present,
    its code embedder (``embedder.pth``); returns ``(tokenizer, {file: report})``. The release has no pixel
    decoder of ours: the tokenizer's decoder keeps its initialisation (train it with the decoder stage)."""
    folder = Path(release)
    if not (folder / "model_viq_fsq.pth").is_file():
        raise FileNotFoundError(f"{folder}: no model_viq_fsq.pth; pass the folder of the authors' released weights")
    tokenizer = ViQTokenizer.from_config(config, preset=preset)
    reports = {}
    for name, fmt in RELEASE_FILES.items():
        if (folder / name).is_file():
            reports[name] = import_weights(tokenizer, folder / name, fmt)
    return tokenizer.eval(), reports
