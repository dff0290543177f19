"""lmms-eval's model for an exported VLM folder (``viq-mllm export hf``): the stock causal LM, no vision tower.

    lmms-eval --model viq_mllm --model_args pretrained=runs/vlm_hf --tasks ...

Registered through lmms-eval's ``lmms_eval.models`` entry point (pyproject.toml), so installing viq-mllm beside
lmms-eval is all it takes. lmms-eval declares torchvision and timm, which do not install beside every torch build;
its evaluation API needs neither: ``pip install --no-deps lmms-eval`` and ``pip install loguru pytz``.

A request is prompted as training's documents are (:mod:`viq_mllm.hf`): the task's image (at most one: the
exported layout has one image block per prompt), then its text with any ``<image>`` placeholder removed.
``generate_until`` decodes greedily and cuts at the task's ``until`` strings; ``loglikelihood`` scores the
continuation's text ids after the prompt.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from viq_mllm import hf
from viq_mllm.data.layout import IMAGE_PLACEHOLDER

MODEL_ID = "viq_mllm"


def manifest() -> ModelManifest:
    """The entry point's payload: ``--model viq_mllm`` resolves to :class:`ViQMLLM`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.ViQMLLM")


class ViQMLLM(lmms):
    """``pretrained``: an exported folder; ``max_new_tokens``: the default when a task's ``generation_kwargs``
    name none. Other lmms-eval arguments (``batch_size``, ``device``) are accepted; requests run one at a time
    on CPU or the model's device."""

    is_simple = True

    def __init__(self, pretrained: str, max_new_tokens: int = 32, device: Optional[str] = None, **_: Any):
        super().__init__()
        self.folder = str(pretrained)
        self.model = hf.load_model(self.folder)
        if device:
            self.model.to(device)
        self.layout = hf.ExportedLayout.load(self.folder)
        self.max_new_tokens = int(max_new_tokens)

    def _image(self, doc_to_visual, doc_id: int, task: str, split: str):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"{task}/{split} document {doc_id}: {len(visuals)} images; an exported viq-mllm "
                             "model is prompted with one image block")
        return visuals[0] if visuals else None

    def generate_until(self, requests) -> list[str]:
        answers = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            until = gen_kwargs.get("until") or []
            _, text = hf.generate(self.folder, self._image(doc_to_visual, doc_id, task, split), _prompt(context),
                                  int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), self.model)
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop)[0]
            answers.append(text)
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scores = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            continuation = (doc_to_target if isinstance(doc_to_target, str)
                            else doc_to_target(self.task_dict[task][split][doc_id]))
            image = self._image(doc_to_visual, doc_id, task, split)
            prompt = hf.prompt_ids(self.folder, image, _prompt(context))
            target = self.layout.text.encode(continuation)
            embeds = hf.inputs_embeds(self.model, prompt + target, self.folder)
            prompt_positions = embeds.shape[1] - len(target)  # the continuation is text: one position per id
            logits = self.model(inputs_embeds=embeds).logits[0, prompt_positions - 1:-1].float()
            expected = torch.tensor(target, device=logits.device)
            logprob = torch.log_softmax(logits, -1).gather(1, expected[:, None]).sum()
            scores.append((float(logprob), bool((logits.argmax(-1) == expected).all())))
        return scores

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("viq_mllm answers single-round requests (generate_until, loglikelihood)")


def _prompt(context: str) -> str:
    return context.replace(IMAGE_PLACEHOLDER, "").strip()
