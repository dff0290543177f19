"""The chat layout: one Jinja chat template lays a conversation out for training, prompting, eval and export.

A conversation is rendered to text as ``transformers``' ``apply_chat_template`` renders it, with the text
tokenizer's ``chat_template``: the base tokenizer's own where it has one (SmolLM2's ChatML), else
:data:`~viq_mllm.vocab.text_tokenizers.DEFAULT_CHAT_TEMPLATE` (``User: ...<eod>Assistant: ...<eod>``); ``export hf``
writes it as the exported ``chat_template``. An
image is written in a message as :data:`IMAGE_TEXT` (``<|image_start|><|image_end|>``, both special tokens of the
extended vocabulary) and the document holds the whole image block there. The text between images is tokenized as
one string, as ``apply_chat_template`` tokenizes it, so an export prompted through ``apply_chat_template`` sees the
ids training saw, once each image's two marker ids are replaced by its block (``tests/test_vlm_hf.py``).

Supervised: the tokens that overlap an assistant message's content, and the end-of-document token that closes it
(a template must close an assistant turn with its tokenizer's eos, generation's stop id; one that does not is
refused before any sample is laid out).

Example, the default template, a 2 x 4 patch grid (two visual positions at ``G = 16``), a bytes-like tokenizer::

    rendered    "User: <|image_start|><|image_end|>What is it?<eod>Assistant: A pig.<eod>"
    positions   U s e r : ␣ <img_start> [v v] <row_end> <img_end> W h a t ... ? <eod> A s s ... : ␣ A ␣ p i g . <eod>
    supervised                                                                                   A ␣ p i g . <eod>
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Optional, Sequence

import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from viq_mllm.data.layout import (IMAGE_PLACEHOLDER, Document, SequenceBuilder, placeholder_problem, turn_role,
                                  turn_text, with_source)
from viq_mllm.vocab.ids import SPECIAL_TOKENS, Vocab
from viq_mllm.vocab.text_tokenizers import TextTokenizer

IMAGE_TEXT = SPECIAL_TOKENS["image_start"] + SPECIAL_TOKENS["image_end"]
_ANSWER = "\ue000{}\ue001"  # an assistant content's place while rendering (private-use code points)
_ANSWER_RE = re.compile("\ue000(\\d+)\ue001")


def chat_layout_id(tokenizer: TextTokenizer) -> str:
    """A short hash of the chat layout (the template and the end-of-document text): prepared data records it."""
    return hashlib.sha256((tokenizer.chat_template + "\0" + tokenizer.eod_text).encode()).hexdigest()[:16]


def chat_document(tokenizer: TextTokenizer, vocab: Vocab, images: Sequence[np.ndarray], turns: list[dict],
                  group: int) -> Document:
    """SFT: ``turns`` of {"from"/"role": ..., "value"/"content": ...}; the k-th ``<image>`` placeholder becomes the
    k-th image's block (a single image with no placeholder opens the first user turn; no image: a text-only
    conversation); the whitespace around a placeholder is dropped. Only assistant answers and the eod closing
    each are supervised."""
    problem = placeholder_problem(turns, len(images))
    if problem is not None:
        raise ValueError(f"a conversation with {problem}")
    if len(images) == 1 and not any(IMAGE_PLACEHOLDER in turn_text(t) for t in turns):
        turns = _with_leading_placeholder(turns)
    messages = [{"role": _role(turn), "content": _content(turn_text(turn))} for turn in turns]
    return _document(tokenizer, vocab, group, messages, list(images), add_generation_prompt=False)


def prompt_document(tokenizer: TextTokenizer, vocab: Vocab, codes: Optional[np.ndarray], prompt: str, group: int,
                    source: Optional[str] = None) -> Document:
    """What generation continues: one user message (the image, then ``prompt``) and the template's generation
    prompt; with no prompt, the image block alone (a captioning model continues with the caption); with no image
    (``codes`` None), the text alone. ``source``: the image's path, recorded as training records it (the
    continuous baseline's pixels)."""
    if not prompt:
        builder = SequenceBuilder(vocab, group)
        builder.image(codes)
        return with_source(builder.build(), source)
    content = (IMAGE_TEXT if codes is not None else "") + prompt.strip()
    document = _document(tokenizer, vocab, group, [{"role": "user", "content": content}],
                         [] if codes is None else [codes], add_generation_prompt=True)
    return with_source(document, source if codes is not None else None)


