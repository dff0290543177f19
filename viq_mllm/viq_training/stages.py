"""The ViQ training stages and the hand-off of weights from one stage to the next.

=========  ==========================  ==============================================  ======================
stage      quantizer in the tokenizer  trained                                         losses
=========  ==========================  ==============================================  ======================
stage1     none used (ViT only)        ViT + MAP head, projector                       text, distill
proximal   L-infinity bottleneck       ViT, head, pixel decoder, projector             text, distill, rec
fsq        head-wise FSQ               ViT (``train_encoder``), head, decoder, proj.   text, distill, rec
decoder    head-wise FSQ (frozen)      pixel decoder only                              rec (+ perceptual)
=========  ==========================  ==============================================  ======================

Every stage starts from the previous stage's tokenizer (``init.from``). Between ``proximal`` and ``fsq`` the
quantizer changes, so some parameters change shape or appear; :func:`carry_over` loads every parameter that
still exists under an explicit rename table and re-initialises exactly the others, and reports both (the
release loaded with ``strict=False`` and crashed on the changed shapes, reference section 9.4)::

    proximal: head.bottleneck.project_in/out     -> dropped (the L-infinity bottleneck)
              head.post.*                        -> head.embedder.post.* (the merge and residual MLPs)
    fsq:      head.rope_blocks.*, head.project_in, head.embedder.project_out  -> fresh (FSQ-only modules)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from viq_mllm.viq.config import ViQConfig
from viq_mllm.viq.tokenizer import ViQTokenizer

STAGES = ("stage1", "proximal", "fsq", "decoder")
QUANTIZER = {"stage1": "proximal", "proximal": "proximal", "fsq": "fsq", "decoder": "fsq"}
#: Parameter prefixes renamed when a proximal-stage state dict enters an FSQ-stage tokenizer.
RENAMES = {"proximal->fsq": {"head.post.": "head.embedder.post."}}


class HandoffError(ValueError):
    """Two stages' tokenizers that cannot hand off weights (another architecture, or a shape clash)."""


@dataclass
class Handoff:
    """What :func:`carry_over` did: target keys loaded (with their source key), re-initialised, and dropped."""

    loaded: dict[str, str] = field(default_factory=dict)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def modules(keys: list[str]) -> str:
            return ", ".join(sorted({k.rsplit(".", 1)[0] for k in keys})) or "none"

        return (f"loaded {len(self.loaded)} tensors, re-initialised {len(self.reinitialised)} "
                f"({modules(self.reinitialised)}), dropped {len(self.dropped)} ({modules(self.dropped)})")


def stage_config(config: ViQConfig, stage: str) -> ViQConfig:
    """The tokenizer architecture a stage trains: the same trunk and head sizes, the stage's quantizer."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: choose one of {', '.join(STAGES)}")
    return dataclasses.replace(config, quantizer=QUANTIZER[stage])


def carry_over(source: ViQTokenizer, target: ViQTokenizer) -> Handoff:
    """Load ``source``'s weights into ``target`` (same architecture; the quantizer may switch proximal -> fsq).

    Same quantizer: every tensor must load (a strict load). proximal -> fsq: the rename table above; a target
    tensor whose source is missing keeps ``target``'s fresh initialisation; a shape clash is an error.
    """
    a, b = source.config, target.config
    if dataclasses.replace(a, quantizer=b.quantizer) != b:
        differing = [f.name for f in dataclasses.fields(a)
                     if f.name != "quantizer" and getattr(a, f.name) != getattr(b, f.name)]
        raise HandoffError(f"the tokenizers differ in {differing}: a stage continues the previous stage's "
                           "architecture")
    direction = f"{a.quantizer}->{b.quantizer}"
    if a.quantizer != b.quantizer and direction not in RENAMES:
        raise HandoffError(f"no hand-off from a {a.quantizer} tokenizer to a {b.quantizer} one (stages run in order "
                           f"{' -> '.join(STAGES)})")
    renames = RENAMES.get(direction, {})
    src = source.state_dict()
    report, state = Handoff(), target.state_dict()
    for key in state:
        origin = _source_key(key, renames)
        if origin not in src:
            report.reinitialised.append(key)
            continue
        if src[origin].shape != state[key].shape:
            raise HandoffError(f"{origin} {tuple(src[origin].shape)} -> {key} {tuple(state[key].shape)}: "
                               "shapes differ")
        state[key] = src[origin]
        report.loaded[key] = origin
    report.dropped = sorted(set(src) - set(report.loaded.values()))
    if not renames and (report.reinitialised or report.dropped):
        raise HandoffError(f"same quantizer but tensors do not match: {report.summary()}")
    target.load_state_dict(state, strict=True)
    return report


def _source_key(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(new):
            return old + key[len(new):]
    return key


def tokenizer_for_stage(stage: str, previous: ViQTokenizer | None, config: ViQConfig, seed: int
                        ) -> tuple[ViQTokenizer, Handoff | None]:
    """The tokenizer a stage starts from: the previous stage's carried over, or a fresh ``config``."""
    torch.manual_seed(seed)
    base = previous.config if previous is not None else config
    model = ViQTokenizer(stage_config(base, stage))
    report = carry_over(previous, model) if previous is not None else None
    return model, report


def trainable(model: ViQTokenizer, stage: str, train_encoder: bool = True) -> list[str]:
    """Set ``requires_grad`` for a stage (see the table above); returns the trained top-level parts."""
    parts = {"stage1": ["vit"], "proximal": ["vit", "head", "decoder"], "fsq": ["vit", "head", "decoder"],
             "decoder": ["decoder"]}[stage]
    if not train_encoder and stage in ("proximal", "fsq"):
        parts = [p for p in parts if p != "vit"]
    model.requires_grad_(False)
    for name in parts:
        getattr(model, name).requires_grad_(True)
    return parts
