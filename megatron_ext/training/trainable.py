"""Which parameters train, and at what rate: the recipe's ``train.trainable`` and ``train.visual_lr_mult``.

- ``all``: every parameter.
- ``visual``: only what the vocabulary extension and the visual path added: the visual module's own parameters
  (slot vectors, code embedder, projector; the continuous baseline's encoder and projector) and the rows of the
  input embedding and of the output layer from ``text_size`` on (image markers, codes, padding). Every other
  parameter is frozen before DDP is built, so it has no gradient buffer and no optimizer state. The tables train
  as whole parameters, so their text rows are kept still by zeroing their gradient after the data-parallel
  reduction and before the norm and the update (:func:`mask_text_rows`), and the tables take no weight decay
  (decoupled decay would shrink the text rows). Gradient clipping then sees the trainable gradients only.

``visual_lr_mult`` multiplies the learning rate of the visual module's own parameters (through megatron's
``config_overrides``, so the schedule scales with it). A table is one parameter with one rate: its new rows train
at the base rate.

Which rows a rank holds: the vocabulary is split over tensor-parallel ranks in contiguous blocks. Example:
SmolLM2's 49,152 text rows, padded to 65,536, at TP=2: rank 0 holds rows 0-32,767 (all text: its whole table
gradient is zeroed), rank 1 rows 32,768-65,535 (its first 16,384 zeroed, the rest train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, ParamKey, get_standard_config_overrides

#: name patterns (as megatron's optimizer sees them, through DDP) of the visual module and of the vocabulary tables
VISUAL = "*visual.*"
TABLES = ("*word_embeddings.weight", "*output_layer.weight")


@dataclass(frozen=True)
class TextRows:
    """A vocabulary table of this rank and how many of its first rows hold text ids (kept still)."""

    param: torch.nn.Parameter
    rows: int


def freeze(model: torch.nn.Module, trainable: str, text_size: int) -> list[TextRows]:
    """Apply ``trainable`` to ``model`` (before DDP); returns the tables whose text rows must be kept still."""
    if trainable == "all":
        return []
    tables = []
    for name, param in model.named_parameters():
        table = any(name.endswith(pattern[1:]) for pattern in TABLES)
        param.requires_grad_(table or name.startswith("visual."))
        if table:
            start = parallel_state.get_tensor_model_parallel_rank() * param.shape[0]
            tables.append(TextRows(param, max(0, min(param.shape[0], text_size - start))))
    return tables


def mask_text_rows(tables: list[TextRows]) -> None:
    """Zero the gradient of the text rows (DDP's ``main_grad``, after its reduction)."""
    for table in tables:
        if table.rows:
            table.param.main_grad[: table.rows].zero_()


def config_overrides(config: OptimizerConfig, trainable: str, visual_lr_mult: float) -> dict:
    """megatron's standard overrides (no decay for biases and norms), plus: no decay for the tables in ``visual``
    mode, and the visual module's learning rate scaled by ``visual_lr_mult``."""
    overrides = get_standard_config_overrides(config)
    if trainable == "visual":
        overrides[ParamKey(name=TABLES)] = {"wd_mult": 0.0}
    if visual_lr_mult != 1.0:
        overrides[ParamKey(name=VISUAL)] = {"max_lr": config.lr * visual_lr_mult,
                                            "min_lr": config.min_lr * visual_lr_mult}
    return overrides
