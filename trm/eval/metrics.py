"""Exact and token accuracy of predicted token sequences, as summable counts.

``accuracy_counts(predictions, labels)`` returns the number of sequences, of exactly right
sequences, of supervised tokens and of right tokens, so partial results (batches, ranks) add up
before dividing. Works on numpy arrays and torch tensors alike. Tested in tests/test_arc.py.
"""

from __future__ import annotations

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
