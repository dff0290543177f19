"""``MultimodalTokenizer``: text with image blocks <-> ids in the extended vocabulary.

Added tokens (``<|image_start|>``, ``<|row_end|>``, ``<|viq_01234|>`` ...) are found by a regular expression and
mapped through :class:`Vocab`; the text between them goes through the base text tokenizer. So
``encode(decode(ids)) == ids`` for every sequence made of encoded text segments and image blocks, whatever the
base tokenizer does at segment boundaries.

    >>> tok = MultimodalTokenizer.from_dir("runs/vocab")
    >>> ids = tok.encode("A pig.<|image_start|><|viq_00007|><|row_end|><|image_end|>")
    >>> tok.decode(ids)
    'A pig.<|image_start|><|viq_00007|><|row_end|><|image_end|>'
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from viq_mllm.vocab.ids import Vocab
from viq_mllm.vocab.text_tokenizers import TextTokenizer, load_text_tokenizer

_ADDED = re.compile(r"<\|(?:image_start|image_end|row_end|viq_\d{5})\|>")


class MultimodalTokenizer:
    def __init__(self, vocab: Vocab, text: TextTokenizer):
        if text.vocab_size != vocab.text_size or text.fingerprint != vocab.text_fingerprint:
            raise ValueError(
                f"text tokenizer ({text.vocab_size} ids, {text.fingerprint}) is not the one this vocabulary was "
                f"built from ({vocab.text_size} ids, {vocab.text_fingerprint})"
            )
        self.vocab, self.text = vocab, text

    @classmethod
    def from_dir(cls, directory: str | Path) -> "MultimodalTokenizer":
        """A folder written by ``extend-vocab`` (vocab.json + the record of its base text tokenizer)."""
        directory = Path(directory)
        vocab = Vocab.load(directory)
        source = json.loads((directory / "text_tokenizer.json").read_text())
        prefix = "sentencepiece" if source["kind"] == "sentencepiece" else "hf"
        return cls(vocab, load_text_tokenizer(f"{prefix}:{source['source']}"))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        position = 0
        for match in _ADDED.finditer(text):
            if match.start() > position:
                ids.extend(self.text.encode(text[position : match.start()]))
            ids.append(self.vocab.token_id(match.group()))
            position = match.end()
        if position < len(text):
            ids.extend(self.text.encode(text[position:]))
        if any(token_id >= self.vocab.code_offset + self.vocab.codebook_size for token_id in ids):
            raise ValueError("code token out of the codebook range")
        return ids

    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id < self.vocab.text_size:
                run.append(token_id)
                continue
            if run:
                parts.append(self.text.decode(run))
                run = []
            parts.append(self.vocab.token_string(token_id))
        if run:
            parts.append(self.text.decode(run))
        return "".join(parts)
