"""The extended vocabulary: text tokens, then layout special tokens, then one token per ViQ code, then padding.

The only module that does id arithmetic. Layout of ids (docs/concepts.md)::

    [0, text_size)                          the text tokenizer's own ids
    [text_size, code_offset)                special tokens: <|image_start|>, <|image_end|>, <|row_end|>
    [code_offset, code_offset + K)          code k  <->  id code_offset + k, token string <|viq_k|>
    [code_offset + K, padded_size)          padding; padded_size divides by 128 x MAX_TP

Example: a 32,000-piece SentencePiece model with the 16k preset (K = 15,360)::

    >>> v = Vocab.build(text_size=32000, codebook_size=15360, viq_fingerprint="viq-...", text_fingerprint="...")
    >>> v.special_tokens, v.code_offset, v.padded_size
    ({'image_start': 32000, 'image_end': 32001, 'row_end': 32002}, 32003, 48128)
    >>> v.codes_to_ids(torch.tensor([0, 15359])).tolist()
    [32003, 47362]

``vocab.json`` stores every field and a fingerprint over them; readers compare fingerprints, never guess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from viq_mllm.recipe.sections import MAX_TP  # padded vocabularies divide by 128 x MAX_TP

SPECIAL_TOKENS = {"image_start": "<|image_start|>", "image_end": "<|image_end|>", "row_end": "<|row_end|>"}
CODE_TOKEN = "<|viq_{:05d}|>"
VOCAB_FILE = "vocab.json"


def padded_vocab_size(size: int) -> int:
    """Round up so the embedding table divides by 128 x MAX_TP (megatron convention, every TP up to MAX_TP)."""
    multiple = 128 * MAX_TP
    return int(math.ceil(size / multiple) * multiple)


@dataclass(frozen=True)
class Vocab:
    text_size: int
    special_tokens: dict[str, int]
    code_offset: int
    codebook_size: int
    padded_size: int
    viq_fingerprint: str
    text_fingerprint: str
    fingerprint: str = field(default="", compare=False)

    @classmethod
    def build(cls, text_size: int, codebook_size: int, viq_fingerprint: str, text_fingerprint: str) -> "Vocab":
        specials = {name: text_size + i for i, name in enumerate(SPECIAL_TOKENS)}
        offset = text_size + len(specials)
        vocab = cls(text_size, specials, offset, codebook_size, padded_vocab_size(offset + codebook_size),
                    viq_fingerprint, text_fingerprint)
        return dataclasses.replace(vocab, fingerprint=vocab._digest())

    def _digest(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "fingerprint"}
        return "vocab-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    # ids ---------------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Ids in use (text + special + codes), before padding."""
        return self.code_offset + self.codebook_size

    def special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"no special token {name!r}; have {sorted(self.special_tokens)}")
        return self.special_tokens[name]

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return codes + self.code_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids).long()
        if not bool(self.is_code(ids).all()):
            raise ValueError("ids_to_codes got ids that are not visual code tokens")
        return ids - self.code_offset

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        return (ids >= self.code_offset) & (ids < self.code_offset + self.codebook_size)

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(ids) < self.text_size

    # token strings -----------------------------------------------------------------------------------------
    def added_tokens(self) -> list[str]:
        """The strings of ids [text_size, size), in id order."""
        return [self.token_string(i) for i in range(self.text_size, self.code_offset)] + [
            CODE_TOKEN.format(k) for k in range(self.codebook_size)
        ]

    def token_string(self, token_id: int) -> str:
        if not self.text_size <= token_id < self.size:
            raise ValueError(f"id {token_id} is not an added token")
        if token_id < self.code_offset:
            name = next(n for n, i in self.special_tokens.items() if i == token_id)
            return SPECIAL_TOKENS[name]
        return CODE_TOKEN.format(token_id - self.code_offset)

    def token_id(self, token: str) -> int:
        if token.startswith("<|viq_"):
            return self.code_offset + int(token[6:-2])
        for name, text in SPECIAL_TOKENS.items():
            if text == token:
                return self.special_tokens[name]
        raise ValueError(f"{token!r} is not an added token")

    # persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Vocab":
        path = Path(directory)
        path = path if path.suffix == ".json" else path / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no vocab.json; create one with `viq-mllm extend-vocab`")
        vocab = cls(**json.loads(path.read_text()))
        if vocab.fingerprint != vocab._digest():
            raise ValueError(f"{path}: fingerprint {vocab.fingerprint} does not match its fields ({vocab._digest()})")
        return vocab
