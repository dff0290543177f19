"""The benchmarks' confidence interval of a median: the ranks of the published tables, and its coverage measured
by simulation on a skewed distribution whose median is known."""

import math
import random

import pytest

from megatron_ext.bench.train import verdict
from viq_mllm.bench.report import median_interval


def test_ranks_are_those_of_the_published_tables():
    # Distribution-free 95% intervals of the median (e.g. Conover, Practical Nonparametric Statistics, table A3):
    # n = 10 -> the 2nd and 9th smallest, n = 40 -> the 14th and 27th.
    assert median_interval(range(1, 11)) == (2, 9)
    assert median_interval(range(1, 41)) == (14, 27)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95%: the sample's range
    with pytest.raises(ValueError):
        median_interval([])


@pytest.mark.parametrize("n, exact", [(10, 0.9785), (40, 0.9615)])
def test_coverage_of_the_true_median(n, exact):
    rng = random.Random(0)
    median = math.log(2)  # of the unit exponential
    trials = 4000
    covered = 0
    for _ in range(trials):
        low, high = median_interval([rng.expovariate(1.0) for _ in range(n)])
        covered += low <= median <= high
    assert abs(covered / trials - exact) < 0.015  # ~4.5 standard errors; one rank off moves it by > 0.03


def test_verdict_reads_the_interval():
    assert verdict(1.01, 1.05) == "faster"
    assert verdict(0.95, 0.99) == "slower"
    assert verdict(0.98, 1.02) == "not resolved"
