"""easy-VQA as LLaVA-style records: a small visual question answering set that installs offline.

The ``easy-vqa`` wheel on PyPI ships 5,000 64 x 64 images of one coloured shape each (4,000 train, 1,000 test) and
questions about them (38,575 train, 9,673 test; 13 answers: the shape, its colour, yes / no). Each question becomes
one conversation record for ``viq-mllm tokenize``; the text-only records (the same questions, no image) train the
language prior a VLM must beat.

    >>> paths = write_records("runs/easy_vqa")            # train.json, test.json, train_text_only.json
    >>> json.loads(paths["test"].read_text())[0]["conversations"][1]
    {'from': 'gpt', 'value': 'rectangle'}

The wheel is read where it is installed (``pip install --no-deps easy-vqa``), never imported: it also installs a
top-level ``test`` package.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SPLITS = ("train", "test")


def data_root() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the easy-vqa wheel is missing: `pip install --no-deps easy-vqa` (the Makefile does)")
    return Path(spec.origin).parent / "data"


def questions(split: str) -> list[tuple[str, str, int]]:
    """``(question, answer, image id)`` of a split, in the wheel's order."""
    if split not in SPLITS:
        raise ValueError(f"easy-vqa split {split!r}: expected one of {SPLITS}")
    return [tuple(q) for q in json.loads((data_root() / split / "questions.json").read_text())]


def records(split: str, with_images: bool = True, limit: int | None = None) -> list[dict]:
    """One LLaVA-style record per question (the first ``limit``): ``<image>`` then the question; the answer."""
    images = data_root() / split / "images"
    out = []
    for i, (question, answer, image) in enumerate(questions(split)[:limit]):
        asked = f"<image>\n{question}" if with_images else question
        record = {"id": f"{split}-{i}", "conversations": [{"from": "human", "value": asked},
                                                          {"from": "gpt", "value": answer}]}
        out.append({**record, "image": str(images / f"{image}.png")} if with_images else record)
    return out


def write_records(out: str | Path, limit: int | None = None) -> dict[str, Path]:
    """``train.json``, ``test.json`` and ``train_text_only.json`` (the prior) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": records("train", limit=limit), "test": records("test", limit=limit),
             "train_text_only": records("train", with_images=False, limit=limit)}
    paths = {}
    for name, items in files.items():
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(items, indent=0))
    return paths
