"""What a ViQ stage reads and writes: the tokenizer it starts from, the tokenizer it leaves, its evaluation.

A stage's run directory ends with::
    RUN_DIR/tokenizer/            a loadable ViQTokenizer (config.json + model.safetensors) ...
    RUN_DIR/tokenizer/adapters.safetensors   ... plus the LLM-side projector (and distillation projection)
    RUN_DIR/handoff.json          what was carried over from init.from, re-initialised, dropped
    RUN_DIR/eval.json, eval.png   held-out PSNR / SSIM vs the mean-colour-per-patch baseline, and the grid

The next stage's ``init.from=RUN_DIR`` reads ``RUN_DIR/tokenizer`` (and its adapters when shapes match).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file
from torch import nn

from viq_mllm.data.captioned import load_captioned
from viq_mllm.recipe import Recipe
from viq_mllm.viq.config import config_for
from viq_mllm.viq.preprocess import Preprocessed
from viq_mllm.viq.tokenizer import ViQTokenizer
from viq_mllm.viq_training.reconstruction import evaluate_reconstruction, plot_reconstructions
from viq_mllm.viq_training.stages import Handoff, tokenizer_for_stage

ADAPTERS_FILE = "adapters.safetensors"


def starting_tokenizer(recipe: Recipe) -> tuple[ViQTokenizer, Optional[Handoff]]:
    """The stage's tokenizer: ``init.from``'s (carried over), ``init.viq``'s, or a fresh one of the recipe's
    architecture and preset."""
    v, init = recipe.viq, recipe.init
    previous = None
    if init.from_ is not None:
        previous = ViQTokenizer.from_pretrained(Path(init.from_) / "tokenizer")
    elif init.viq is not None:
        previous = ViQTokenizer.from_pretrained(init.viq)
    config = config_for(v.architecture, preset=v.preset, proximal_width=v.proximal_width)
    return tokenizer_for_stage(v.stage, previous, config, recipe.train.seed)


def load_adapters(recipe: Recipe, modules: dict[str, nn.Module]) -> list[str]:
    """Load ``init.from``'s adapters into ``modules`` where names and shapes match; returns what was loaded."""
    if recipe.init.from_ is None:
        return []
    path = Path(recipe.init.from_) / "tokenizer" / ADAPTERS_FILE
    if not path.is_file():
        return []
    saved, loaded = load_file(str(path)), []
    for name, module in modules.items():
        if module is None:
            continue
        state = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}
        own = module.state_dict()
        if state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own):
            module.load_state_dict(state)
            loaded.append(name)
    return loaded


def save_stage(run_dir: Path, tokenizer: ViQTokenizer, adapters: dict[str, Optional[nn.Module]],
               handoff: Optional[Handoff]) -> Path:
    state = {f"{name}.{k}": v for name, m in adapters.items() if m is not None for k, v in m.state_dict().items()}
    out = tokenizer.save_pretrained(Path(run_dir) / "tokenizer", {ADAPTERS_FILE: state} if state else None)
    if handoff is not None:
        (Path(run_dir) / "handoff.json").write_text(json.dumps(
            {"loaded": handoff.loaded, "reinitialised": handoff.reinitialised, "dropped": handoff.dropped}, indent=2))
    return out


def evaluate_stage(run_dir: Path, tokenizer: ViQTokenizer, images: list[Preprocessed], extra: dict) -> dict:
    """Held-out reconstruction numbers into ``eval.json`` and the originals-vs-reconstructions ``eval.png``."""

    result = {**extra}
    if images:
        result["reconstruction"] = evaluate_reconstruction(tokenizer, images)
        plot_reconstructions(tokenizer, images[:8], Path(run_dir) / "eval.png",
                             title=f"reconstructed ({tokenizer.config.quantizer})")
    (Path(run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def held_out_images(recipe: Recipe, tokenizer: ViQTokenizer) -> list[Preprocessed]:
    if recipe.viq.eval_images is None:
        return []
    cfg = tokenizer.config
    data = load_captioned([recipe.viq.eval_images], None, cfg.image_base, cfg.max_pixels, need_captions=False)
    return data.preprocessed()

