"""The extended vocabulary (docs/concepts.md): id mapping, text tokenizers, extended tokenizer files."""

from viq_mllm.vocab.ids import CODE_TOKEN, MAX_TP, SPECIAL_TOKENS, Vocab, padded_vocab_size

__all__ = ["CODE_TOKEN", "MAX_TP", "SPECIAL_TOKENS", "Vocab", "padded_vocab_size"]
