"""``init.hf``: a VLM run that starts from a Hugging Face LLM folder (Llama / Qwen2), in one recipe.

What the four commands ``extend-vocab``, ``convert hf-to-mcore``, ``resize-vocab`` and ``train`` do by hand, the run
does once, before its first step:

1. the HF folder's tokenizer is extended with the ViQ tokenizer's codes into ``data.vocab``, when that folder does
   not exist yet (``save_pretrained`` keeps the base model's chat template); an existing one must have been built
   from this tokenizer, or the run is refused with both fingerprints;
2. the weights are converted to a megatron checkpoint, and
3. its embedding (and untied output layer) grown to the extended vocabulary, the new rows drawn from the old rows'
   mean and covariance, the code rows scaled for the recipe's ``model.visual.group`` (``vocab_resize.py``;
   TP-safe padding: 128 x 8 rows);

into ``RUN_DIR/init/checkpoint``. ``RUN_DIR/init`` is an artifact (:mod:`viq_mllm.artifact`) whose manifest names
what it was made from: a rerun or a resumed run on the same inputs finds it and does nothing; other inputs rebuild it. Rank 0 builds it in a child process (the conversion is a one-process job
and the run's process groups are already up); the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch.distributed as dist

from viq_mllm import launch
from megatron_ext.convert.hf import hf_to_mcore
from megatron_ext.convert.vocab_resize import VocabMismatch, resize_checkpoint
from megatron_ext.training.parallel import Layout
from megatron_ext.vlm.model import viq_fingerprint
from viq_mllm import artifact
from viq_mllm.recipe import Recipe
from viq_mllm.vocab import Vocab
from viq_mllm.vocab.extend import extend_vocab
from viq_mllm.vocab.ids import VOCAB_FILE
from viq_mllm.vocab.text_tokenizers import hf_tokenizer_fingerprint

log = logging.getLogger(__name__)
KIND = "init-hf"


def init_checkpoint(recipe: Recipe, layout: Layout) -> Path:
    """``RUN_DIR/init/checkpoint`` for ``init.hf``, built by rank 0 when missing or made from other inputs."""
    target = Path(recipe.run.dir) / "init"
    group = recipe.model.visual.group
    spec = _spec(source_record(Path(recipe.init.hf), Path(recipe.model.visual.viq), group))
    if layout.rank == 0 and artifact.check_reuse(target, spec, overwrite=True) is None:
        try:  # a one-process job, and this process already holds the run's process groups
            launch.call("megatron_ext.jobs.init_hf:build", recipe.init.hf, recipe.data.vocab, recipe.model.visual.viq,
                        str(target), group, alone=True)
        except launch.ChildError:
            raise ValueError(f"init.hf={recipe.init.hf}: building the starting checkpoint failed (the error is "
                             "above)") from None
    dist.barrier()
    return target / "checkpoint"


def source_record(hf_dir: Path, viq_dir: Path, group: int) -> dict:
    """What the starting checkpoint depends on: the HF config, its weight files (names and sizes: hashing a 7B
    model's bytes at every start would cost minutes), its tokenizer, the ViQ tokenizer and the codes per visual
    position (the code rows' scale)."""

    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"init.hf={hf_dir}: no config.json (an HF model folder)")
    weights = sorted((p.name, p.stat().st_size) for p in hf_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256(json.dumps([(hf_dir / "config.json").read_text(), weights]).encode()).hexdigest()
    return {"hf": str(hf_dir.resolve()), "weights": digest[:16],
            "tokenizer": hf_tokenizer_fingerprint(hf_dir), "viq": viq_fingerprint(viq_dir), "group": group}


def _spec(source: dict) -> artifact.Spec:
    return artifact.Spec(KIND, 1, source)


def build(hf_dir: str | Path, vocab_dir: str | Path, viq_dir: str | Path, target: str | Path, group: int) -> None:
    """Steps 1-3 of the module, into ``target`` (written beside, then moved in place)."""
    hf_dir, vocab_dir, viq_dir, target = Path(hf_dir), Path(vocab_dir), Path(viq_dir), Path(target)

    if not (vocab_dir / VOCAB_FILE).is_file():
        extend_vocab(hf_dir, viq_dir, vocab_dir)
        log.info("init.hf: extended %s's tokenizer into data.vocab=%s", hf_dir, vocab_dir)
    vocab, tokenizer = Vocab.load(vocab_dir), hf_tokenizer_fingerprint(hf_dir)
    if vocab.text_fingerprint != tokenizer:
        raise VocabMismatch(f"data.vocab={vocab_dir} was built on text tokenizer {vocab.text_fingerprint}, init.hf="
                            f"{hf_dir} has {tokenizer}; point data.vocab at a new folder to extend this one")
    stage = artifact.Staging.begin(target, _spec(source_record(hf_dir, viq_dir, group)))
    hf_to_mcore(hf_dir, stage.path / "converted")
    resize_checkpoint(stage.path / "converted", vocab_dir, stage.path / "checkpoint", group)
    shutil.rmtree(stage.path / "converted")
    stage.seal()

