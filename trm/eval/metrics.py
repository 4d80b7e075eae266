"""Exact and token accuracy of predicted token sequences, as summable counts.

``accuracy_counts(predictions, labels)`` returns the number of sequences, of exactly right
sequences, of supervised tokens and of right tokens, so partial results (batches, ranks) add up
before dividing. Works on numpy arrays and torch tensors alike. Tested in tests/test_arc.py.

``accuracy_intervals(metrics)`` adds a 95% Wilson score interval to every accuracy of an
evaluation (``<key>/ci95_low``, ``<key>/ci95_high``), computed from the number of examples it
rests on (``eval/count``; ARC: ``eval/arc/tasks_scored`` for ``pass@k``, ``test_inputs_scored``
for ``input_pass@k``). Token accuracy and ARC ``pass@k`` are means of per-example fractions, not
counts of independent trials; their interval uses the number of examples too (tokens of one
puzzle are not independent), which is conservative: a mean of values in [0, 1] has at most the
variance of a proportion. Tested in tests/test_wilson.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

IGNORE_LABEL_ID = -100
"""Label id that is not supervised (the trainer's convention; dataset ignore ids are mapped to it)."""


def _numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def accuracy_counts(predictions: Any, labels: Any, ignore_label_id: int = IGNORE_LABEL_ID) -> dict[str, int]:
    """Counts over sequences [B, L]: ``sequences``, ``exact`` (every supervised token right),
    ``tokens`` (supervised tokens) and ``correct_tokens``.

    A sequence without supervised tokens is not counted at all.
    """
    predictions, labels = _numpy(predictions), _numpy(labels)
    if predictions.shape != labels.shape or predictions.ndim != 2:
        raise ValueError(f"predictions and labels must both be [batch, seq_len], got {predictions.shape} and {labels.shape}")
    mask = labels != ignore_label_id
    right = (predictions == labels) & mask
    supervised = mask.any(axis=1)
    return {
        "sequences": int(supervised.sum()),
        "exact": int(((right == mask).all(axis=1) & supervised).sum()),
        "tokens": int(mask.sum()),
        "correct_tokens": int(right.sum()),
    }


def accuracies(counts: dict[str, int]) -> dict[str, float]:
    """``exact_accuracy`` and ``token_accuracy`` of (summed) :func:`accuracy_counts` (0 when empty)."""
    return {
        "exact_accuracy": counts["exact"] / counts["sequences"] if counts["sequences"] else 0.0,
        "token_accuracy": counts["correct_tokens"] / counts["tokens"] if counts["tokens"] else 0.0,
    }


Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975 (two-sided 95%)."""


def wilson_interval(accuracy: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``accuracy`` observed on ``n`` examples
    ((0, 1) when ``n`` is 0: nothing is known)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(float(accuracy), 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if p == 0 else low), (1.0 if p == 1 else high)


def sample_size_key(key: str) -> str | None:
    """The metric holding the number of examples an accuracy ``key`` rests on (None: not an accuracy)."""
    name = key.rsplit("/", 1)[-1]
    if key.startswith("eval/arc/"):
        if name.startswith("input_pass@"):
            return "eval/arc/test_inputs_scored"
        return "eval/arc/tasks_scored" if name.startswith("pass@") else None
    return "eval/count" if key.startswith("eval/") and name.endswith("accuracy") else None


def accuracy_intervals(metrics: dict[str, float]) -> dict[str, float]:
    """``<key>/ci95_low`` and ``<key>/ci95_high`` for every accuracy of ``metrics`` whose sample
    size is there too (see the module docstring)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        n_key = sample_size_key(key)
        if n_key is None or n_key not in metrics:
            continue
        out[key + "/ci95_low"], out[key + "/ci95_high"] = wilson_interval(value, metrics[n_key])
    return out


def format_accuracy(metrics: dict[str, float], key: str) -> str:
    """``0.6650 (95% CI 0.5968-0.7272, n=200)``, or the bare value without an interval."""
    value = metrics[key]
    if key + "/ci95_low" not in metrics:
        return f"{value:.0f}" if float(value).is_integer() and sample_size_key(key) is None else f"{value:.4f}"
    n = metrics[sample_size_key(key)]
    return f"{value:.4f} (95% CI {metrics[key + '/ci95_low']:.4f}-{metrics[key + '/ci95_high']:.4f}, n={n:.0f})"


def format_evaluation(metrics: dict[str, float]) -> str:
    """One line per metric of an evaluation, accuracies with their interval (intervals themselves
    are not listed separately)."""
    lines = [f"  {key}: {format_accuracy(metrics, key)}" for key in metrics
             if not key.endswith(("/ci95_low", "/ci95_high"))]
    return "\n".join(lines)
