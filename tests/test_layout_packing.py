"""Sequence layout, loss masks and packing, against hand-built expectations."""

import re

import numpy as np
import pytest

from viq_mllm.data.chat import chat_document
from viq_mllm.data.layout import caption_document, code_groups, visual_position_count
from viq_mllm.data.packing import collate, first_fit_decreasing, pack
from viq_mllm.viq import visual_positions
from viq_mllm.vocab import Vocab
from viq_mllm.vocab.text_tokenizers import DEFAULT_CHAT_TEMPLATE


class WordTokenizer:
    """One id per word (ids 10+), eod = 1: makes expected sequences easy to write by hand."""

    eod, eod_text, bos_text, chat_template = 1, "<eod>", "", DEFAULT_CHAT_TEMPLATE

    def __init__(self):
        self.words = {}

    def encode(self, text):
        return self.encode_offsets(text)[0]

    def encode_offsets(self, text):
        words = list(re.finditer(r"\S+", text))
        return [self.words.setdefault(w.group(), 10 + len(self.words)) for w in words], [w.span() for w in words]


VOCAB = Vocab.build(text_size=100, codebook_size=2304, viq_fingerprint="viq-x", text_fingerprint="t")
S, E, R, OFF = 100, 101, 102, 103  # image_start, image_end, row_end, code offset


def grid(h, w):
    return np.arange(h * w * 4, dtype=np.uint16).reshape(h, w, 4)


def test_code_groups_window_order():
    codes = grid(2, 4)  # patch (r, c) has codes 4*(4r+c) .. +3
    g16 = code_groups(codes, 16)
    assert g16.shape == (1, 2, 16)
    first_window = [4 * p + k for p in (0, 1, 4, 5) for k in range(4)]  # patches (0,0) (0,1) (1,0) (1,1)
    assert g16[0, 0].tolist() == first_window
    assert code_groups(codes, 4).shape == (2, 4, 4) and code_groups(codes, 1).shape == (2, 16, 1)
    assert code_groups(codes, 1)[1, 0, 0] == 16


@pytest.mark.parametrize("h, w", [(2, 2), (16, 16), (24, 24), (4, 10)])
def test_g16_positions_equal_the_continuous_baseline(h, w):
    assert visual_position_count(h, w, 16) == visual_positions(h, w)
    assert visual_position_count(h, w, 1) == h * w * 4 + h + 2


def test_caption_document_hand_built():
    tok = WordTokenizer()
    doc = caption_document(tok, VOCAB, [grid(2, 4)], "a red pig", 16)
    a, red, pig = 10, 11, 12
    assert doc.tokens.tolist() == [S, OFF + 0, OFF + 8, R, E, a, red, pig, 1]
    assert doc.visual.tolist() == [False, True, True, False, False, False, False, False, False]
    assert doc.codes.shape == (2, 16) and doc.codes[1, 0] == OFF + 8
    # targets: a (predicted at <image_end>), red, pig, eod; never a code, a marker or padding
    assert doc.loss_mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert doc.labels.tolist()[4:8] == [a, red, pig, 1]


def test_sft_mask_covers_only_assistant_answers():
    tok = WordTokenizer()
    turns = [{"from": "human", "value": "look <image> what is it"},
             {"from": "gpt", "value": "a pig"},
             {"from": "human", "value": "colour ?"},
             {"from": "gpt", "value": "pink"}]
    doc = chat_document(tok, VOCAB, [grid(2, 2)], turns, 16)
    w = tok.words
    expected = ([w["User:"], w["look"], S, OFF, R, E, w["what"], w["is"], w["it"], 1]
                + [w["Assistant:"], w["a"], w["pig"], 1]
                + [w["User:"], w["colour"], w["?"], 1]
                + [w["Assistant:"], w["pink"], 1])
    assert doc.tokens.tolist() == expected
    supervised = {i + 1 for i, m in enumerate(doc.loss_mask.tolist()) if m}
    # positions of: a, pig, eod (first answer), pink, eod (second answer)
    assert supervised == {11, 12, 13, 19, 20}


