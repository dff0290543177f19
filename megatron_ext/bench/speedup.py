"""``viq-mllm bench speedup``: training-step time of the discrete VLM vs the continuous baseline vs text only.

For each LLM size and sequence length, three models with the *same* GPT shape see the *same* packed row
(documents of one image + one caption, first-fit packed):

- discrete: visual positions from ViQ codes (``table`` embedding: rows of the extended vocabulary);
- continuous: the ViQ ViT runs inside the step on the pixels (trained: forward + backward; ``--frozen-encoder``:
  forward only), then the 2x2 pooling projector; text vocabulary only;
- text only: the discrete model's LLM (extended vocabulary included) on the same number of positions, all
  text: the floor, so ``t_d / t_text`` is the cost of the visual embedding alone.

On CPU the steps alternate round by round in a rotating order, so noise and the after-effects of one variant's
large allocations hit all three alike; on a GPU one variant at a time is resident (the three would not fit
together at the real shapes). Reported, as medians: speed-up ``1 - t_d / t_c`` (the paper's ratio), its
FLOP-model prediction (``flops.py``), and the discrete overhead ``t_d / t_text``. The output layer runs at every
position, as in the paper's (HF) training; ``--supervised-logits`` measures what this stack's training computes
(logits at the caption tokens only, :class:`megatron_ext.model.gpt.GPT`), which takes the same work off all
three. A cell that runs out of GPU memory is reported as not measured and the run goes on; ``speedup.json`` is
rewritten after every cell.

Presets keep the paper's proportions: ``cpu`` scales SigLIP2-g (1.1B) vs Qwen2.5-0.5B / 7B down to an encoder
about 2x the small LLM and 0.2x the large one, at sequence lengths 512 / 2048 (the paper's 4K / 16K ratio);
``gpu`` uses the real shapes (needs a GPU); ``tiny`` is for the test suite. Longer sequences carry images of
twice the side (native resolution: a 16K context is where high-resolution images go); with packed per-document
attention and a fixed image size the speed-up would not depend on the sequence length at all (FLOP model).
"""

from __future__ import annotations

import argparse
import gc
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from megatron_ext.bench.flops import EncoderShape, GPTShape, encoder_step_flops, llm_step_flops, predicted_speedup
from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.training.checkpoint import VocabRecord
from megatron_ext.training.loop import build_trainer, forward_backward, optimizer_step
from megatron_ext.training.parallel import device, init_distributed, shutdown
from megatron_ext.vlm.model import (
    ContinuousVisualEmbedding,
    VisionLanguageModel,
    VisualEmbedding,
    continuous_batch,
    vlm_forward_step,
)
from viq_mllm.bench.report import publish, timed, write_json
from viq_mllm.console import Parser, markdown_table, plain
from viq_mllm.data.layout import Document, SequenceBuilder
from viq_mllm.data.packing import collate, pack
from viq_mllm.recipe import VisualSection, recipe_from_dict
from viq_mllm.viq.config import ViQConfig
from viq_mllm.viq.vit import VisionTransformer
from viq_mllm.vocab import Vocab, padded_vocab_size


@dataclass(frozen=True)
class Preset:
    encoder: dict  # ViQConfig fields of the vision encoder
    llms: dict[str, dict]  # name -> GPT shape (num_layers, hidden_size, ffn_hidden_size, heads, groups)
    seq_lengths: tuple[int, ...]
    image_px: tuple[int, ...]  # image side at each sequence length (longer sequences carry larger images)
    caption_tokens: int
    text_vocab: int
    codebook: int
    precision: str = "fp32"


def _llm(layers, hidden, ffn, heads, groups):
    return dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                num_query_groups=groups)


PRESETS = {
    "tiny": Preset(dict(width=64, depth=2, heads=4, mlp_hidden=256, pos_grid=8), {"small": _llm(2, 64, 172, 4, 2),
                   "large": _llm(2, 128, 344, 4, 2)}, (256, 512), (64, 128), 12, 1024, 2304),
    "cpu": Preset(dict(width=384, depth=8, heads=6, mlp_hidden=1536, pos_grid=16),
                  {"0.5B-like": _llm(4, 256, 688, 4, 2), "7B-like": _llm(10, 768, 2048, 12, 4)},
                  (512, 2048), (256, 512), 20, 16384, 2304),
    "gpu": Preset(dict(width=1536, depth=40, heads=16, mlp_hidden=6144, pos_grid=128),
                  {"Qwen2.5-0.5B": _llm(24, 896, 4864, 14, 2), "Qwen2.5-1.5B": _llm(28, 1536, 8960, 12, 2)},
                  (4096, 16384), (384, 768), 40, 151936, 15360, "bf16"),
}


