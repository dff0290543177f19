"""Packed multimodal training data from code shards: documents -> packed rows -> blended, resumable order.

Each source (a shard set with a weight) becomes documents (``layout.py``: captions for pretraining; ``chat.py``:
conversations for SFT) and then packed rows. The row read at global position ``p`` is a pure function of
``(seed, p)``: a weighted draw picks the source, and the source's own per-epoch permutation picks the row. So
a resumed run reads exactly what an uninterrupted one would, from the step number alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Iterator

import torch

from viq_mllm.data.chat import chat_document
from viq_mllm.data.layout import Document, caption_document, turn_role, turn_text
from viq_mllm.data.order import rank_micro_batches, sample_index
from viq_mllm.data.packing import Row, collate
from viq_mllm.data.shards import CodeSample, CodeShards
from viq_mllm.vocab.tokenizer import MultimodalTokenizer


def documents_from_shards(shards: CodeShards, tokenizer: MultimodalTokenizer, task: str, group: int) -> list[Document]:
    return [sample_document(shards.directory, sample, tokenizer, task, group) for sample in shards]


def sample_document(directory, sample: CodeSample, tokenizer: MultimodalTokenizer, task: str, group: int
                    ) -> Document:
    """The training document of one code sample: a caption after its images (pretraining) or its conversation
    (SFT), with the source images' locators for the continuous baseline.

    Pretraining on conversation records (LLaVA-Pretrain's layout) follows LLaVA's ``plain`` template: the images,
    then the assistant's answers as the caption; the human prompts are dropped."""
    where = f"{directory}: sample {sample.key} ({sample.source})"
    codes = [image.codes for image in sample.images]
    try:
        if task == "pretrain":
            document = caption_document(tokenizer.text, tokenizer.vocab, codes, caption_text(sample.text), group)
        else:
            document = chat_document(tokenizer.text, tokenizer.vocab, codes, _conversation(sample.text), group)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    document.images = [image.path for image in sample.images]
    return document


def caption_text(text: dict) -> str:
    """A sample's caption: its ``caption``, or its assistant answers (a conversation record)."""
    answers = [turn_text(t) for t in text.get("conversations", []) if turn_role(t) == "assistant"]
    caption = text.get("caption") or "\n".join(answers)
    if not caption:
        raise ValueError("no caption")
    return caption


def _conversation(text: dict) -> list[dict]:
    if text.get("conversations"):
        return text["conversations"]
    if text.get("caption"):
        return [{"from": "human", "value": "<image>\nWhat is in this picture?"},
                {"from": "gpt", "value": text["caption"]}]
    raise ValueError("no conversation")


@dataclass
class PackedSource:
    rows: Sequence[Row]  # a list, or rows read on demand (prepared data)
    weight: float

    @property
    def padding_fraction(self) -> float:
        """From the rows' own record where they have one (prepared data), else counted over every row."""
        known = getattr(self.rows, "padding_fraction", None)
        if known is not None:
            return known
        total = sum(r.seq_length for r in self.rows)
        return 1.0 - sum(r.real for r in self.rows) / total


class PackedDataset:
    def __init__(self, sources: list[PackedSource], seed: int):
        if not sources or any(s.weight <= 0 or not s.rows for s in sources):
            raise ValueError("every data source needs a positive weight and at least one document")
        self.sources, self.seed = sources, seed
        total = sum(s.weight for s in sources)
        self.cumulative = torch.tensor([s.weight for s in sources], dtype=torch.float64).cumsum(0) / total

    def row_at(self, position: int) -> Row:
        draw = torch.rand(1, generator=torch.Generator().manual_seed(self.seed * 7919 + position), dtype=torch.float64)
        source = min(int(torch.searchsorted(self.cumulative, draw)), len(self.sources) - 1)
        rows = self.sources[source].rows
        return rows[sample_index(position, len(rows), self.seed + 1000 * source)]

    def micro_batches(self, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
                      ) -> Iterator[dict[str, torch.Tensor]]:
        """The packed micro-batches (``micro_batch`` rows flattened into one thd sequence) of one DP rank."""
        for positions in rank_micro_batches(step, global_batch, micro_batch, dp_rank, dp_size):
            yield self.batch_at(positions)

    def batch_at(self, positions: range) -> dict[str, torch.Tensor]:
        """The rows at these global positions as one packed micro-batch."""
        return collate([self.row_at(p) for p in positions])
