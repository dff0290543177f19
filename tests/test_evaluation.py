"""Exact-match scoring of VQA answers, and easy-VQA read from its wheel as LLaVA-style records."""

import json

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
    assert len(easy_vqa_items("test", with_images=False)) == 9673
    assert all(i["image"] is None for i in easy_vqa_items("train", limit=3, with_images=False))