def _documents(preset: Preset, vocab: Vocab, seq: int, px: int, seed: int = 0
               ) -> tuple[list[Document], list[torch.Tensor]]:
    """Caption documents of one ``px``-square image each, enough to fill ``seq`` positions; and the pixels."""
    g = torch.Generator().manual_seed(seed)
    side = px // 16
    docs, pixels = [], []
    while True:
        b = SequenceBuilder(vocab, 16)
        b.image(torch.randint(0, preset.codebook, (side, side, 4), generator=g).numpy())
        b.text(torch.randint(0, preset.text_vocab, (preset.caption_tokens,), generator=g).tolist(), True)
        doc = b.build()
        if sum(len(d) for d in docs) + len(doc) > seq:
            return docs, pixels
        docs.append(doc)
        pixels.append(torch.rand(3, px, px, generator=g) * 2 - 1)


def _text_document(doc: Document, text_vocab: int) -> Document:
    tokens = torch.randint(0, text_vocab, (len(doc),), generator=torch.Generator().manual_seed(len(doc)))
    return Document(tokens, torch.zeros(len(doc), dtype=torch.bool), torch.zeros(0, 16, dtype=torch.long),
                    doc.loss_mask)


def _trainer(preset: Preset, llm: dict, seq: int, vocab_size: int, visual_factory, layout, all_logits: bool):
    recipe = recipe_from_dict({
        "run": {"dir": "/tmp/viq-bench-unused"},
        "model": {**llm, "seq_length": seq, "qkv_bias": True, "tie_embeddings": True},
        "train": {"steps": 100, "lr": 1e-4, "min_lr": 1e-5, "precision": preset.precision},
        "log": {"wandb": "disabled", "tensorboard": False, "progress": False},
    })
    config = transformer_config(recipe.model, recipe.parallel, recipe.train.precision)
    gpt = build_gpt(config, recipe.model, recipe.parallel, padded_vocab_size(vocab_size), layout, 0, all_logits)
    with torch.device(device()):  # the 1.2B encoder of the gpu preset is initialised where it runs
        visual = visual_factory(gpt)
    model = VisionLanguageModel(gpt, visual)
    vocab = VocabRecord(text_size=vocab_size, padded_size=padded_vocab_size(vocab_size), text_fingerprint="bench")
    return build_trainer(recipe, layout, model, vocab, packed=True)


