"""The extended vocabulary: id layout, extended SentencePiece / HF tokenizers, round trips, fingerprints."""

import json

import pytest
import torch

from viq_mllm.vocab import MAX_TP, Vocab, padded_vocab_size
from viq_mllm.vocab.extend import extend_vocab
from viq_mllm.vocab.tokenizer import MultimodalTokenizer

SENTENCES = ["A Tamworth pig.", "A great blue heron standing in water.", "Return the number of items.",
             "The quick brown fox jumps over the lazy dog."] * 50


@pytest.fixture(scope="module")
def viq_dir(tmp_path_factory):
    from viq_mllm.viq import ViQTokenizer

    return ViQTokenizer.from_config("tiny", preset="2k").save_pretrained(tmp_path_factory.mktemp("viq") / "viq")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from viq_mllm.vocab.text_tokenizers import train_sentencepiece

    return train_sentencepiece(SENTENCES, tmp_path_factory.mktemp("sp") / "text.model", 400)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf") / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(path))
    return path


def test_layout_and_padding():
    v = Vocab.build(text_size=32000, codebook_size=15360, viq_fingerprint="viq-x", text_fingerprint="text-y")
    assert v.special_tokens == {"image_start": 32000, "image_end": 32001, "row_end": 32002}
    assert v.code_offset == 32003 and v.size == 32003 + 15360
    assert v.padded_size % (128 * MAX_TP) == 0 and v.padded_size >= v.size
    assert v.padded_size - v.size < 128 * MAX_TP
    codes = torch.tensor([0, 1, 15359])
    ids = v.codes_to_ids(codes)
    assert ids.tolist() == [32003, 32004, 47362]
    assert torch.equal(v.ids_to_codes(ids), codes)
    assert v.is_code(ids).all() and not v.is_code(torch.tensor([32002, 47363])).any()
    with pytest.raises(ValueError, match="codes must be in"):
        v.codes_to_ids(torch.tensor([15360]))
    with pytest.raises(ValueError, match="not visual code tokens"):
        v.ids_to_codes(torch.tensor([5]))
    assert padded_vocab_size(1) == 1024 and padded_vocab_size(1025) == 2048


def test_vocab_json_round_trip_and_tamper_detection(tmp_path):
    v = Vocab.build(100, 2304, "viq-a", "text-b")
    v.save(tmp_path)
    assert Vocab.load(tmp_path) == v and Vocab.load(tmp_path).fingerprint == v.fingerprint
    data = json.loads((tmp_path / "vocab.json").read_text())
    data["code_offset"] += 1
    (tmp_path / "vocab.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its fields"):
        Vocab.load(tmp_path)


def _sequence(tok: MultimodalTokenizer) -> list[int]:
    v = tok.vocab
    codes = torch.arange(0, 2304, 97)[:16]
    image = [v.special("image_start")] + v.codes_to_ids(codes[:8]).tolist() + [v.special("row_end")]
    image += v.codes_to_ids(codes[8:]).tolist() + [v.special("row_end"), v.special("image_end")]
    return tok.text.encode("A Tamworth pig.") + image + tok.text.encode("The quick brown fox.")


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_extended_tokenizer_ids_and_round_trip(kind, sp_model, hf_dir, viq_dir, tmp_path):
    source = sp_model if kind == "sentencepiece" else hf_dir
    vocab = extend_vocab(source, viq_dir, tmp_path / "ext")
    assert vocab.codebook_size == 2304
    tok = MultimodalTokenizer.from_dir(tmp_path / "ext")
    ids = _sequence(tok)
    text = tok.decode(ids)
    assert "<|image_start|><|viq_00000|><|viq_00097|>" in text and "<|row_end|><|image_end|>" in text
    assert tok.encode(text) == ids
    assert tok.decode(tok.encode(text)) == text
    # the written tokenizer files agree with the layout, id for id
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ext" / "tokenizer.model"))
        assert sp.get_piece_size() == vocab.size
        assert sp.piece_to_id("<|viq_00097|>") == vocab.codes_to_ids(torch.tensor(97)).item()
        assert sp.piece_to_id("<|row_end|>") == vocab.special("row_end")
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tmp_path / "ext"))
        assert len(hf) == vocab.size
        assert hf.convert_tokens_to_ids("<|viq_02303|>") == vocab.code_offset + 2303
        assert hf.encode("<|image_start|><|viq_00001|>", add_special_tokens=False) == [
            vocab.special("image_start"), vocab.code_offset + 1]


def test_a_different_text_tokenizer_is_refused(sp_model, viq_dir, tmp_path):
    from viq_mllm.vocab.text_tokenizers import SentencePieceTokenizer, train_sentencepiece

    extend_vocab(sp_model, viq_dir, tmp_path / "ext")
    vocab = Vocab.load(tmp_path / "ext")
    other = SentencePieceTokenizer(train_sentencepiece(SENTENCES[:100], tmp_path / "other.model", 330))
    with pytest.raises(ValueError, match="is not the one this vocabulary was built from"):
        MultimodalTokenizer(vocab, other)
