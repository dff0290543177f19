"""Packing documents into fixed-length rows, and rows into one ``thd`` micro-batch.

Rows are filled first-fit-decreasing (longest document first into the first row with room; ties by document
index), so the layout is deterministic and the padding small. A document never spans two rows: a longer one is
an error unless truncation is allowed. Attention isolation comes from ``cu_seqlens`` (one segment per document,
plus one for the row's padding); position ids restart in every segment.

Example, seq_length 8, documents of 5, 4 and 3 positions -> rows ``[5, 3]`` and ``[4, pad 4]``;
``collate`` of both rows gives one sequence of 16 with ``cu_seqlens = [0, 5, 8, 12, 16]``.

``align`` (recipe ``data.pack_align``) pads each document to a multiple of it, inside its own segment: the padding
follows the document, so causal attention never lets a real position see it, and it is never a target. FP8 GEMMs
on Transformer Engine want segments of multiples of 16, sequence parallelism multiples of TP. With ``align = 4``
the documents of 5, 4 and 3 positions take 8, 4 and 4: rows ``[5+3]`` and ``[4, 3+1]``, ``cu_seqlens = [0, 8, 12,
16]``; the losses of every document are those of the unaligned packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from viq_mllm.data.layout import Document


def aligned(length: int, align: int) -> int:
    """``length`` rounded up to a multiple of ``align``."""
    return -(-length // align) * align


@dataclass
class Row:
    documents: list[Document]
    seq_length: int
    align: int = 1  # each document's segment is padded to a multiple of it

    @property
    def used(self) -> int:
        """Positions the documents' segments take, their alignment padding included."""
        return sum(aligned(len(d), self.align) for d in self.documents)

    @property
    def real(self) -> int:
        """Positions holding documents."""
        return sum(len(d) for d in self.documents)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin; items sorted by length (desc), then index, each into the first bin with
    room. The first bin with room is found in a max-tree of the bins' free room: O(n log n), so a million documents
    pack in seconds (scanning the bins is O(n^2) when most documents fill a row alone)."""
    leaves = 1 << max(len(lengths) - 1, 1).bit_length()
    room = [-1] * (2 * leaves)  # room[leaves + b]: free room of bin b (-1: not opened); inner nodes: max below
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        need = lengths[i]
        if room[1] >= need:
            node = 1
            while node < leaves:  # descend to the leftmost bin with room
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            bins[node - leaves].append(i)
            free = room[node] - need
        else:
            node = leaves + len(bins)
            bins.append([i])
            free = capacity - need
        room[node] = free
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


def truncate(document: Document, length: int) -> Document:
    """The first ``length`` positions. A cut inside the images keeps the codes before it and no source images
    (the continuous baseline cannot encode part of an image)."""
    visual_kept = int(document.visual[:length].sum())
    mask = document.loss_mask[:length].clone()
    mask[-1] = 0.0  # its label would be the first dropped token
    images = document.images if visual_kept == len(document.codes) else []
    return Document(document.tokens[:length], document.visual[:length], document.codes[:visual_kept], mask, images)


def fit(document: Document, seq_length: int, allow_truncation: bool, name: str) -> Document:
    """``document`` if it fits a row, truncated if allowed, else an error naming it."""
    if len(document) <= seq_length:
        return document
    if not allow_truncation:
        raise ValueError(
            f"{name} has {len(document)} positions, more than model.seq_length={seq_length}; raise the "
            "sequence length, lower the image resolution, or set data.truncate=true"
        )
    return truncate(document, seq_length)


def row_documents(lengths: list[int], seq_length: int, one_per_row: bool = False, align: int = 1) -> list[list[int]]:
    """Which documents (by index, ascending) share each row, each taking its length rounded up to ``align``."""
    if one_per_row:
        return [[i] for i in range(len(lengths))]
    return [sorted(b) for b in first_fit_decreasing([aligned(n, align) for n in lengths], seq_length)]


def pack(documents: list[Document], seq_length: int, allow_truncation: bool = False, one_per_row: bool = False,
         align: int = 1) -> list[Row]:
    if seq_length % align:
        raise ValueError(f"seq_length={seq_length} is not a multiple of the packing alignment {align}")
    fitted = [fit(doc, seq_length, allow_truncation, f"document {i}") for i, doc in enumerate(documents)]
    return [Row([fitted[i] for i in b], seq_length, align)
            for b in row_documents([len(d) for d in fitted], seq_length, one_per_row, align)]


def collate(rows: list[Row], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows -> one packed sequence ``[1, len(rows) * seq_length]`` with per-document ``cu_seqlens``; ``images``
    lists the source image of every image block, in order (what the continuous baseline encodes)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids", "visual")}
    codes, lengths, images = [], [], []
    def padding(count: int, first_position: int) -> None:
        parts["tokens"].append(torch.full((count,), pad_id, dtype=torch.long))
        parts["labels"].append(torch.full((count,), pad_id, dtype=torch.long))
        parts["loss_mask"].append(torch.zeros(count))
        parts["position_ids"].append(torch.arange(first_position, first_position + count))
        parts["visual"].append(torch.zeros(count, dtype=torch.bool))

    for row in rows:
        for doc in row.documents:
            images.extend(doc.images)
            parts["tokens"].append(doc.tokens)
            parts["labels"].append(doc.labels)
            parts["loss_mask"].append(doc.loss_mask)
            parts["position_ids"].append(torch.arange(len(doc)))
            parts["visual"].append(doc.visual)
            codes.append(doc.codes)
            segment = aligned(len(doc), row.align)
            if segment > len(doc):  # alignment padding, inside the document's segment and after it
                padding(segment - len(doc), len(doc))
            lengths.append(segment)
        pad = row.seq_length - row.used
        if pad:
            padding(pad, 0)
            lengths.append(pad)
    batch = {k: torch.cat(v)[None] for k, v in parts.items()}
    batch["codes"] = torch.cat(codes) if codes else torch.zeros(0, 1, dtype=torch.long)
    batch["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch["max_seqlen"] = torch.tensor(max(lengths), dtype=torch.int32)
    batch["real_tokens"] = torch.tensor(sum(r.real for r in rows))
    batch["images"] = images
    return batch
