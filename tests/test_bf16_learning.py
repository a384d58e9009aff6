"""The arithmetic of ``python -m benchmarks.bf16_learning``: the equal-wall-time step conversion and the paired
difference over the same test tasks (the benchmark itself runs for minutes and is not run here)."""

import math

import pytest

from benchmarks.bf16_learning import equal_time_steps, paired_difference


def test_equal_time_gives_each_precision_the_float32_runs_seconds_in_its_own_steps():
    budget, steps = equal_time_steps(2000, {"32-true": 0.1, "bf16-mixed": 0.16})
    assert budget == pytest.approx(200.0)
    assert steps == {"32-true": 2000, "bf16-mixed": 1250}  # slower bf16: fewer steps in the same time
    budget, steps = equal_time_steps(1000, {"32-true": 0.2, "bf16-mixed": 0.125})
    assert budget == pytest.approx(200.0) and steps["bf16-mixed"] == 1600  # faster bf16: more steps
    assert equal_time_steps(1, {"32-true": 0.01, "bf16-mixed": 10.0})[1]["bf16-mixed"] == 1  # never 0 steps


def test_paired_difference_is_over_the_same_tasks():
    reference = [1.0, 2.0, 3.0, 4.0]
    same_shift = paired_difference([v + 0.5 for v in reference], reference)
    assert same_shift["mean"] == pytest.approx(0.5) and same_shift["ci95"] == pytest.approx(0.0)  # task spread cancels
    d = paired_difference([1.0, 3.0, 3.0, 5.0], reference)
    assert d["mean"] == pytest.approx(0.5) and d["ci95"] == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference([1.0], reference)
