"""``viq-mllm bench train``: tokens/s of our megatron-core training step vs HF transformers' LlamaForCausalLM.

Same shapes (RMSNorm, SwiGLU, RoPE, GQA, tied embeddings, same padded vocabulary), same batch, AdamW with the same
hyper-parameters and gradient clipping, fp32, one process (or, with ``--separate-processes``, each side in a process
of its own), on the GPU when there is one (both sides, timed between synchronizations), else the CPU. HF's optimizer
is HF Trainer's default (torch's fused AdamW, ``adamw_torch_fused`` since torch 2.8); megatron's is TE's or apex's
FusedAdam where installed, the same torch kernel otherwise (``megatron_ext.patches.apex_free``). The two steps alternate
round by round so machine noise hits both alike; the table reports the medians over rounds and the ratio ours / HF
of each round: its median, interquartile range, and a distribution-free 95% confidence interval of the median
(``viq_mllm.bench.report.median_interval``) with what it says: ours faster (the interval above 1), slower (below 1), or no
difference this run can resolve. HF's step runs outside megatron_ext's CPU redirection mode, as it would in a
process of its own.

Each step is timed in two phases, to show where a difference lies: *gradients* (zeroing, forward with the loss,
backward; ours also its gradient finalisation, see ``training.finalize_alone``) and *update* (clipping and the
AdamW step; ours also the LR schedule).

On CPU, glibc's allocator returns large freed blocks to the system and the next step page-faults them back in
(~1 us per 4 KB). How often depends on each side's allocation pattern (HF's loss allocates three logits-sized
buffers per step, megatron's works in place), so ``--keep-freed-memory`` reruns the comparison with freed memory
kept in the process, where neither side faults: the control that separates allocator effects from compute.
The phase table counts each side's minor page faults per step, so a run shows which side paid them. Sharing one
heap also couples the two sides (one side's allocations decide when glibc trims the other's freed memory), so
``--separate-processes`` builds each side in a spawned process, as two users' runs would be, and still
alternates their steps; ``--keep-freed-memory`` then applies in both processes. ``--all-modes`` runs one process,
separate processes, and separate processes with freed memory kept, in that order (glibc's setting cannot be undone
in a process), and adds a table of the three verdicts: which side wins where the allocator has its say, and where
it has none.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import resource
import statistics
from functools import partial
from typing import Callable

import torch

from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.patches import cpu_compat
from megatron_ext.training.checkpoint import VocabRecord
from megatron_ext.training.loop import build_trainer, forward_backward, optimizer_step
from megatron_ext.training.parallel import device, init_distributed, shutdown
from viq_mllm.bench.report import median_interval, publish, timed, write_json
from viq_mllm.console import Parser, markdown_table, plain
from viq_mllm.recipe import recipe_from_dict

Phases = tuple[Callable[[], object], Callable[[], object]]  # (gradients, update) of one training step

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


def _batch(cfg: dict) -> dict:
    dev = device()
    b, s = cfg["micro_batch"], cfg["seq_length"]
    tokens = torch.randint(0, cfg["vocab"], (b, s + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s, device=dev),
            "position_ids": torch.arange(s, device=dev).expand(b, s)}


def _our_side(cfg: dict, rounds: int, layout) -> Phases:
    recipe = _recipe(cfg, steps=rounds + 10)
    config = transformer_config(recipe.model, recipe.parallel, recipe.train.precision)
    ours = build_trainer(recipe, layout, build_gpt(config, recipe.model, recipe.parallel, cfg["vocab"], layout, 0),
                         VocabRecord(text_size=cfg["vocab"], padded_size=cfg["vocab"], text_fingerprint="random"))
    batch = _batch(cfg)
    return lambda: forward_backward(ours, iter([batch])), lambda: optimizer_step(ours)


def _hf_side(cfg: dict) -> Phases:
    hf = _hf_model(cfg).to(device())
    decay = [p for p in hf.parameters() if p.dim() > 1]  # megatron (and HF Trainer) spare norms and biases
    hf_opt = torch.optim.AdamW([{"params": decay}, {"params": [p for p in hf.parameters() if p.dim() == 1],
                                                    "weight_decay": 0.0}],
                               lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    batch = _batch(cfg)

    def gradients():
        hf_opt.zero_grad(set_to_none=True)
        hf(input_ids=batch["tokens"], labels=batch["tokens"].clone()).loss.backward()  # HF shifts labels itself

    def update():
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    return cpu_compat.native(gradients), cpu_compat.native(update)


def _measured_step(phases: Phases) -> tuple[float, float, int]:
    """(gradients s, update s, minor page faults: memory the allocator had given back and touched again)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    gradients, update = (timed(fn) for fn in phases)
    return gradients, update, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def freed_block_returned(megabytes: int = 64) -> float:
    """The fraction of a freed ``megabytes`` block given back to the system: ~1 by glibc's default for blocks this
    large (each its own mmap), ~0 where it keeps freed memory (:func:`keep_freed_memory`).

    Resident memory, not refaults, is the setting's certain effect: where threads allocate beside a kept block, the
    next block of the same size may land elsewhere in the heap and fault even though nothing was given back."""
    block = torch.ones(megabytes << 18)  # 4-byte floats, touched
    held = _resident_bytes()
    del block
    return (held - _resident_bytes()) / (megabytes << 20)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _serve(conn, side: str, cfg: dict, rounds: int, keep_freed: bool) -> None:
    """A side in a process of its own: built once, then one measured step per request."""
    if keep_freed:
        keep_freed_memory()
    layout = init_distributed(tp=1, pp=1, seed=0) if side == "ours" else None
    try:
        phases = _our_side(cfg, rounds, layout) if side == "ours" else _hf_side(cfg)
        conn.send("built")
        while (request := conn.recv()) in ("step", "probe"):
            conn.send(_measured_step(phases) if request == "step" else freed_block_returned())
    finally:
        if layout is not None:
            shutdown()


