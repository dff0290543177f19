"""Checkpoints with megatron-core ``dist_checkpointing``: model, optimizer, LR schedule, step and RNG states.

Layout under ``run.dir/checkpoints``::

    step_00000003/        a dist_checkpointing directory (torch_dist format, any TP/PP can read the model),
                          with model.json and manifest.json (an artifact, :mod:`viq_mllm.artifact`)
    latest                text file naming the newest *complete* checkpoint

Every rank writes into ``step_00000003.partial/``; rank 0 then hashes the files, writes the manifest, renames the
folder into place and replaces ``latest``, so a run killed mid-save (SIGKILL included) resumes from the previous
complete checkpoint, and the partial folder is removed then. Every load checks the files against the manifest
(sizes, and sha256 with the files split over the ranks, the verdicts shared): a flipped byte is refused, never
loaded.
The data position is the step number itself (the sample order is a pure function of seed and position).
RNG states are saved per rank and restored when the world size matches.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from pydantic import BaseModel, ConfigDict

from viq_mllm import artifact
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


Model = Union[torch.nn.Module, list[torch.nn.Module]]


def _model_state(model: Model) -> dict:
    """The sharded state dict of a model, or of a rank's virtual-pipeline chunks (``model0``, ``model1``, ...:
    Megatron-LM's layout). The tensors' keys are global (layer numbers counted over the whole network), so a
    checkpoint written with virtual stages loads into a model without them (tested) and at another TP / PP."""
    chunks = model if isinstance(model, list) else [model]
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _load_model_state(model: Model, state: dict) -> None:
    """The inverse of :func:`_model_state`."""
    chunks = model if isinstance(model, list) else [model]
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"])


def _sharded_state(model: Model, optimizer, scheduler, step: int, counters: dict, is_loading: bool) -> dict:
    model_sd = _model_state(model)
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


KIND = "checkpoint"
SCHEMA = 1


def _spec(meta: CheckpointMeta) -> artifact.Spec:
    made_from = {k: v for k, v in meta.vocab.model_dump().items() if k.endswith("fingerprint") and v is not None}
    return artifact.Spec(KIND, SCHEMA, made_from, {})


def _publish(path: Path, meta: CheckpointMeta, state: dict, summary: dict) -> None:
    """Every rank writes ``state`` into the staging folder of ``path`` and hashes its share of the files; rank 0
    adds ``model.json`` and seals with every rank's checksums."""
    stage = artifact.Staging(path, _spec(meta))
    if dist.get_rank() == 0:
        stage = artifact.Staging.begin(path, _spec(meta))
    dist.barrier()
    dist_checkpointing.save(state, str(stage.path))
    dist.barrier()
    records = _hashed_by_all(stage.path)
    if dist.get_rank() == 0:
        stage.write_json(META_FILE, meta.model_dump(mode="json"))
        stage.seal(summary, records)


def _share(names: list[str]) -> list[str]:
    """This rank's share of ``names`` (every world-size-th one): hashing a large checkpoint is split over the ranks
    (sha256 runs at ~1 GB/s a core), as writing it is."""
    return names[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else names


def _hashed_by_all(folder: Path) -> dict[str, dict]:
    """The checksums of every file in ``folder``, each rank hashing its share, gathered on every rank."""
    mine = {name: artifact.file_record(folder / name) for name in _share(artifact.files_in(folder))}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: record for part in gathered for name, record in part.items()}