def bench_one(preset: Preset, llm_name: str, seq: int, rounds: int, trained_encoder: bool, layout,
              supervised_logits: bool = False) -> dict:
    llm = preset.llms[llm_name]
    vocab = Vocab.build(preset.text_vocab, preset.codebook, "bench", "bench")
    px = preset.image_px[preset.seq_lengths.index(seq)]
    enc_cfg = ViQConfig(**preset.encoder, image_base=px)
    docs, pixels = _documents(preset, vocab, seq, px)
    row = collate(pack(docs, seq))
    grids = [(px // 16,) * 2] * len(pixels)
    text_row = collate(pack([_text_document(d, preset.text_vocab) for d in docs], seq))
    hidden = llm["hidden_size"]
    section = VisualSection(embedding="table", group=16, viq="unused")
    trainer = partial(_trainer, preset, llm, seq, layout=layout, all_logits=not supervised_logits)
    variants = {  # name -> (builds its trainer, its batch)
        "discrete": (lambda: trainer(vocab.size, lambda gpt: VisualEmbedding(
            section, vocab, hidden, gpt.embedding.word_embeddings)), row),
        "continuous": (lambda: trainer(vocab.code_offset, lambda gpt: ContinuousVisualEmbedding(
            VisionTransformer(enc_cfg), enc_cfg.width, hidden, trained_encoder)),
            continuous_batch(row, vocab, pixels, grids)),
        "text_only": (lambda: trainer(vocab.size, lambda gpt: None), text_row),
    }
    times, peaks = (_one_at_a_time if torch.cuda.is_available() else _rotating)(variants, rounds)
    t = {name: statistics.median(v) for name, v in times.items()}
    logit_positions = int(sum(d.loss_mask.sum() for d in docs)) if supervised_logits else None
    flops = _flops(llm, vocab, enc_cfg, [len(d) for d in docs], px, len(pixels), trained_encoder, logit_positions)
    image_positions = sum(int(d.visual.sum()) + px // 32 + 2 for d in docs)
    return {"llm": llm_name, "seq_len": seq, "image_px": px, "documents": len(docs),
            "image_share": image_positions / seq,
            "t_discrete": t["discrete"], "t_continuous": t["continuous"], "t_text_only": t["text_only"],
            "speedup": 1 - t["discrete"] / t["continuous"], "overhead_vs_text": t["discrete"] / t["text_only"],
            "predicted_ratio": predicted_speedup(flops["discrete"], flops["continuous"]), "flops": flops,
            "trained_encoder": trained_encoder, "supervised_logits": supervised_logits, "rounds": rounds,
            "peak_gpu_gib": peaks}


def _step_seconds(trainer, batch) -> float:
    return timed(lambda: (forward_backward(trainer, iter([batch]), vlm_forward_step), optimizer_step(trainer)))


def _rotating(variants: dict, rounds: int) -> tuple[dict[str, list[float]], None]:
    """CPU: every variant resident, steps in a rotating order (each follows each other one in turn), so machine
    noise and the after-effects of one variant's large allocations hit all alike; round 0 warms up. No GPU
    memory to report (None)."""
    built = {name: (build(), batch) for name, (build, batch) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds = _step_seconds(*built[name])
            if r:
                times[name].append(seconds)
    return times, None


def _one_at_a_time(variants: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """GPU: one variant resident at a time (built, one warm-up step, ``rounds`` timed steps, freed), so a cell
    needs the memory of its largest variant, not of all three: at the real shapes three trainers (bf16 weights,
    fp32 gradients, main weights and Adam moments: 18 bytes a parameter) would not fit beside the encoder's
    activations. The caching allocator and the GPU's steadier clocks make the rotation unnecessary there.
    Also returns each variant's peak of allocated GPU memory (GiB; none where run on a CPU, as by the tests):
    whether a cell fits a smaller GPU."""
    times, peaks, on_gpu = {}, {}, torch.cuda.is_available()
    for name, (build, batch) in variants.items():
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer = build()
        _step_seconds(trainer, batch)
        times[name] = [_step_seconds(trainer, batch) for _ in range(rounds)]
        if on_gpu:
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        del trainer
        _release_memory()
    return times, peaks


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _flops(llm: dict, vocab: Vocab, enc_cfg: ViQConfig, lengths: list[int], px: int, images: int,
           trained: bool, logit_positions: int | None) -> dict:
    def shape(vocab_size):
        return GPTShape(llm["num_layers"], llm["hidden_size"], llm["ffn_hidden_size"], llm["num_attention_heads"],
                        llm["num_query_groups"], padded_vocab_size(vocab_size))

    w, patches = enc_cfg.width, (px // 16) ** 2
    vit_params = 3 * 256 * w + enc_cfg.depth * (4 * w * w + 2 * w * enc_cfg.mlp_hidden)
    hidden = llm["hidden_size"]
    projector = w * hidden / 4 + 2 * hidden * hidden / 4 + hidden * hidden / 4  # per patch (pooled 4 -> 1)
    encoder = encoder_step_flops(EncoderShape(enc_cfg.depth, w, int(vit_params + projector)), [patches] * images,
                                 trained)
    return {"discrete": llm_step_flops(shape(vocab.size), lengths, logit_positions),
            "continuous": llm_step_flops(shape(vocab.code_offset), lengths, logit_positions) + encoder,
            "text_only": llm_step_flops(shape(vocab.size), lengths, logit_positions)}


#: dense bf16 peaks (TFLOP/s) by device name; MFU is stated against these (H100/H200 SXM: 989)
GPU_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops() -> tuple[float, str]:
    """The peak MFU divides by: the GPU's dense bf16 datasheet peak, or on CPU a measured fp32 GEMM rate."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAKS.items():
            if key in name:
                return value, f"{name}: dense bf16 datasheet peak {value:.0f} TFLOP/s"
        return float("nan"), f"{name}: unknown peak"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    rate = 5 * 2 * 2048**3 / timed(lambda: [a @ b for _ in range(5)]) / 1e12
    return rate, f"CPU ({torch.get_num_threads()} threads): measured fp32 2048^3 GEMM rate {rate * 1e3:.0f} GFLOP/s"


def format_table(rows: list[dict]) -> str:
    return markdown_table(
        ["LLM", "seq", "t discrete (s)", "t continuous (s)", "speed-up", "FLOP-model prediction", "t text-only (s)",
         "discrete / text"],
        [[r["llm"], str(r["seq_len"]), f"{r['t_discrete']:.3f}", f"{r['t_continuous']:.3f}", f"{r['speedup']:.0%}",
          f"{r['predicted_ratio']:.0%}", f"{r['t_text_only']:.3f}", f"{r['overhead_vs_text']:.2f}x"] for r in rows])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seqs), figsize=(5 * len(seqs), 3.8), squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        sel = [r for r in rows if r["seq_len"] == seq]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r["t_discrete"] for r in sel], 0.4, label="ViQ codes (discrete)")
        ax.bar([i + 0.2 for i in x], [r["t_continuous"] for r in sel], 0.4, label="continuous encoder")
        for i, r in enumerate(sel):
            ax.text(i, max(r["t_discrete"], r["t_continuous"]) * 1.02, f"{r['speedup']:.0%}", ha="center")
        ax.set_xticks(list(x), [r["llm"] for r in sel])
        ax.set_ylabel("training step (s)")
        ax.set_title(f"sequence length {seq}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="viq-mllm bench speedup", description=plain(__doc__))
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant (medians)")
    parser.add_argument("--frozen-encoder", action="store_true", help="baseline encoder forward-only")
    parser.add_argument("--supervised-logits", action="store_true",
                        help="the output layer at the caption tokens only, as training runs it (default: at every "
                             "position, the paper's setting)")
    parser.add_argument("--llms", nargs="+", help="only these LLMs of the preset (default: all)")
    parser.add_argument("--seq-lengths", nargs="+", type=int, help="only these sequence lengths of the preset")
    parser.add_argument("--out", default="runs/bench_speedup",
                        help="writes speedup.json here after every cell (a stopped run keeps what it measured)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    llms = _chosen(parser, "--llms", args.llms, list(preset.llms))
    seqs = _chosen(parser, "--seq-lengths", args.seq_lengths, list(preset.seq_lengths))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    peak, peak_note = peak_tflops()
    rows, not_measured = [], []
    payload = {"preset": args.preset, "device": device, "peak": peak_note, "supervised_logits": args.supervised_logits,
               "rows": rows, "not_measured": not_measured}
    layout = init_distributed(tp=1, pp=1, seed=0)
    try:
        for llm in llms:
            for seq in seqs:
                try:
                    rows.append(_with_mfu(bench_one(preset, llm, seq, args.rounds, not args.frozen_encoder, layout,
                                                    args.supervised_logits), peak))
                    print(f"  {llm} seq {seq}: speed-up {rows[-1]['speedup']:.0%} "
                          f"(predicted {rows[-1]['predicted_ratio']:.0%})", flush=True)
                except torch.OutOfMemoryError as err:
                    not_measured.append({"llm": llm, "seq_len": seq,
                                         "reason": "out of memory: " + str(err).splitlines()[0]})
                    print(f"  {llm} seq {seq}: {not_measured[-1]['reason']}", flush=True)
                _release_memory()
                write_json(args.out, "speedup.json", payload)
    finally:
        shutdown()
    mfu = f"MFU against {peak_note}: " + ", ".join(
        f"{r['llm']}@{r['seq_len']} discrete {r['mfu']['discrete']:.0%} / continuous {r['mfu']['continuous']:.0%}"
        for r in rows)
    memory = "".join(f"\npeak GPU memory allocated, {r['llm']}@{r['seq_len']}: " + ", ".join(
        f"{name} {gib:.1f} GiB" for name, gib in r["peak_gpu_gib"].items()) for r in rows if r["peak_gpu_gib"])
    skipped = "".join(f"\nnot measured: {m['llm']}@{m['seq_len']} ({m['reason']})" for m in not_measured)
    path = publish(args.out, "speedup.json", payload, format_table(rows) + "\n" + mfu + memory + skipped)
    if rows:
        plot(rows, path.with_suffix(".png"))
    return 0


def _chosen(parser: argparse.ArgumentParser, flag: str, asked: list | None, offered: list) -> list:
    unknown = [x for x in asked or [] if x not in offered]
    if unknown:
        parser.error(f"{flag}: {unknown} not in the preset, which has {offered}")
    return [x for x in offered if x in asked] if asked else offered


def _with_mfu(row: dict, peak: float) -> dict:
    row["mfu"] = {k: row["flops"][k] / row[f"t_{k}"] / 1e12 / peak for k in ("discrete", "continuous", "text_only")}
    return row
