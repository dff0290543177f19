"""The multimodal sequence layout: captions around image blocks, with loss masks (chats: :mod:`viq_mllm.data.chat`).

An image block (docs/concepts.md, visual positions) is ``<|image_start|>``, then for each row of visual positions the
positions followed by ``<|row_end|>``, then ``<|image_end|>``. A visual position covers ``G`` codes:

- ``G = 16`` (default): a 2x2 window of patches x 4 sub-codes; an ``h x w`` patch grid gives ``h/2`` rows of
  ``w/2`` positions, so ``(h/2)(w/2) + h/2 + 2`` positions in all (the continuous baseline's count);
- ``G = 4``: one patch (4 sub-codes) per position, rows of ``w``;
- ``G = 1``: one code per position (Emu3-style), rows of ``4w``.

A document is a list of positions. Each has an id (a text or special id; for a visual position the id of its
first code, kept for bookkeeping), a flag ``visual``, and for visual positions their ``G`` code ids. ``labels``
are next-position ids; ``loss_mask`` marks positions whose next id is supervised: pretraining supervises the
caption (and the end of document) after the image, SFT only the assistant's answers and end-of-turn; visual and
padding positions are never targets.

Example, G = 16, a 2 x 4 patch grid and caption "A pig." (ids abbreviated)::

    positions  <img_start> [v v] <row_end> <img_end> A   pig  .   <eod>
    visual      .           1 1   .         .        .   .    .   .
    loss_mask   .           . .   .         1        1   1    1   .      (predicts A, pig, ., <eod>)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from viq_mllm.vocab.ids import Vocab

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Document:
    tokens: torch.Tensor  # [L] int64
    visual: torch.Tensor  # [L] bool
    codes: torch.Tensor  # [n_visual, G] int64 vocabulary ids of the codes
    loss_mask: torch.Tensor  # [L] float: 1 where labels[i] (= tokens[i + 1]) is a target
    images: list[Optional[str]] = field(default_factory=list)  # each image block's source (the baseline's pixels)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([self.tokens[1:], self.tokens.new_zeros(1)])


def turn_role(turn: dict) -> Optional[str]:
    """``"user"``, ``"assistant"`` or ``"system"`` for a turn in LLaVA (``from``) or OpenAI (``role``) form."""
    return ROLES.get(turn.get("from", turn.get("role", "")))


def turn_text(turn: dict) -> str:
    return str(turn.get("value", turn.get("content", "")))


def window_for(group: int) -> int:
    if group not in (1, 4, 16):
        raise ValueError(f"model.visual.group={group}: choose 16 (2x2 patches), 4 (one patch) or 1 (one code)")
    return 2 if group == 16 else 1


def code_groups(codes: np.ndarray | torch.Tensor, group: int) -> torch.Tensor:
    """``(h, w, 4)`` codes -> ``[rows, positions_per_row, G]`` in window order (row-major windows, row-major
    patches inside a window, 4 sub-codes per patch)."""
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    h, w, _ = codes.shape
    k = window_for(group)
    windows = codes.view(h // k, k, w // k, k, 4).permute(0, 2, 1, 3, 4).reshape(h // k, w // k, 4 * k * k)
    return windows.reshape(h // k, -1, group)


def visual_position_count(h: int, w: int, group: int) -> int:
    """LLM positions of one image block (markers included)."""
    k = window_for(group)
    rows, per_row = h // k, (w // k) * (4 * k * k) // group
    return rows * per_row + rows + 2


class SequenceBuilder:
    """Appends text and image blocks (``group`` codes per visual position) position by position; ``build()``
    gives the :class:`Document`."""

    def __init__(self, vocab: Optional[Vocab], group: int = 16):
        self.vocab, self.group = vocab, group
        self.tokens: list[int] = []
        self.visual: list[bool] = []
        self.codes: list[torch.Tensor] = []  # [n, G] blocks of code ids, one per image
        self.target: list[bool] = []  # is this position a prediction target (of the previous position)?

    def text(self, ids: list[int], supervised: bool) -> None:
        self.tokens += ids
        self.visual += [False] * len(ids)
        self.target += [supervised] * len(ids)

    def image(self, codes: np.ndarray) -> None:
        grid = self.vocab.codes_to_ids(code_groups(codes, self.group))  # [rows, per_row, G]
        self.text([self.vocab.special("image_start")], False)
        row_end, per_row = self.vocab.special("row_end"), grid.shape[1]
        for first_ids in grid[:, :, 0].tolist():  # a visual position's id is its first code's
            self.tokens += [*first_ids, row_end]
            self.visual += [True] * per_row + [False]
            self.target += [False] * (per_row + 1)
        self.codes.append(grid.reshape(-1, grid.shape[-1]))
        self.text([self.vocab.special("image_end")], False)

    def projected_image(self, rows: int, cols: int, placeholder: int) -> None:
        """An image block whose every position (markers included) is filled by the projector's output
        (the release's layout: learned begin / row-end / end vectors, no special text tokens), as in the
        ViQ tokenizer stages. ``placeholder`` is the id kept at those positions (never a target)."""
        count = visual_position_count(rows, cols, 16)
        self.tokens += [placeholder] * count
        self.visual += [True] * count
        self.target += [False] * count

    def build(self) -> Document:
        tokens = torch.tensor(self.tokens, dtype=torch.long)
        target = torch.tensor(self.target + [False], dtype=torch.float32)
        codes = torch.cat(self.codes) if self.codes else torch.zeros(0, self.group, dtype=torch.long)
        return Document(tokens, torch.tensor(self.visual), codes, target[1:])


def caption_document(tokenizer, vocab: Vocab, images: Sequence[np.ndarray], caption: str, group: int) -> Document:
    """Pretraining: the images, then the caption and end-of-document, all caption tokens supervised (with no
    image: plain text pretraining)."""
    b = SequenceBuilder(vocab, group)
    for codes in images:
        b.image(codes)
    b.text(tokenizer.encode(caption) + [tokenizer.eod], True)
    return b.build()


def projected_caption_document(tokenizer, grid: tuple[int, int], caption: str, image: str) -> Document:
    """Pretraining for the ViQ stages: a projected image block (:meth:`SequenceBuilder.projected_image`), then
    the caption and end-of-document, all supervised."""
    b = SequenceBuilder(None)
    b.projected_image(*grid, placeholder=tokenizer.eod)
    b.text(tokenizer.encode(caption) + [tokenizer.eod], True)
    doc = b.build()
    doc.images = [image]
    return doc


def with_source(document: Document, source: Optional[str]) -> Document:
    """``document`` with its one image block's source recorded (none when ``source`` is None)."""
    document.images = [] if source is None else [source]
    return document


def placeholder_problem(turns: list[dict], images: int) -> Optional[str]:
    """Why a conversation cannot hold ``images`` images, or None. The ``<image>`` placeholders must be as many as
    the images; one image with no placeholder is also accepted (it opens the first user turn)."""
    found = sum(turn_text(t).count(IMAGE_PLACEHOLDER) for t in turns)
    if found == images or (found == 0 and images == 1):
        return None
    return f"{found} {IMAGE_PLACEHOLDER} placeholder(s) for {images} image(s)"