def save(ckpt_root: Path, step: int, model: Model, optimizer, scheduler, keep_last: int, counters: dict,
         meta: CheckpointMeta) -> Path:
    """Write ``step_XXXXXXXX`` (with ``model.json`` = ``meta``) and point ``latest`` at it; keep the newest
    ``keep_last`` checkpoints."""
    path = ckpt_root / f"step_{step:08d}"
    state = _sharded_state(model, optimizer, scheduler, step, counters, is_loading=False)
    _publish(path, meta, state, {"step": step, **counters})
    if dist.get_rank() == 0:
        artifact.write_atomic(ckpt_root / "latest", path.name.encode())
        for old in artifact.steps(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def read_meta(path: Path) -> CheckpointMeta:
    """A checkpoint's ``model.json``, after the cheap check that every file is there at its recorded size (and
    that ``model.json`` itself is intact)."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {META_FILE}; is this a checkpoint directory (checkpoints/step_XXXXXXXX)?")
    artifact.verify(path, kind=KIND, hashed=(META_FILE,))
    return CheckpointMeta.model_validate(json.loads(file.read_text()))


def verify_for_loading(path: Path) -> None:
    """Full check before loading: every file at its size, and its sha256, each rank hashing its share of the
    files; the verdicts are gathered so every rank refuses alike (no rank loads a damaged checkpoint, none waits
    for one that refused)."""
    names = sorted(artifact.read_manifest(path)["files"])
    try:
        artifact.verify(path, kind=KIND, hashed=tuple(_share(names)))
        verdict = None
    except artifact.ArtifactError as error:
        verdict = str(error)
    verdicts = [verdict]
    if dist.is_initialized() and dist.get_world_size() > 1:
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, verdict)
    problems = sorted({v for v in verdicts if v is not None})
    if problems:
        raise artifact.DamagedArtifact("; ".join(problems))


def save_model(path: Path, model: Model, meta: CheckpointMeta) -> None:
    """A model-only checkpoint (e.g. after a vocabulary resize), loadable at any TP/PP by :func:`load_model`."""
    _publish(Path(path), meta, {"model": _model_state(model)}, {})
    dist.barrier()


def load_model(path: Path, model: Model) -> None:
    """Load only the model weights of any checkpoint written by :func:`save` or :func:`save_model`."""
    verify_for_loading(path)
    with torch.no_grad():
        state = dist_checkpointing.load({"model": _model_state(model)}, str(path))
    _load_model_state(model, state["model"])


def latest(ckpt_root: Path) -> Optional[Path]:
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


SUSPECT = ".nonfinite"


def set_aside_from(ckpt_root: Path, step: int) -> str:
    """Rename the checkpoints of ``step`` and later to ``step_XXXXXXXX.nonfinite`` (kept for inspection, never
    resumed from) and point ``latest`` at the newest one before; returns what was done, for the run's error."""
    suspect = [p for p in artifact.steps(ckpt_root) if int(p.name[5:]) >= step]
    if dist.get_rank() == 0:
        for path in suspect:
            shutil.rmtree(path.with_name(path.name + SUSPECT), ignore_errors=True)
            path.rename(path.with_name(path.name + SUSPECT))
        kept = artifact.steps(ckpt_root)
        if kept:
            artifact.write_atomic(ckpt_root / "latest", kept[-1].name.encode())
        elif (ckpt_root / "latest").exists():
            (ckpt_root / "latest").unlink()
    dist.barrier()
    kept = artifact.steps(ckpt_root)
    where = f"a rerun resumes from {kept[-1].name}" if kept else "no checkpoint before it: a rerun starts afresh"
    moved = f"{', '.join(p.name for p in suspect)} hold the parameters that went non-finite: set aside as " \
            f"*{SUSPECT}; " if suspect else ""
    return moved + where


def remove_incomplete(ckpt_root: Path) -> None:
    """Delete what a run killed while saving left: staging folders, and step folders newer than ``latest``."""
    if dist.get_rank() == 0 and ckpt_root.is_dir():
        done = latest(ckpt_root)
        for path in ckpt_root.glob("step_*"):
            if path.name.endswith(SUSPECT):
                continue
            if path.name.endswith(artifact.PARTIAL) or done is None or path.name > done.name:
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


def load(path: Path, model: Model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore everything saved by :func:`save` into freshly built objects; returns (step, counters)."""
    verify_for_loading(path)
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
        _load_model_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if same_world:
        _set_rng_state(state["rng"])
    return int(state["step"]), dict(state["counters"])
