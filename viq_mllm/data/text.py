"""Text for language-model runs: tokenizers, an offline corpus, and a deterministic sample order.

The sample order is a pure function of ``(seed, global sample position)``, so a resumed run reads exactly the
samples an uninterrupted run would have read: the checkpoint only needs the step number.

Example (seq_length 4, bytes tokenizer)::

    >>> ds = TokenWindows(["ab", "cde"], ByteTokenizer(), seq_length=4)   # viq_mllm.vocab.text_tokenizers
    >>> ds.stream.tolist()          # documents joined with end-of-document (id 256)
    [97, 98, 256, 99, 100, 101, 256]
    >>> ds[0]["tokens"].tolist(), ds[0]["labels"].tolist()
    ([97, 98, 256, 99], [98, 256, 99, 100])
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

import torch

from viq_mllm.data.order import rank_micro_batches, sample_index
from viq_mllm.vocab.text_tokenizers import TextTokenizer


def stdlib_docs_corpus(max_files: int = 400) -> list[str]:
    """Real English prose available offline on any Python install: docstrings of the standard library.

    Files are parsed with ``ast`` (never imported), in sorted order, so the corpus is deterministic for a given
    Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))[:max_files]
    docs = []
    for file in files:
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs


def read_text_files(paths: list[str]) -> list[str]:
    """One document per non-empty paragraph-separated block of each file."""
    docs = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"data.text_files: {path} does not exist")
        docs.extend(block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip())
    return docs


class TokenWindows:
    """Documents joined by end-of-document ids and cut into windows of ``seq_length + 1`` tokens."""

    def __init__(self, documents: list[str], tokenizer: TextTokenizer, seq_length: int):
        ids: list[int] = []
        for doc in documents:
            ids.extend(tokenizer.encode(doc))
            ids.append(tokenizer.eod)
        self.stream = torch.tensor(ids, dtype=torch.long)
        self.seq_length = seq_length
        self.num_samples = (len(ids) - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(f"corpus of {len(ids)} tokens is shorter than one sequence of {seq_length + 1}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.seq_length
        window = self.stream[start : start + self.seq_length + 1]
        return {
            "tokens": window[:-1],
            "labels": window[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }


def micro_batches(
    dataset: TokenWindows, seed: int, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches one data-parallel rank reads at one optimizer step."""
    for positions in rank_micro_batches(step, global_batch, micro_batch, dp_rank, dp_size):
        items = [dataset[sample_index(p, len(dataset), seed)] for p in positions]
        yield {key: torch.stack([item[key] for item in items]) for key in items[0]}
