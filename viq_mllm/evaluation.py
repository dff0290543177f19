"""How well a VLM uses its images (``viq-mllm eval``): exact-match accuracy on VQA, and held-out caption metrics.

An *answerer* is any ``(image path or None, question) -> text`` function: the megatron checkpoint's greedy decoding
(``megatron_ext.vlm.inference.answerer``) or the exported HF folder's (``viq_mllm.hf.answerer``), so the two are
scored by the same code. An answer matches when, lower-cased and without surrounding spaces and final full stop,
it equals the reference answer.

    >>> report = accuracy(answerer, easy_vqa_items("test", limit=500))
    >>> sorted(report)                              # by_kind: yes/no, shape, colour
    ['accuracy', 'by_kind', 'count', 'predictions']

Caption data has no single right answer, so :func:`caption_report` scores captions by the model's loss on them
(``megatron_ext.vlm.inference.caption_scorer``): with the right image vs another image, and caption retrieval
among ``k`` candidates.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Optional

from viq_mllm.console import markdown_table, progress
from viq_mllm.data.easy_vqa import records

Answerer = Callable[[Optional[str], str], str]
# [(image i or None, caption j), ...] -> the mean loss of caption j after image i (None: the caption alone)
CaptionLosses = Callable[[list[tuple[Optional[int], int]]], list[float]]
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
    items = []
    for record in records(split, with_images=with_images, limit=limit):
        human, gpt = record["conversations"]
        items.append({"image": record.get("image"), "question": human["value"].replace("<image>\n", ""),
                      "answer": gpt["value"]})
    return items


def report_table(report: dict) -> str:
    """The accuracy overall and per question kind, as a markdown table."""
    rows = [["all", f"{report['accuracy']:.1%}", str(report["count"])]]
    rows += [[kind, f"{v['accuracy']:.1%}", str(v["count"])] for kind, v in report["by_kind"].items()]
    return markdown_table(["questions", "exact match", "count"], rows)


def right_and_other_pairs(n: int) -> list[tuple[int, int]]:
    """(image, caption) pairs: each of ``n`` samples with its own image, then with another one's (image
    ``(i + n // 2) % n``: half the list away, since in a sorted folder the neighbour is often the same kind of
    picture)."""
    return [(i, i) for i in range(n)] + [((i + n // 2) % n, i) for i in range(n)]


def right_vs_other(values: list[float]) -> dict:
    """The caption losses of :func:`right_and_other_pairs`, summarised: ``loss_right_image``,
    ``loss_other_image`` (means) and ``right_image_lower`` (the fraction where the right image gives the lower
    loss; chance 1/2)."""
    n = len(values) // 2
    right, other = values[:n], values[n:]
    return {"count": n, "loss_right_image": sum(right) / n, "loss_other_image": sum(other) / n,
            "right_image_lower": sum(r < o for r, o in zip(right, other)) / n}


def caption_report(losses: CaptionLosses, n: int, k: int = 10, seed: int = 0) -> dict:
    """Held-out caption metrics of ``n`` one-image samples:

    - :func:`right_vs_other`: ``loss_right_image``, ``loss_other_image`` and ``right_image_lower``;
    - ``retrieval_accuracy``: for each image, its caption among ``k`` candidates (``k - 1`` other captions drawn
      with ``seed``) must score strictly best (chance 1/k). A caption's score is its loss after the image minus
      its loss alone: what the image explains (pointwise mutual information), so that short, common captions do
      not win on their own likelihood.

    >>> caption_report(scorer, n=65, k=10)["retrieval_accuracy"]     # doctest: +SKIP
    0.6
    """
    if k < 2 or n < k:
        raise ValueError(f"caption retrieval among k={k} candidates needs k >= 2 and at least {k} samples, got {n}")
    rng = random.Random(seed)
    others = [rng.sample([j for j in range(n) if j != i], k - 1) for i in range(n)]
    values = losses(right_and_other_pairs(n) + [(None, j) for j in range(n)]
                    + [(i, j) for i in range(n) for j in others[i]])
    report = right_vs_other(values[:2 * n])
    right, alone, rest = values[:n], values[2 * n:3 * n], values[3 * n:]
    wins = 0
    for i in range(n):
        candidates = rest[i * (k - 1):(i + 1) * (k - 1)]
        wins += all(right[i] - alone[i] < loss - alone[j] for loss, j in zip(candidates, others[i]))
    return {**report, "retrieval_k": k, "retrieval_accuracy": wins / n, "retrieval_chance": 1 / k}


def caption_table(report: dict) -> str:
    """:func:`caption_report` as a markdown table."""
    k = report["retrieval_k"]
    return markdown_table(["held-out captions", "value"], [
        ["mean caption loss, right image", f"{report['loss_right_image']:.3f}"],
        ["mean caption loss, another image", f"{report['loss_other_image']:.3f}"],
        ["right image gives the lower loss (chance 50%)", f"{report['right_image_lower']:.0%}"],
        [f"caption retrieval among {k} (chance {1 / k:.0%})", f"{report['retrieval_accuracy']:.0%}"],
        ["samples", str(report["count"])]])
