"""``bench train --separate-processes``: each side runs in a spawned process of its own, and that process gets the
allocator setting of ``--keep-freed-memory`` (a setting is per process, so it must be applied in each child).

Whether a side's own step page-faults depends on its heap's history, so the test asks each child process directly
how much of a freed 64 MB block it gives back to the system: all of it by glibc's default for blocks this large,
none where the setting keeps freed memory.
"""

import json
import sys

import pytest

from megatron_ext.bench.train import CONFIGS, _Remote, bench_config


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_separate_processes_apply_keep_freed_memory_in_each_child():
    cfg = CONFIGS["tiny"]
    returned = {}
    for keep_freed in (True, False):
        side = _Remote("hf", cfg, rounds=1, keep_freed=keep_freed)
        try:
            returned[keep_freed] = side.probe()
        finally:
            side.close()
    assert returned[True] < 0.1 < 0.9 < returned[False], returned
    assert bench_config("tiny", cfg, rounds=2, layout=None, keep_freed=True)["processes"] == "separate"


def test_all_modes_run_one_process_first_and_keep_freed_memory_only_in_the_control_children(tmp_path, monkeypatch,
                                                                                            capsys):
    """The one-process mode must run before anything sets glibc's thresholds in this process, and the control's
    setting belongs to its children (``_serve``), never to this process. Each mode's row reaches the JSON and the
    verdict table, the verdict read off the interval."""
    from megatron_ext.bench import train as bench_train

    calls, parent_kept = [], []
    ratios = iter([(1.03, 1.01, 1.05), (0.99, 0.98, 0.995), (1.0, 0.99, 1.01)])

    def fake_bench_config(name, cfg, rounds, layout, keep_freed):
        calls.append((name, layout is None, keep_freed))
        ratio, low, high = next(ratios)
        times = {"gradients": 1.0, "update": 1.0}
        return {"config": name, "params": 1, "tokens_per_step": 1, "ours_tokens_per_s": 1.0, "hf_tokens_per_s": 1.0,
                "ratio_ours_over_hf": ratio, "ratio_quartiles": [low, high], "ratio_median_ci95": [low, high],
                "phase_median_ms": {"ours": times, "hf": times},
                "median_page_faults_per_step": {"ours": 0, "hf": 0}}

    monkeypatch.setattr(bench_train, "bench_config", fake_bench_config)
    monkeypatch.setattr(bench_train, "keep_freed_memory", lambda: parent_kept.append(True))
    monkeypatch.setattr(bench_train, "init_distributed", lambda **_: "layout")
    monkeypatch.setattr(bench_train, "shutdown", lambda: None)
    assert bench_train.main(["--all-modes", "--configs", "tiny", "--rounds", "2", "--out", str(tmp_path)]) == 0

    assert calls == [("tiny", False, False), ("tiny", True, False), ("tiny", True, True)]
    assert parent_kept == []
    modes = json.loads((tmp_path / "bench_train.json").read_text())["modes"]
    assert [(m["separate_processes"], m["keep_freed_memory"], m["rows"][0]["ratio_ours_over_hf"])
            for m in modes.values()] == [(False, False, 1.03), (True, False, 0.99), (True, True, 1.0)]
    verdicts = capsys.readouterr().out.split("verdict):")[1]
    assert "| tiny | 1.030x (1.010-1.050) faster | 0.990x (0.980-0.995) slower | 1.000x (0.990-1.010) not resolved |" \
        in verdicts


def test_all_modes_refuses_a_mode_flag_before_any_compute(tmp_path, capsys):
    from megatron_ext.bench import train as bench_train

    with pytest.raises(SystemExit):
        bench_train.main(["--all-modes", "--separate-processes", "--out", str(tmp_path)])
    assert "--all-modes runs every mode itself" in capsys.readouterr().err
    assert not (tmp_path / "bench_train.json").exists()
