"""Checkpoints with megatron-core ``dist_checkpointing``: model, optimizer, LR schedule, step and RNG states.

Layout under ``run.dir/checkpoints``::

    step_00000003/        a dist_checkpointing directory (torch_dist format, any TP/PP can read the model)
    latest                text file naming the newest *complete* checkpoint

``latest`` is replaced atomically only after every rank has finished writing, so a run killed mid-save
(SIGKILL included) resumes from the previous complete checkpoint; the partial directory is removed then.
The data position is the step number itself (the sample order is a pure function of seed and position).
RNG states are saved per rank and restored when the world size matches.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from pydantic import BaseModel, ConfigDict

from viq_mllm.recipe import ModelSection

_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
META_FILE = "model.json"


class VocabRecord(BaseModel):
    """A checkpoint's embedding rows: ``text_size`` text ids, ``padded_size`` rows in all, and the fingerprints
    of the text tokenizer, extended vocabulary and ViQ tokenizer it was trained with (None where one does not
    apply); a VLM's also names the folders of its vocabulary and ViQ tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    text_size: int
    padded_size: int
    text_fingerprint: Optional[str] = None
    vocab_fingerprint: Optional[str] = None
    viq_fingerprint: Optional[str] = None
    vocab_dir: Optional[str] = None
    viq_dir: Optional[str] = None


class CheckpointMeta(BaseModel):
    """``model.json``, what every checkpoint holds besides its tensors: the network (``model``), the embedding
    rows (``vocab``), and where a conversion came from (the HF ``config.json``, the layout it was checked for,
    the checkpoint a vocabulary resize started from)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: ModelSection
    vocab: VocabRecord
    hf_config: Optional[dict] = None
    converted_for: Optional[dict] = None
    resized_from: Optional[str] = None


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _numpy_state() -> tuple:
    """numpy's state with its array as a tensor, so the checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, scheduler, step: int, counters: dict, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    rank, world = dist.get_rank(), dist.get_world_size()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "counters": dict(counters),
        "world_size": world,
        "rng": ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0),
    }


def save(ckpt_root: Path, step: int, model, optimizer, scheduler, keep_last: int, counters: dict,
         meta: CheckpointMeta) -> Path:
    """Write ``step_XXXXXXXX`` (with ``model.json`` = ``meta``) and point ``latest`` at it; keep the newest
    ``keep_last`` checkpoints."""
    path = ckpt_root / f"step_{step:08d}"
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, step, counters, is_loading=False), str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        write_meta(path, meta)
        tmp = ckpt_root / "latest.tmp"
        tmp.write_text(path.name)
        tmp.replace(ckpt_root / "latest")
        for old in sorted(ckpt_root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def write_meta(path: Path, meta: CheckpointMeta) -> None:
    (path / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2, sort_keys=True))


def read_meta(path: Path) -> CheckpointMeta:
    file = Path(path) / META_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {META_FILE}; is this a checkpoint directory (checkpoints/step_XXXXXXXX)?")
    return CheckpointMeta.model_validate(json.loads(file.read_text()))


def save_model(path: Path, model, meta: CheckpointMeta) -> None:
    """A model-only checkpoint (e.g. after a vocabulary resize), loadable at any TP/PP by :func:`load_model`."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(path))
    if dist.get_rank() == 0:
        write_meta(path, meta)
    dist.barrier()


def load_model(path: Path, model) -> None:
    """Load only the model weights of any checkpoint written by :func:`save` or :func:`save_model`."""
    with torch.no_grad():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"])


def latest(ckpt_root: Path) -> Optional[Path]:
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def remove_incomplete(ckpt_root: Path) -> None:
    """Delete step directories newer than ``latest`` (left by a run killed while saving)."""
    if dist.get_rank() == 0 and ckpt_root.is_dir():
        done = latest(ckpt_root)
        for path in ckpt_root.glob("step_*"):
            if done is None or path.name > done.name:
                shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam step count, the one its group was saved with.

    megatron's distributed optimizer over torch's Adam (no apex / TE: the CPU, and GPUs without them) keeps the
    step in its param groups; loading leaves all parameters sharing one step tensor, and one holding the loading
    template's value (1), so torch's Adam bias-corrected with the wrong step and advanced the shared count once per
    parameter: a resumed run drifted from the uninterrupted one from its first update on."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if "step" not in group:  # torch's own layout (the non-distributed optimizers): already per parameter
                continue
            for param in group["params"]:
                state = inner.state.get(param, {})
                if "step" in state:
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def load(path: Path, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore everything saved by :func:`save` into freshly built objects; returns (step, counters)."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):  # megatron returns a ChainedOptimizer
        if hasattr(part, "_init_optimizer_states_with_dummy_values"):  # the distributed optimizer's state is
            part._init_optimizer_states_with_dummy_values()  # allocated lazily; loading fills it in place
    sharded = _sharded_state(model, optimizer, scheduler, 0, {}, is_loading=True)
    same_world = common["world_size"] == dist.get_world_size()
    if not same_world:
        sharded.pop("rng")
    with torch.no_grad():  # the distributed optimizer copies into views of the (fp32) parameters
        state = dist_checkpointing.load(sharded, str(path))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if same_world:
        _set_rng_state(state["rng"])
    return int(state["step"]), dict(state["counters"])
