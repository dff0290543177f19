"""Text tokenizers behind one small interface: ``bytes`` (built in), SentencePiece files, HF tokenizer folders.

``fingerprint`` identifies the exact tokenizer (a hash of its files), so vocabularies and checkpoints can refuse
a different one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol


#: The chat layout of a tokenizer that has no chat template: ``User: ...<eod>Assistant: ...<eod>``. The generation
#: prompt ends at ``Assistant:`` so an answer's first token carries its leading space, as in training.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TextTokenizer(Protocol):
    """``eod_text`` and ``bos_text`` are how a chat template writes the end-of-document and begin tokens (``bos_text``
    empty when there is none); ``chat_template`` is the Jinja template chats are laid out with
    (:mod:`viq_mllm.data.chat`): the tokenizer's own, else :data:`DEFAULT_CHAT_TEMPLATE`."""

    vocab_size: int
    eod: int
    fingerprint: str
    eod_text: str
    bos_text: str
    chat_template: str

    def encode(self, text: str) -> list[int]: ...

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of ``text`` and, for each, the ``(start, end)`` characters of ``text`` it covers."""

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and one end-of-document id (256). Needs no file: the CPU recipes use it."""

    vocab_size = 257
    eod = 256
    fingerprint = "bytes-utf8-v1"
    eod_text, bos_text, chat_template = "<|eod|>", "", DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, spans = [], []
        for index, char in enumerate(text):
            char_ids = self.encode(char)
            ids += char_ids
            spans += [(index, index + 1)] * len(char_ids)
        return ids, spans

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTextTokenizer:
    """A tokenizer folder readable by ``transformers.AutoTokenizer`` (never downloads)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.fingerprint = hf_tokenizer_fingerprint(self.path)
        self.vocab_size = len(self._tok)
        eod = self._tok.eos_token_id
        if eod is None:
            raise ValueError(f"tokenizer at {path} has no eos token to separate documents")
        self.eod = eod
        self.eod_text, self.bos_text = self._tok.eos_token, self._tok.bos_token or ""
        self.chat_template = self._tok.chat_template or DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not self._tok.is_fast:
            raise ValueError(f"tokenizer at {self.path} has no fast (Rust) version: chats need its offsets")
        out = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return out["input_ids"], [tuple(span) for span in out["offset_mapping"]]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.fingerprint = files_fingerprint([self.path], with_names=False)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        self.eod_text, self.bos_text = self._sp.id_to_piece(self.eod), ""
        self.chat_template = DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        pieces = self._sp.encode(text, return_type="proto").pieces  # begin, end: byte offsets into the UTF-8 text
        char_at = [i for i, char in enumerate(text) for _ in char.encode("utf-8")] + [len(text)]
        return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def load_text_tokenizer(spec: str) -> TextTokenizer:
    """``bytes``, ``hf:DIR`` or ``sentencepiece:FILE``."""
    if spec == "bytes":
        return ByteTokenizer()
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("hf", "sentencepiece"):
        raise ValueError(f"data.tokenizer={spec!r}: expected 'bytes', 'hf:DIR' or 'sentencepiece:FILE'")
    if not Path(path).exists():
        raise FileNotFoundError(f"data.tokenizer={spec}: no such {'folder' if kind == 'hf' else 'file'}")
    return HFTextTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)


#: The files of an HF folder that define its tokenizer (not the weights or the model config beside them).
HF_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens")


def hf_tokenizer_fingerprint(folder: Path) -> str | None:
    """Fingerprint of an HF folder's tokenizer files; None when it has none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.startswith(HF_TOKENIZER_PREFIXES))
    return files_fingerprint(files) if files else None


def files_fingerprint(paths: list[Path], with_names: bool = True) -> str:
    """sha256 of the files' bytes (and names, for a tokenizer folder)."""
    digest = hashlib.sha256()
    for path in paths:
        if with_names:
            digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return "text-" + digest.hexdigest()[:16]


def train_sentencepiece(texts: list[str], model_file: str | Path, vocab_size: int) -> Path:
    """Train a small BPE SentencePiece model offline (demos and tests: a real tokenizer file, no download)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, num_threads=1, minloglevel=2,
        bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
    )
    path = Path(model_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