def test_each_placeholder_takes_the_next_image_and_text_only_chats_have_none():
    tok = WordTokenizer()
    small, wide = grid(2, 2), grid(2, 4) + 40  # one and two visual positions; distinct codes
    turns = [{"from": "human", "value": "compare <image> with <image> please"}, {"from": "gpt", "value": "same"}]
    doc = chat_document(tok, VOCAB, [small, wide], turns, 16)
    w = tok.words
    expected = ([w["User:"], w["compare"], S, OFF, R, E, w["with"], S, OFF + 40, OFF + 48, R, E, w["please"], 1]
                + [w["Assistant:"], w["same"], 1])
    assert doc.tokens.tolist() == expected
    assert doc.codes.shape == (3, 16) and doc.codes[1, 0] == OFF + 40  # the second block holds the second image
    assert {i + 1 for i, m in enumerate(doc.loss_mask.tolist()) if m} == {15, 16}
    text_only = chat_document(tok, VOCAB, [], [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], 16)
    assert text_only.tokens.tolist() == [w["User:"], w["hi"], 1, w["Assistant:"], w["yo"], 1]
    assert not text_only.visual.any() and text_only.codes.shape[0] == 0


@pytest.mark.parametrize("values, images", [(["<image> <image> two?"], 1), (["<image> one"], 2), (["none"], 2),
                                            (["<image>"], 0)])
def test_a_placeholder_count_that_differs_from_the_images_is_refused(values, images):
    turns = [{"from": "human", "value": v} for v in values] + [{"from": "gpt", "value": "x"}]
    with pytest.raises(ValueError, match=r"placeholder\(s\) for"):
        chat_document(WordTokenizer(), VOCAB, [grid(2, 2)] * images, turns, 16)


def test_caption_after_two_images_and_plain_text():
    tok = WordTokenizer()
    doc = caption_document(tok, VOCAB, [grid(2, 2), grid(2, 2)], "two pigs", 16)
    assert doc.tokens.tolist() == [S, OFF, R, E, S, OFF, R, E, 10, 11, 1]
    assert doc.loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]  # the caption only, after the last image
    assert caption_document(tok, VOCAB, [], "two pigs", 16).tokens.tolist() == [10, 11, 1]


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 4, 3], 8) == [[0, 2], [1]]
    assert first_fit_decreasing([2, 2, 2, 2], 4) == [[0, 1], [2, 3]]


