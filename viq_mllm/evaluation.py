"""Exact-match accuracy of a VLM's answers to questions about images (``viq-mllm eval``).

An *answerer* is any ``(image path or None, question) -> text`` function: the megatron checkpoint's greedy decoding
(``megatron_ext.vlm.inference.answerer``) or the exported HF folder's (``viq_mllm.hf.answerer``), so the two are
scored by the same code. An answer matches when, lower-cased and without surrounding spaces and final full stop,
it equals the reference answer.

    >>> report = accuracy(answerer, easy_vqa_items("test", limit=500))
    >>> sorted(report)                              # by_kind: yes/no, shape, colour
    ['accuracy', 'by_kind', 'count', 'predictions']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from viq_mllm.console import progress

Answerer = Callable[[Optional[str], str], str]
YES_NO = {"yes", "no"}


def normalized(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def kind_of(answer: str, shapes: set[str]) -> str:
    """``yes/no``, ``shape`` or ``colour``: the question kinds of easy-VQA."""
    return "yes/no" if answer in YES_NO else "shape" if answer in shapes else "colour"


def accuracy(answer: Answerer, items: list[dict], shapes: frozenset[str] = frozenset({"circle", "rectangle", "triangle"}),
             show_progress: bool = True) -> dict:
    """Score ``answer`` on ``items`` (``image``, ``question``, ``answer``); returns the overall and per-kind accuracy
    and every prediction."""
    bar = progress(len(items), desc="eval", unit="question", disable=not show_progress)
    predictions = []
    for item in items:
        predicted = normalized(answer(item.get("image"), item["question"]))
        predictions.append({**item, "predicted": predicted, "correct": predicted == normalized(item["answer"])})
        bar.update(1)
    bar.close()
    by_kind: dict[str, dict] = {}
    for p in predictions:
        entry = by_kind.setdefault(kind_of(normalized(p["answer"]), set(shapes)), {"correct": 0, "count": 0})
        entry["correct"] += p["correct"]
        entry["count"] += 1
    return {"accuracy": sum(p["correct"] for p in predictions) / max(len(predictions), 1),
            "count": len(predictions),
            "by_kind": {k: {"accuracy": v["correct"] / v["count"], "count": v["count"]} for k, v in sorted(by_kind.items())},
            "predictions": predictions}


def easy_vqa_items(split: str = "test", limit: Optional[int] = None, with_images: bool = True) -> list[dict]:
    """The questions of an easy-VQA split as evaluation items (``image`` None for the language prior)."""
    from viq_mllm.data.easy_vqa import records

    items = []
    for record in records(split, with_images=with_images, limit=limit):
        human, gpt = record["conversations"]
        items.append({"image": record.get("image"), "question": human["value"].replace("<image>\n", ""),
                      "answer": gpt["value"]})
    return items


def report_table(report: dict) -> str:
    """The accuracy overall and per question kind, as a markdown table."""
    from viq_mllm.bench.report import markdown_table

    rows = [["all", f"{report['accuracy']:.1%}", str(report["count"])]]
    rows += [[kind, f"{v['accuracy']:.1%}", str(v["count"])] for kind, v in report["by_kind"].items()]
    return markdown_table(["questions", "exact match", "count"], rows)
