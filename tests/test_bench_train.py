"""``bench train --separate-processes``: each side runs in a spawned process of its own, and that process gets the
allocator setting of ``--keep-freed-memory`` (a setting is per process, so it must be applied in each child).

Without the setting, HF's tiny step page-faults thousands of freed 4 KB pages back in every step (its loss
allocates logits-sized buffers that glibc returns to the system); with it, the faults die out once the heap has
grown to the step's peak (measured: ~4300 a step without, under 400 by the fifth step with).
"""

import sys

import pytest

from megatron_ext.bench_train import CONFIGS, bench_config


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_separate_processes_apply_keep_freed_memory_in_each_child():
    cfg = CONFIGS["tiny"]
    kept = bench_config("tiny", cfg, rounds=5, layout=None, keep_freed=True)
    default = bench_config("tiny", cfg, rounds=5, layout=None, keep_freed=False)
    assert kept["processes"] == default["processes"] == "separate"
    faults = {"kept": kept["median_page_faults_per_step"], "default": default["median_page_faults_per_step"]}
    assert 4 * faults["kept"]["hf"] < faults["default"]["hf"], faults
