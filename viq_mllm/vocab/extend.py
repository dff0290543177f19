"""``viq-mllm extend-vocab``: a text tokenizer + a ViQ tokenizer -> an extended tokenizer of the same kind.

- SentencePiece ``.model``: the special and code tokens become USER_DEFINED pieces appended to the model proto,
  written as ``tokenizer.model``.
- HF tokenizer folder: they become added (special) tokens; the folder is written with ``save_pretrained``.

Either way ``vocab.json`` records the id layout (``ids.py``) and the fingerprints of both tokenizers, and every
added token's id in the written tokenizer is checked against that layout before anything is saved as done.
"""

from __future__ import annotations

import json
from pathlib import Path

from viq_mllm import artifact
from viq_mllm.viq.fsq import PRESETS
from viq_mllm.vocab.ids import Vocab
from viq_mllm.vocab.text_tokenizers import HFTextTokenizer, SentencePieceTokenizer

SP_FILE = "tokenizer.model"


def _viq_identity(viq_dir: Path) -> tuple[str, int]:
    config = viq_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{viq_dir}: no config.json; pass a folder written by ViQTokenizer.save_pretrained")
    meta = json.loads(config.read_text())

    levels = PRESETS[meta["architecture"]["preset"]]
    size = 1
    for level in levels:
        size *= level
    return meta["fingerprint"], size


def text_tokenizer_kind(path: Path) -> str:
    if path.is_file() and path.suffix == ".model":
        return "sentencepiece"
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return "hf"
    raise ValueError(f"{path}: expected a SentencePiece .model file or an HF tokenizer folder (tokenizer.json)")


KIND = "vocabulary"


def extend_vocab(text_tokenizer: str | Path, viq_dir: str | Path, out_dir: str | Path,
                 overwrite: bool = False) -> Vocab:
    """Extend ``text_tokenizer`` with ``viq_dir``'s codes into ``out_dir`` (an artifact). A folder already made
    from the same two tokenizers is reused; from others, refused naming both (or redone with ``overwrite``)."""
    text_path, viq_dir, out_dir = Path(text_tokenizer), Path(viq_dir), Path(out_dir)
    viq_fingerprint, codebook = _viq_identity(viq_dir)
    kind = text_tokenizer_kind(text_path)
    base = SentencePieceTokenizer(text_path) if kind == "sentencepiece" else HFTextTokenizer(text_path)
    spec = artifact.Spec(KIND, 1, {"text_fingerprint": base.fingerprint, "viq_fingerprint": viq_fingerprint},
                         {"text_tokenizer_kind": kind})
    if artifact.check_reuse(out_dir, spec, overwrite, hint=" (or pass --overwrite)") is not None:
        return Vocab.load(out_dir)
    vocab = Vocab.build(base.vocab_size, codebook, viq_fingerprint, base.fingerprint)
    stage = artifact.Staging.begin(out_dir, spec)
    if kind == "sentencepiece":
        _extend_sentencepiece(text_path, vocab, stage.path)
    else:
        _extend_hf(base, vocab, stage.path)
    vocab.save(stage.path)
    stage.write_json("text_tokenizer.json", {"kind": kind, "source": str(text_path.resolve())})
    stage.seal({"size": vocab.size, "padded_size": vocab.padded_size, "fingerprint": vocab.fingerprint})
    return vocab


def _extend_sentencepiece(model_file: Path, vocab: Vocab, out: Path) -> None:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    for token in vocab.added_tokens():
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    (out / SP_FILE).write_bytes(proto.SerializeToString())
    processor = spm.SentencePieceProcessor(model_file=str(out / SP_FILE))
    _check_ids(vocab, processor.piece_to_id, processor.get_piece_size())


def _extend_hf(base: HFTextTokenizer, vocab: Vocab, out: Path) -> None:
    tok = base._tok
    tok.add_tokens(vocab.added_tokens(), special_tokens=True)
    _check_ids(vocab, tok.convert_tokens_to_ids, len(tok))
    tok.save_pretrained(str(out))


def _check_ids(vocab: Vocab, token_to_id, total: int) -> None:
    if total != vocab.size:
        raise RuntimeError(f"extended tokenizer has {total} ids, the layout expects {vocab.size}")
    for token_id in (vocab.text_size, vocab.code_offset, vocab.size - 1):
        token = vocab.token_string(token_id)
        if token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {token_to_id(token)} in the extended tokenizer, expected {token_id}")