def scanned_first_fit_decreasing(lengths, capacity):
    """The textbook algorithm: every bin scanned in order for each item."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        b = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if b is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[b].append(i)
            room[b] -= lengths[i]
    return bins


@pytest.mark.parametrize("count, top", [(1, 9), (2, 9), (300, 64), (1000, 40), (257, 200)])
def test_first_fit_decreasing_equals_the_scanning_algorithm(count, top):
    lengths = np.random.default_rng(count).integers(1, top, count).tolist()
    assert first_fit_decreasing(lengths, 64) == scanned_first_fit_decreasing(lengths, 64)


def test_pack_refuses_or_truncates_long_documents():
    tok = WordTokenizer()
    doc = caption_document(tok, VOCAB, [grid(4, 4)], "a b c d e f", 16)
    with pytest.raises(ValueError, match=r"document 0 has 15 positions, more than model.seq_length=10"):
        pack([doc], 10)
    (row,) = pack([doc], 10, allow_truncation=True)
    assert row.used == 10 and row.documents[0].loss_mask[-1] == 0


def test_collate_restarts_positions_and_isolates_documents():
    tok = WordTokenizer()
    docs = [caption_document(tok, VOCAB, [grid(2, 2)], text, 16) for text in ("x y z", "p", "q r")]
    rows = pack(docs, 12)
    batch = collate(rows)
    lengths = [len(d) for r in rows for d in r.documents]
    assert batch["tokens"].shape == (1, 12 * len(rows))
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 12 * len(rows) and all(b > a for a, b in zip(cu, cu[1:]))
    for start, end in zip(cu[:-1], cu[1:]):
        assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
    assert int(batch["real_tokens"]) == sum(lengths)
    assert batch["codes"].shape == (3, 16) and int(batch["visual"].sum()) == 3
    for r, row in enumerate(rows):  # each row's padding is its own segment and never a target
        assert r * 12 + row.used in cu
        assert batch["loss_mask"][0, r * 12 + row.used : (r + 1) * 12].sum() == 0
    assert batch["loss_mask"].sum() == sum(float(d.loss_mask.sum()) for d in docs)


def test_blending_follows_the_weights_and_is_a_function_of_the_position():
    from viq_mllm.data.multimodal import PackedDataset, PackedSource

    tok = WordTokenizer()
    make = lambda text: pack([caption_document(tok, VOCAB, [grid(2, 2)], text, 16)], 32)  # noqa: E731
    a, b = PackedSource(make("a") + make("a a"), 3.0), PackedSource(make("b") + make("b b"), 1.0)
    data = PackedDataset([a, b], seed=5)
    drawn = [data.row_at(p) for p in range(4000)]
    share_a = sum(any(row is r for r in a.rows) for row in drawn) / len(drawn)
    # weights 3:1 -> 0.75; the binomial standard deviation of 4000 draws is sqrt(.75 * .25 / 4000) = 0.007: 4 sigma
    assert abs(share_a - 0.75) < 0.03
    again = PackedDataset([a, b], seed=5)
    assert all(again.row_at(p) is drawn[p] for p in (0, 17, 3999))
    assert [PackedDataset([a, b], seed=6).row_at(p) is drawn[p] for p in range(50)].count(False) > 5


def test_aligned_packing_pads_each_document_inside_its_segment():
    """The module's example: documents of 5, 4 and 3 at align 4 take 8, 4 and 4 positions."""
    import torch

    from viq_mllm.data.layout import Document

    docs = [Document(torch.arange(1, n + 1), torch.zeros(n, dtype=torch.bool), torch.zeros(0, 16, dtype=torch.long),
                     torch.cat([torch.ones(n - 1), torch.zeros(1)])) for n in (5, 4, 3)]
    rows = pack(docs, 8, align=4)
    assert [[len(d) for d in r.documents] for r in rows] == [[5], [4, 3]]
    batch = collate(rows)
    assert batch["cu_seqlens"].tolist() == [0, 8, 12, 16] and int(batch["real_tokens"]) == 12
    assert batch["position_ids"][0, :8].tolist() == list(range(8))  # the padding continues the document
    assert batch["loss_mask"][0, 5:8].sum() == 0 and batch["loss_mask"][0, 15] == 0
    with pytest.raises(ValueError, match="not a multiple of the packing alignment 16"):
        pack(docs, 24, align=16)


def test_a_template_that_does_not_end_answers_with_eos_is_refused():
    """Generation stops at the eos: a template that closes an answer otherwise could never teach the model to stop."""
    tok = WordTokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="does not close an assistant message with '<eod>'"):
        chat_document(tok, VOCAB, [], [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], 16)


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}",
    "{% for m in messages %}{% if m['role'] != 'user' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
], ids=["drops-the-answer", "repeats-both", "drops-the-image"])
def test_a_template_that_drops_or_repeats_a_message_is_refused(template):
    """An answer the template leaves out would go unsupervised, one it repeats supervised twice; an image it drops
    would be lost: each is refused, not laid out."""
    tok = WordTokenizer()
    tok.chat_template = template
    with pytest.raises(ValueError, match="drops or repeats"):
        chat_document(tok, VOCAB, [grid(2, 2)], [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "yo"}],
                      16)