def _role(turn: dict) -> str:
    role = turn_role(turn)
    if role is None:
        raise ValueError(f"unknown chat role in {turn}; expected 'from' or 'role' to be human/user, gpt/assistant "
                         "or system")
    return role


def _content(text: str) -> str:
    return IMAGE_TEXT.join(piece.strip() for piece in text.split(IMAGE_PLACEHOLDER))


def _with_leading_placeholder(turns: list[dict]) -> list[dict]:
    first_user = next((i for i, t in enumerate(turns) if turn_role(t) == "user"), None)
    if first_user is None:
        raise ValueError("a conversation needs a user turn to hold the image")
    turn = {"from": "user", "value": IMAGE_PLACEHOLDER + turn_text(turns[first_user])}
    return [*turns[:first_user], turn, *turns[first_user + 1:]]


def _document(tokenizer: TextTokenizer, vocab: Vocab, group: int, messages: list[dict], images: list[np.ndarray],
              add_generation_prompt: bool) -> Document:
    text, answers = render(tokenizer, messages, add_generation_prompt)
    builder = SequenceBuilder(vocab, group)
    if text.count(IMAGE_TEXT) != len(images):
        raise ValueError(f"the chat template wrote {text.count(IMAGE_TEXT)} image(s) for {len(images)}: it drops or "
                         f"repeats a message, or a text holds {IMAGE_TEXT!r} itself")
    specials = re.compile(f"({re.escape(IMAGE_TEXT)}|{re.escape(tokenizer.eod_text)})")
    position = 0
    for piece in specials.split(text):
        if piece == IMAGE_TEXT:
            builder.image(images.pop(0))
        elif piece == tokenizer.eod_text:
            builder.text([tokenizer.eod], _overlaps((position, position + len(piece)), answers))
        elif piece:
            ids, spans = tokenizer.encode_offsets(piece)
            for token, (start, end) in zip(ids, spans):
                builder.text([token], _overlaps((position + start, position + end), answers))
        position += len(piece)
    return builder.build()


def render(tokenizer: TextTokenizer, messages: list[dict], add_generation_prompt: bool
           ) -> tuple[str, list[tuple[int, int]]]:
    """``messages`` as the chat template writes them, and the character span of each assistant content with the
    eod that closes it (what training supervises)."""
    slotted = [{**m, "content": _ANSWER.format(k)} if m["role"] == "assistant" else m for k, m in enumerate(messages)]
    rendered = _template(tokenizer.chat_template).render(
        messages=slotted, add_generation_prompt=add_generation_prompt, eos_token=tokenizer.eod_text,
        bos_token=tokenizer.bos_text)
    parts = _ANSWER_RE.split(rendered)  # literal, message index, literal, ...
    written = [int(index) for index in parts[1::2]]
    expected = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if written != expected:
        raise ValueError(f"the chat template wrote the answers of messages {written}, not each of {expected} once: "
                         "an answer it drops or repeats would be trained wrong")
    text, answers = parts[0], []
    for index, literal in zip(parts[1::2], parts[2::2]):
        if not literal.startswith(tokenizer.eod_text):
            raise ValueError(f"the chat template does not close an assistant message with {tokenizer.eod_text!r} "
                             "(the tokenizer's eos, where generation stops); training could not teach the model to "
                             "stop")
        start = len(text)
        text += messages[int(index)]["content"]
        answers.append((start, len(text) + len(tokenizer.eod_text)))
        text += literal
    return text, answers


def _overlaps(span: tuple[int, int], answers: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in answers)


@functools.lru_cache(maxsize=8)
def _template(source: str):
    """A compiled template, in the environment ``transformers`` renders chat templates in."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = _raise
    return environment.from_string(source)


def _raise(message: str) -> None:
    raise ValueError(f"the chat template refused the conversation: {message}")