class _Remote:
    """Steps a side built in a spawned process (its own heap and allocator state, as a user's run has)."""

    def __init__(self, side: str, cfg: dict, rounds: int, keep_freed: bool):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, side, cfg, rounds, keep_freed), daemon=True)
        self.process.start()
        self.side = side
        self._receive()

    def _receive(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(timeout=60)
            raise RuntimeError(f"the {self.side} side's benchmark process exited (code {self.process.exitcode}); "
                               "its traceback is printed above") from None

    def __call__(self) -> tuple[float, float, int]:
        self.conn.send("step")
        return self._receive()

    def probe(self) -> float:
        """:func:`freed_block_returned` in the side's process."""
        self.conn.send("probe")
        return self._receive()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send("stop")
        self.process.join(timeout=60)


def bench_config(name: str, cfg: dict, rounds: int, layout=None, keep_freed: bool = False) -> dict:
    """Both sides' steps, alternating round by round: in this process (``layout`` given), or each side in a
    process of its own (``layout`` None)."""
    sides = {}
    times = {key: {"gradients": [], "update": []} for key in ("ours", "hf")}
    faults = {key: [] for key in ("ours", "hf")}
    try:
        if layout is not None:
            sides = {"ours": partial(_measured_step, _our_side(cfg, rounds, layout)),
                     "hf": partial(_measured_step, _hf_side(cfg))}
        else:
            for key in ("ours", "hf"):
                sides[key] = _Remote(key, cfg, rounds, keep_freed)
        for round_ in range(rounds + 2):  # two warm-up rounds
            for key, step_once in sides.items():
                gradients, update, faulted = step_once()
                if round_ >= 2:
                    times[key]["gradients"].append(gradients)
                    times[key]["update"].append(update)
                    faults[key].append(faulted)
    finally:
        for side in sides.values():
            if isinstance(side, _Remote):
                side.close()
    step = {key: [g + u for g, u in zip(t["gradients"], t["update"])] for key, t in times.items()}
    ratios = [h / o for o, h in zip(step["ours"], step["hf"])]
    low, ratio, high = statistics.quantiles(ratios, n=4)
    median_ms = {key: {phase: 1e3 * statistics.median(v) for phase, v in t.items()} for key, t in times.items()}
    tokens = cfg["micro_batch"] * cfg["seq_length"]
    with torch.device("meta"):  # shapes only: the sides may live in other processes
        params = sum(p.numel() for p in _hf_model(cfg).parameters())
    return {"config": name, "params": params, "tokens_per_step": tokens,
            "ours_tokens_per_s": tokens / statistics.median(step["ours"]),
            "hf_tokens_per_s": tokens / statistics.median(step["hf"]), "ratio_ours_over_hf": ratio,
            "ratio_quartiles": [low, high], "ratio_median_ci95": list(median_interval(ratios)),
            "phase_median_ms": median_ms, "rounds": rounds,
            "median_page_faults_per_step": {key: statistics.median(v) for key, v in faults.items()},
            "processes": "one" if layout is not None else "separate",
            "device": str(device()), "threads": torch.get_num_threads()}


def verdict(low: float, high: float) -> str:
    """What a confidence interval of the ratio ours / HF says."""
    if low > 1:
        return "faster"
    if high < 1:
        return "slower"
    return "not resolved"


def _span(pair: list[float]) -> str:
    """An interval of ratios as the tables print it: ``0.977-0.991``."""
    return "{:.3f}-{:.3f}".format(*pair)


def format_table(rows: list[dict]) -> str:
    throughput = markdown_table(
        ["config", "params", "tokens/step", "ours tok/s", "HF tok/s", "ours / HF", "quartiles", "95% CI",
         "ours vs HF"],
        [[r["config"], f"{r['params'] / 1e6:.2f}M", str(r["tokens_per_step"]), f"{r['ours_tokens_per_s']:.0f}",
          f"{r['hf_tokens_per_s']:.0f}", f"{r['ratio_ours_over_hf']:.3f}x",
          _span(r["ratio_quartiles"]), _span(r["ratio_median_ci95"]),
          verdict(*r["ratio_median_ci95"])] for r in rows])
    phases = markdown_table(
        ["config", "gradients ours (ms)", "gradients HF (ms)", "update ours (ms)", "update HF (ms)",
         "page faults ours", "page faults HF"],
        [[r["config"]] + [f"{r['phase_median_ms'][side][phase]:.1f}" for phase in ("gradients", "update")
                          for side in ("ours", "hf")]
         + [f"{r['median_page_faults_per_step'][side]:.0f}" for side in ("ours", "hf")] for r in rows])
    return f"{throughput}\n\nMedian time per phase and minor page faults per step:\n\n{phases}"


def _mallopt() -> Callable[[int, int], int]:
    """glibc's ``mallopt`` (OSError where the C library is not glibc)."""
    return ctypes.CDLL("libc.so.6").mallopt


def keep_freed_memory() -> None:
    """Make glibc keep freed memory in the process (no heap trimming, no mmap per large block); glibc only."""
    mallopt = _mallopt()
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (mallopt(m_trim_threshold, 1 << 30) and mallopt(m_mmap_threshold, 1 << 30)):
        raise OSError("glibc's mallopt refused the trim / mmap thresholds")


# name -> (separate processes, keep freed memory), in the order ``--all-modes`` runs them: the one-process mode first,
# because glibc's setting cannot be undone in a process (the separate modes set it, if at all, in their children)
MODES = {
    "one process": (False, False),
    "separate processes": (True, False),
    "separate processes, freed memory kept (control)": (True, True),
}


def run_mode(configs: list[str], rounds: int, separate: bool, keep_freed: bool,
             save: Callable[[list[dict]], object]) -> list[dict]:
    """Each config's row in one mode; ``save(rows)`` after each, so a run stopped part-way keeps what it measured.
    The one-process mode applies ``keep_freed`` to this process (:func:`keep_freed_memory`)."""
    if keep_freed and not separate:
        keep_freed_memory()
    rows = []
    layout = None if separate else init_distributed(tp=1, pp=1, seed=0)
    try:
        for name in configs:
            rows.append(bench_config(name, CONFIGS[name], rounds, layout, keep_freed))
            save(rows)
    finally:
        if layout is not None:
            shutdown()
    return rows


def format_modes(runs: dict[str, list[dict]]) -> str:
    """One row per config, one column per mode: the median ratio ours / HF, its 95% interval and the verdict."""
    def cell(row: dict) -> str:
        interval = row["ratio_median_ci95"]
        return f"{row['ratio_ours_over_hf']:.3f}x ({_span(interval)}) {verdict(*interval)}"

    configs = [row["config"] for row in next(iter(runs.values()))]
    return markdown_table(["config", *runs], [[name, *(cell(rows[i]) for rows in runs.values())]
                                              for i, name in enumerate(configs)])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="viq-mllm bench train", description=plain(__doc__))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per side (median reported)")
    parser.add_argument("--out", default="runs/bench_train", help="writes bench_train.json here")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU control run: glibc keeps freed memory, so neither side pays page faults")
    parser.add_argument("--separate-processes", action="store_true",
                        help="build and step each side in a process of its own (still alternating step by step), "
                             "so neither side's allocations shape the other's page faults")
    parser.add_argument("--all-modes", action="store_true",
                        help="CPU: run the configs in one process, then in separate processes, then in separate "
                             "processes with freed memory kept, and add a table of the three verdicts")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the ratio's quartiles need two rounds)")
    if args.all_modes and (args.keep_freed_memory or args.separate_processes):
        parser.error("--all-modes runs every mode itself; drop --keep-freed-memory and --separate-processes")
    modes = MODES if args.all_modes else {None: (args.separate_processes, args.keep_freed_memory)}
    if any(keep for _, keep in modes.values()):
        try:
            _mallopt()
        except OSError as err:
            parser.error(f"freed memory kept (--keep-freed-memory, or --all-modes' control) needs glibc: {err}")
    payloads = {name: {"keep_freed_memory": keep, "separate_processes": separate, "rows": []}
                for name, (separate, keep) in modes.items()}
    whole = {"modes": payloads} if args.all_modes else payloads[None]

    def save(payload: dict, rows: list[dict]) -> None:
        payload["rows"] = rows
        write_json(args.out, "bench_train.json", whole)

    tables = []
    for name, payload in payloads.items():
        rows = run_mode(args.configs, args.rounds, payload["separate_processes"], payload["keep_freed_memory"],
                        partial(save, payload))
        tables.append(f"{name}:\n\n{format_table(rows)}" if name else format_table(rows))
    if args.all_modes:
        runs = {name: payload["rows"] for name, payload in payloads.items()}
        tables.append(f"ours / HF in each mode (median, 95% CI, verdict):\n\n{format_modes(runs)}")
    publish(args.out, "bench_train.json", whole, "\n\n".join(tables))
    return 0
