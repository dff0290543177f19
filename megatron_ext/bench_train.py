"""``viq-mllm bench train``: tokens/s of our megatron-core training step vs HF transformers' LlamaForCausalLM.

Same shapes (RMSNorm, SwiGLU, RoPE, GQA, tied embeddings, same padded vocabulary), same batch, AdamW with the
same hyper-parameters and gradient clipping, fp32, one process, on the GPU when there is one (both sides, timed
between synchronizations), else the CPU. HF's optimizer is HF Trainer's default (torch's fused AdamW,
``adamw_torch_fused`` since torch 2.8); megatron's is TE's or apex's FusedAdam where installed, the same torch
kernel otherwise (``megatron_ext.apex_free``). The two steps alternate round by round
so machine noise hits both alike; the table reports the medians over rounds and the ratio ours / HF of each round
(median and interquartile range). HF's step runs outside megatron_ext's CPU redirection mode, as it would in a
process of its own.

Each step is timed in two phases, to show where a difference lies: *gradients* (zeroing, forward with the loss,
backward; ours also megatron's ``finalize_model_grads``) and *update* (clipping and the AdamW step; ours also the
LR schedule).

On CPU, glibc's allocator returns large freed blocks to the system and the next step page-faults them back in
(~1 us per 4 KB). How often depends on each side's allocation pattern (HF's loss allocates three logits-sized
buffers per step, megatron's works in place), so ``--keep-freed-memory`` reruns the comparison with freed memory
kept in the process, where neither side faults: the control that separates allocator effects from compute.
The phase table counts each side's minor page faults per step, so a run shows which side paid them.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics

import torch

from megatron_ext import cpu_compat
from megatron_ext.model import build_gpt, transformer_config
from megatron_ext.parallel import device, init_distributed, shutdown
from megatron_ext.training import build_trainer, forward_backward, optimizer_step
from viq_mllm.bench_report import markdown_table, publish, timed, write_json
from viq_mllm.recipe import recipe_from_dict

CONFIGS = {
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4, num_query_groups=2,
                 vocab=1024, seq_length=256, micro_batch=8),
    "20M": dict(num_layers=6, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8, num_query_groups=4,
                vocab=8192, seq_length=256, micro_batch=4),
    # SmolLM2's vocabulary (the demo's LLM) and proportions: two thirds of the parameters in the tied embedding,
    # the output layer and the loss a large share of the step, as in small LLMs with real tokenizers
    "20M-V49k": dict(num_layers=10, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4, num_query_groups=2,
                     vocab=49152, seq_length=256, micro_batch=4),
}


def _recipe(cfg: dict, steps: int):
    model = {k: cfg[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                 "num_query_groups", "seq_length")}
    return recipe_from_dict({
        "run": {"dir": "/tmp/viq-bench-unused"},
        "model": {**model, "qkv_bias": False, "tie_embeddings": True},
        "train": {"steps": steps, "micro_batch_size": cfg["micro_batch"], "global_batch_size": cfg["micro_batch"],
                  "lr": 1e-4, "min_lr": 1e-4, "weight_decay": 0.1, "clip_grad": 1.0},
        "log": {"wandb": "disabled", "tensorboard": False, "progress": False},
    })


def _hf_model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_query_groups"], max_position_embeddings=cfg["seq_length"], rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def bench_config(name: str, cfg: dict, rounds: int, layout) -> dict:
    recipe = _recipe(cfg, steps=rounds + 10)
    ours = build_trainer(recipe, layout, build_gpt(transformer_config(recipe.model, recipe.parallel, recipe.train),
                                                   recipe.model, recipe.parallel, cfg["vocab"], layout, 0),
                         {"text_size": cfg["vocab"], "padded_size": cfg["vocab"], "text_fingerprint": "random"})
    dev = device()
    hf = _hf_model(cfg).to(dev)
    decay = [p for p in hf.parameters() if p.dim() > 1]  # megatron (and HF Trainer) spare norms and biases
    hf_opt = torch.optim.AdamW([{"params": decay}, {"params": [p for p in hf.parameters() if p.dim() == 1],
                                                    "weight_decay": 0.0}],
                               lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    b, s = cfg["micro_batch"], cfg["seq_length"]
    tokens = torch.randint(0, cfg["vocab"], (b, s + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s, device=dev),
             "position_ids": torch.arange(s, device=dev).expand(b, s)}

    def hf_gradients():
        hf_opt.zero_grad(set_to_none=True)
        hf(input_ids=batch["tokens"], labels=tokens[:, :-1].clone()).loss.backward()  # HF shifts labels itself

    def hf_update():
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    sides = {"ours": (lambda: forward_backward(ours, iter([batch])), lambda: optimizer_step(ours)),
             "hf": (cpu_compat.native(hf_gradients), cpu_compat.native(hf_update))}
    times = {key: {"gradients": [], "update": []} for key in sides}
    faults = {key: [] for key in sides}  # minor page faults per step: memory the allocator had given back
    for round_ in range(rounds + 2):  # two warm-up rounds
        for key, phases in sides.items():
            before = _minor_faults()
            seconds = [timed(fn) for fn in phases]
            if round_ >= 2:
                faults[key].append(_minor_faults() - before)
                for phase, value in zip(("gradients", "update"), seconds):
                    times[key][phase].append(value)
    step = {key: [g + u for g, u in zip(t["gradients"], t["update"])] for key, t in times.items()}
    low, ratio, high = statistics.quantiles([h / o for o, h in zip(step["ours"], step["hf"])], n=4)
    median_ms = {key: {phase: 1e3 * statistics.median(v) for phase, v in t.items()} for key, t in times.items()}
    params = sum(p.numel() for p in hf.parameters())
    return {"config": name, "params": params, "tokens_per_step": b * s,
            "ours_tokens_per_s": b * s / statistics.median(step["ours"]),
            "hf_tokens_per_s": b * s / statistics.median(step["hf"]), "ratio_ours_over_hf": ratio,
            "ratio_quartiles": [low, high], "phase_median_ms": median_ms, "rounds": rounds,
            "median_page_faults_per_step": {key: statistics.median(v) for key, v in faults.items()},
            "device": str(dev), "threads": torch.get_num_threads()}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def format_table(rows: list[dict]) -> str:
    throughput = markdown_table(
        ["config", "params", "tokens/step", "ours tok/s", "HF tok/s", "ours / HF", "quartiles"],
        [[r["config"], f"{r['params'] / 1e6:.2f}M", str(r["tokens_per_step"]), f"{r['ours_tokens_per_s']:.0f}",
          f"{r['hf_tokens_per_s']:.0f}", f"{r['ratio_ours_over_hf']:.3f}x",
          "{:.3f}-{:.3f}".format(*r["ratio_quartiles"])] for r in rows])
    phases = markdown_table(
        ["config", "gradients ours (ms)", "gradients HF (ms)", "update ours (ms)", "update HF (ms)",
         "page faults ours", "page faults HF"],
        [[r["config"]] + [f"{r['phase_median_ms'][side][phase]:.1f}" for phase in ("gradients", "update")
                          for side in ("ours", "hf")]
         + [f"{r['median_page_faults_per_step'][side]:.0f}" for side in ("ours", "hf")] for r in rows])
    return f"{throughput}\n\nMedian time per phase and minor page faults per step:\n\n{phases}"


def keep_freed_memory() -> None:
    """Make glibc keep freed memory in the process (no heap trimming, no mmap per large block); glibc only."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 30)):
        raise OSError("glibc's mallopt refused the trim / mmap thresholds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viq-mllm bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per side (median reported)")
    parser.add_argument("--out", default="runs/bench_train", help="writes bench_train.json here")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU control run: glibc keeps freed memory, so neither side pays page faults")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the ratio's quartiles need two rounds)")
    if args.keep_freed_memory:
        try:
            keep_freed_memory()
        except OSError as err:
            parser.error(f"--keep-freed-memory needs glibc: {err}")
    rows = []
    payload = {"keep_freed_memory": args.keep_freed_memory, "rows": rows}
    layout = init_distributed(tp=1, pp=1, seed=0)
    try:
        for name in args.configs:
            rows.append(bench_config(name, CONFIGS[name], args.rounds, layout))
            write_json(args.out, "bench_train.json", payload)  # a run stopped part-way keeps what it measured
    finally:
        shutdown()
    publish(args.out, "bench_train.json", payload, format_table(rows))
    return 0
