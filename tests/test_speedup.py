"""The continuous baseline lines up with the discrete path; the FLOP model; the speed-up benchmark's output."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT


def megatron_num_floating_point_operations(batch, seq, layers, hidden, heads, groups, ffn, vocab, kv=None, swiglu=True):
    """Megatron-LM's dense-GPT formula (megatron/training/training.py), transcribed."""
    kv = kv or hidden // heads
    query_projection_to_hidden_size_ratio = kv * heads / hidden
    gated_linear_multiplier = 3 / 2 if swiglu else 1
    return 12 * batch * seq * layers * hidden * hidden * (
        ((1 + groups / heads + seq / hidden) * query_projection_to_hidden_size_ratio)
        + (ffn / hidden) * gated_linear_multiplier
        + vocab / (2 * layers * hidden)
    )


@pytest.mark.parametrize("shape", [(24, 896, 14, 2, 4864, 151936), (4, 64, 4, 4, 172, 1024), (28, 3584, 28, 4, 18944, 152064)])
@pytest.mark.parametrize("seq", [512, 4096])
def test_flop_model_reproduces_megatron_for_a_text_gpt(shape, seq):
    from megatron_ext.bench.flops import GPTShape, llm_step_flops

    layers, hidden, heads, groups, ffn, vocab = shape
    ours = llm_step_flops(GPTShape(layers, hidden, ffn, heads, groups, vocab), [seq])
    theirs = megatron_num_floating_point_operations(1, seq, layers, hidden, heads, groups, ffn, vocab)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_packed_documents_cost_less_attention_than_one_long_one():
    from megatron_ext.bench.flops import GPTShape, llm_step_flops

    shape = GPTShape(4, 64, 172, 4, 2, 1024)
    assert llm_step_flops(shape, [256, 256]) < llm_step_flops(shape, [512])


def test_logits_at_supervised_positions_take_the_output_layer_off_the_others():
    from megatron_ext.bench.flops import GPTShape, llm_step_flops

    shape = GPTShape(4, 64, 172, 4, 2, 1024)
    saved = llm_step_flops(shape, [512]) - llm_step_flops(shape, [512], logit_positions=40)
    assert saved == 6 * 1024 * 64 * (512 - 40)  # forward, and two backward GEMMs of a [472, 64] x [64, 1024]
    assert llm_step_flops(shape, [512], logit_positions=512) == llm_step_flops(shape, [512])


def test_baseline_fills_exactly_the_discrete_visual_positions():
    from megatron_ext.vlm.model import ContinuousVisualEmbedding, continuous_batch
    from viq_mllm.data.layout import caption_document
    from viq_mllm.data.packing import collate, pack
    from viq_mllm.viq import ViQTokenizer
    from viq_mllm.vocab import Vocab

    class Words:
        eod = 1

        def encode(self, text):
            return [10 + len(w) for w in text.split()]

    tok = ViQTokenizer.from_config("tiny", preset="2k")
    vocab = Vocab.build(100, 2304, tok.fingerprint, "t")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 200), (128, 128), (300, 90)]]
    items = tok.preprocess(images)
    codes = tok.encode_preprocessed(items)
    docs = [caption_document(Words(), vocab, [c.numpy()], "a small red pig", 16) for c in codes]
    discrete = collate(pack(docs, 512))
    baseline = continuous_batch(discrete, vocab, [it.pixels for it in items], [it.grid for it in items])
    assert torch.equal(baseline["visual"], discrete["visual"])
    assert torch.equal(baseline["loss_mask"], discrete["loss_mask"])
    assert torch.equal(baseline["cu_seqlens"], discrete["cu_seqlens"])
    text = ~discrete["visual"] & ~vocab.is_code(discrete["tokens"])
    assert torch.equal(baseline["tokens"][text], discrete["tokens"][text])
    assert not vocab.is_code(baseline["tokens"]).any()
    encoder = ContinuousVisualEmbedding(tok.vit, tok.config.width, 32, trained=False)
    vectors = encoder(baseline["pixels"], baseline["grids"])
    assert vectors.shape == (int(discrete["visual"].sum()), 32) == (discrete["codes"].shape[0], 32)


