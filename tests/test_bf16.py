"""bf16, the precision of every GPU recipe, run on CPU: every parameter in bf16, losses that follow the fp32 run
within bf16's precision. (A bf16 checkpoint resuming exactly is tested at TP = 2 with the distributed optimizer,
the GPU recipes' layout, in test_vlm.py.)"""

import dataclasses

import pytest
import torch

COMMON = ["train.steps=6", "train.decay_steps=6", "train.warmup_steps=2"]
BF16 = [*COMMON, "train.precision=bf16"]


@pytest.mark.e2e
def test_a_bf16_run_follows_the_fp32_run(tiny):
    straight = tiny("straight", *BF16)
    fp32 = tiny("fp32", *COMMON)
    relative = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(straight, fp32)]
    assert 1e-5 < max(relative) < 1e-2, relative  # bf16 really ran, and trained along the fp32 run
    # 0.3 nats: a margin that a run which did not train (its loss flat to noise) cannot reach
    assert straight[-1]["loss"] < straight[0]["loss"] - 0.3


def test_a_bf16_vlm_holds_every_parameter_in_bf16_and_takes_fp32_pixels(monkeypatch):
    """megatron's local-spec norms and the plain-torch encoder are built in fp32; a bf16 run must not mix the two
    (megatron's optimizer could not checkpoint it, and the encoder would run at fp32 speed on a GPU)."""
    from megatron_ext.bench import speedup as bench_speedup
    from megatron_ext.training.parallel import init_distributed, shutdown

    dtypes = set()

    def recorded(*args, **kwargs):
        trainer = build(*args, **kwargs)
        dtypes.update(p.dtype for p in trainer.model.parameters())
        return trainer

    build = bench_speedup._trainer
    monkeypatch.setattr(bench_speedup, "_trainer", recorded)
    preset = dataclasses.replace(bench_speedup.PRESETS["tiny"], precision="bf16")
    layout = init_distributed(tp=1, pp=1, seed=0)
    try:
        row = bench_speedup.bench_one(preset, "small", 256, 1, True, layout)
    finally:
        shutdown()
    assert dtypes == {torch.bfloat16}
    assert min(row["t_discrete"], row["t_continuous"], row["t_text_only"]) > 0


def test_a_bf16_teacher_takes_fp32_pixels():
    """The tokenizer stages' teachers sit inside the trained model, so a bf16 run casts them too; pixels stay fp32
    (they are also the reconstruction target)."""
    from viq_mllm.viq_training.teachers import EfficientNetTeacher

    teacher = EfficientNetTeacher(resolution=64)
    pixels = [torch.rand(3, 48, 80) * 2 - 1, torch.rand(3, 64, 64) * 2 - 1]
    reference = teacher(pixels)
    features = teacher.bfloat16()(pixels)
    assert features.dtype == torch.bfloat16 and features.shape == (2, 1280)
    # bf16 keeps 8 bits of mantissa: ~0.4% relative error per value, a cosine of ~0.9999 over 1280 features;
    # 0.99 leaves room for the error to accumulate through the network, and a wrong dtype path falls far below
    assert torch.nn.functional.cosine_similarity(features.float(), reference, dim=-1).min() > 0.99
