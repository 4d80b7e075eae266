"""95% Wilson intervals of evaluation accuracies (trm.eval.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trm.eval.metrics import Z_95, accuracy_intervals, format_evaluation, wilson_interval

RNG = np.random.default_rng(5)


def test_wilson_bounds_are_where_the_score_test_turns():
    """The Wilson interval is the set of p0 whose score test |p - p0| <= z sqrt(p0 (1 - p0) / n) passes:
    scan p0 on a fine grid and compare the accepted range with the closed form."""
    grid = np.linspace(0, 1, 200_001)
    for _ in range(20):
        n = int(RNG.integers(1, 500))
        k = int(RNG.integers(0, n + 1))
        p = k / n
        accepted = grid[np.abs(p - grid) <= Z_95 * np.sqrt(grid * (1 - grid) / n)]
        low, high = wilson_interval(p, n)
        assert low == pytest.approx(accepted.min(), abs=1e-5) and high == pytest.approx(accepted.max(), abs=1e-5)
        assert low <= p <= high


def test_wilson_edge_cases():
    assert wilson_interval(0.0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(1.0, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)
    low, high = wilson_interval(0.665, 200)
    assert (round(low, 4), round(high, 4)) == (0.5970, 0.7268)
    assert high - low > wilson_interval(0.665, 2000)[1] - wilson_interval(0.665, 2000)[0]


def test_every_accuracy_gets_an_interval_from_its_own_sample_size():
    metrics = {"eval/exact_accuracy": 0.25, "eval/token_accuracy": 0.9, "eval/q_halt_accuracy": 0.5,
               "eval/early_exit/exact_accuracy": 0.2, "eval/steps": 16.0, "eval/count": 40.0,
               "eval/arc/pass@2": 0.1, "eval/arc/input_pass@2": 0.12, "eval/arc/tasks_scored": 50.0,
               "eval/arc/test_inputs_scored": 60.0, "eval/arc/votes": 900.0}
    ci = accuracy_intervals(metrics)
    accuracies = [k for k in metrics if k.endswith("accuracy")] + ["eval/arc/pass@2", "eval/arc/input_pass@2"]
    assert set(ci) == {f"{k}/ci95_{side}" for k in accuracies for side in ("low", "high")}
    for key in accuracies:
        n = {"eval/arc/pass@2": 50, "eval/arc/input_pass@2": 60}.get(key, 40)
        assert (ci[key + "/ci95_low"], ci[key + "/ci95_high"]) == wilson_interval(metrics[key], n)
    text = format_evaluation({**metrics, **ci})
    assert "eval/exact_accuracy: 0.2500 (95% CI 0.1419-0.4019, n=40)" in text
    assert "eval/arc/pass@2: 0.1000 (95% CI" in text and "n=50)" in text and "eval/steps: 16\n" in text
    assert "ci95" not in text
    assert not math.isnan(ci["eval/token_accuracy/ci95_low"])