@pytest.mark.e2e
def test_speedup_benchmark_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "viq_mllm", "bench", "speedup", "--preset", "tiny", "--rounds", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert "| LLM | seq | t discrete (s) | t continuous (s) | speed-up |" in proc.stdout
    result = json.loads((tmp_path / "speedup.json").read_text())
    rows = result["rows"]
    assert [(r["llm"], r["seq_len"]) for r in rows] == [("small", 256), ("small", 512), ("large", 256), ("large", 512)]
    for r in rows:
        assert min(r["t_discrete"], r["t_continuous"], r["t_text_only"]) > 0
        # what a reader sees is what the JSON holds: the cell's times, to the table's precision
        assert f"| {r['llm']} | {r['seq_len']} | {r['t_discrete']:.3f} | {r['t_continuous']:.3f} |" in proc.stdout
        # the discrete model is its own LLM on the same positions: the FLOP model charges the codes nothing
        assert r["flops"]["discrete"] == pytest.approx(r["flops"]["text_only"])
        assert 0 < r["image_share"] < 1
    assert (tmp_path / "speedup.png").stat().st_size > 0


def _fake_cell(preset, llm, seq, rounds, trained_encoder, layout, supervised_logits):
    if (llm, seq) == ("large", 512):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB\nmore detail")
    flops = {"discrete": 1e9, "continuous": 2e9, "text_only": 1e9}
    return {"llm": llm, "seq_len": seq, "t_discrete": 1.0, "t_continuous": 2.0, "t_text_only": 1.0, "speedup": 0.5,
            "predicted_ratio": 0.5, "overhead_vs_text": 1.0, "flops": flops,
            "peak_gpu_gib": {"discrete": 30.0, "continuous": 71.5, "text_only": 29.0}}


def test_speedup_cells_run_in_preset_order_and_one_out_of_memory_does_not_end_the_run(tmp_path, monkeypatch, capsys):
    from megatron_ext.bench import speedup as bench_speedup

    monkeypatch.setattr(bench_speedup, "bench_one", _fake_cell)
    bench_speedup.main(["--preset", "tiny", "--llms", "large", "--seq-lengths", "512", "256", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "speedup.json").read_text())
    assert [(r["llm"], r["seq_len"]) for r in result["rows"]] == [("large", 256)]
    assert result["not_measured"] == [{"llm": "large", "seq_len": 512,
                                       "reason": "out of memory: CUDA out of memory. Tried to allocate 40.00 GiB"}]
    printed = capsys.readouterr().out
    assert "not measured: large@512 (out of memory" in printed
    assert "peak GPU memory allocated, large@256: discrete 30.0 GiB, continuous 71.5 GiB, text_only 29.0 GiB" in printed
    with pytest.raises(SystemExit):
        bench_speedup.main(["--preset", "tiny", "--llms", "huge", "--out", str(tmp_path)])
    assert "--llms: ['huge'] not in the preset, which has ['small', 'large']" in capsys.readouterr().err


def test_on_a_gpu_one_variant_at_a_time_is_resident(monkeypatch):
    """At the real shapes three trainers do not fit on one GPU beside the encoder's activations: each variant's
    trainer (model, optimizer) must be freed before the next is built, with megatron holding no reference."""
    import gc
    import weakref

    from megatron_ext.bench import speedup as bench_speedup
    from megatron_ext.training.parallel import init_distributed, shutdown

    built = []

    def tracked(*args, **kwargs):
        trainer = build(*args, **kwargs)
        gc.collect()
        alive_before = [r() for r in built if r() is not None]
        built.extend([weakref.ref(trainer.model), weakref.ref(trainer.optimizer)])
        assert alive_before == [], "a previous variant's trainer is still resident"
        return trainer

    build = bench_speedup._trainer
    monkeypatch.setattr(bench_speedup, "_trainer", tracked)
    monkeypatch.setattr(bench_speedup, "_rotating", bench_speedup._one_at_a_time)  # the GPU path, on this CPU
    layout = init_distributed(tp=1, pp=1, seed=0)
    try:
        row = bench_speedup.bench_one(bench_speedup.PRESETS["tiny"], "small", 256, 1, True, layout)
    finally:
        shutdown()
    gc.collect()
    assert len(built) == 6 and all(r() is None for r in built)
    assert min(row["t_discrete"], row["t_continuous"], row["t_text_only"]) > 0
