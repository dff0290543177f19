"""Exact-match scoring of VQA answers, and easy-VQA read from its wheel as LLaVA-style records."""

import json

import pytest
import torch

from viq_mllm.evaluation import accuracy, easy_vqa_items, normalized


def test_answers_are_matched_after_case_spaces_and_full_stop_and_counted_per_kind():
    items = [{"image": "a.png", "question": "is it red?", "answer": "yes"},
             {"image": "a.png", "question": "what shape?", "answer": "circle"},
             {"image": "b.png", "question": "what colour?", "answer": "teal"},
             {"image": "b.png", "question": "is it a star?", "answer": "no"}]
    replies = {"is it red?": " Yes.", "what shape?": "triangle", "what colour?": "Teal", "is it a star?": "no"}
    report = accuracy(lambda image, question: replies[question], items, show_progress=False)
    assert report["accuracy"] == 0.75 and report["count"] == 4
    assert report["by_kind"] == {"colour": {"accuracy": 1.0, "count": 1}, "shape": {"accuracy": 0.0, "count": 1},
                                 "yes/no": {"accuracy": 1.0, "count": 2}}
    assert [p["correct"] for p in report["predictions"]] == [True, False, True, True]
    assert normalized("  Circle. ") == "circle"


def test_easy_vqa_items_are_the_wheels_questions():
    from viq_mllm.data.easy_vqa import data_root

    raw = json.loads((data_root() / "test" / "questions.json").read_text())
    items = easy_vqa_items("test", limit=5)
    assert [(i["question"], i["answer"]) for i in items] == [(q, a) for q, a, _ in raw[:5]]
    assert items[0]["image"].endswith(f"test/images/{raw[0][2]}.png")
    assert len(easy_vqa_items("test", with_images=False)) == 9673  # the easy-vqa wheel's test split, all of it
    assert all(i["image"] is None for i in easy_vqa_items("train", limit=3, with_images=False))


def _losses(table):
    """A caption scorer from a formula: ``table(i, j)`` (``i`` None: the caption alone)."""
    return lambda pairs: [table(i, j) for i, j in pairs]


def test_caption_retrieval_removes_each_captions_own_likelihood():
    from viq_mllm.evaluation import caption_report

    prior = [0.5 * j for j in range(12)]  # caption 11 is 5.5 nats harder than caption 0 whatever the image

    def informative(i, j):  # the right image lowers its caption's loss by 0.3; a raw ranking picks caption 0
        return prior[j] - (0.3 if i == j else 0.0) + (0.0 if i is None else 1.0)

    report = caption_report(_losses(informative), n=12, k=10)
    assert report["retrieval_accuracy"] == 1.0 and report["retrieval_chance"] == 0.1
    assert report["right_image_lower"] == 1.0
    assert abs(report["loss_right_image"] - report["loss_other_image"] + 0.3) < 1e-9

    report = caption_report(_losses(lambda i, j: prior[j]), n=12, k=10)  # the image tells nothing: ties lose
    assert report["retrieval_accuracy"] == 0.0 and report["right_image_lower"] == 0.0


def test_caption_retrieval_counts_the_images_that_single_out_their_caption():
    from viq_mllm.evaluation import caption_report

    def half(i, j):  # images 0-9 explain their caption, images 10-19 explain caption 0 best
        if i is None:
            return 2.0
        return 1.0 if (i == j and i < 10) or (i >= 10 and j == 0) else 2.0

    assert caption_report(_losses(half), n=20, k=20)["retrieval_accuracy"] == 0.5  # every other caption a candidate
    with pytest.raises(ValueError, match="at least 10 samples"):
        caption_report(_losses(half), n=6, k=10)


@pytest.mark.e2e
@pytest.mark.parametrize("embedding", ["table", "continuous"])
def test_caption_eval_and_generation_see_the_documents_training_saw(vlm_assets, tmp_path, embedding):
    """``eval --task captions`` and ``generate`` of a discrete VLM and of the continuous baseline: the right-image
    loss is the training documents' loss (built by the training data path, pixels from the shards' sources) and
    the first generated id is the training document's next-token argmax after the image block."""
    from conftest import train_vlm_cli, viq_mllm

    from megatron_ext.training.parallel import shutdown
    from megatron_ext.vlm.inference import caption_losses, load_for_inference
    from megatron_ext.vlm.model import packed_params
    from megatron_ext.vlm.build import PixelSource
    from viq_mllm.data.multimodal import sample_document
    from viq_mllm.data.packing import collate, pack
    from viq_mllm.data.shards import CodeShards

    train_vlm_cli(tmp_path / "run", vlm_assets, "train.steps=4", "train.warmup_steps=1", "checkpoint.every=4",
                  f"model.visual.embedding={embedding}")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    viq_mllm("eval", "--checkpoint", str(ckpt), "--task", "captions", "--shards", str(vlm_assets["shards"]),
             "--limit", "12", "--k", "5", "--out", str(tmp_path / "captions.json"))
    report = json.loads((tmp_path / "captions.json").read_text())
    sample = next(iter(CodeShards(vlm_assets["shards"])))
    ids = tmp_path / "ids.txt"
    viq_mllm("generate", "--checkpoint", str(ckpt), "--image", sample.images[0].path, "--max-new-tokens", "1",
             "--output-ids", str(ids))

    model, tokenizer, meta = load_for_inference(ckpt)
    try:
        attach = (PixelSource(str(vlm_assets["viq"]), tokenizer.vocab).attach if embedding == "continuous"
                  else lambda batch: {k: v for k, v in batch.items() if k != "images"})
        docs = [sample_document(vlm_assets["shards"], s, tokenizer, "pretrain", 16)
                for s in list(CodeShards(vlm_assets["shards"]))[:12]]
        right = caption_losses(model, docs, attach)
        batch = attach(collate(pack([docs[0]], len(docs[0]))))
        with torch.no_grad():
            logits = model(batch, packed_params(batch), labels=False)[0]
    finally:
        shutdown()
    assert report["count"] == 12 and report["retrieval_k"] == 5
    assert abs(report["loss_right_image"] - sum(right) / len(right)) < 1e-5
    image_end = int((docs[0].tokens == tokenizer.vocab.special("image_end")).nonzero()[0])  # then the caption
    first = int(logits[image_end, :tokenizer.vocab.text_size].argmax())
    assert ids.read_text().split() == [str(first)]
