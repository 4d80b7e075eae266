"""Learning-rate schedule: linear warmup, then cosine to ``base_lr * min_ratio``.

Every published TRM recipe uses ``min_ratio = 1`` (constant lr after 2000
warmup steps). The same lr drives the network optimizer and, with its own
``base_lr``, the puzzle-embedding sign-SGD.

Example::

    for step in range(1, total_steps + 1):
        set_lr(optimizer, lr_at(step, base_lr, warmup_steps, total_steps, min_ratio))
        set_lr(puzzle_optimizer, lr_at(step, puzzle_base_lr, warmup_steps, total_steps, min_ratio))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    r"""The learning rate at ``step`` (the reference's cosine schedule with warmup)::

        step < warmup_steps:  base_lr * step / max(1, warmup_steps)
        otherwise:            base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress)))
                              progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)

    So the lr is 0 at step 0, reaches ``base_lr`` at ``step == warmup_steps`` and
    ``base_lr * min_ratio`` at ``step == total_steps``. ``progress`` is clamped
    to 1 (the reference lets the cosine rise again past ``total_steps``).
    """
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizers_or_param_groups: Any, lr: float) -> None:
    """Set ``group["lr"] = lr`` in every param group of the target(s).

    Accepts an optimizer-like object (anything with ``param_groups``: a torch
    optimizer, a DeepSpeed-wrapped one, :class:`PuzzleEmbeddingSignSGD`), a single
    param-group dict, or an iterable of either.
    """
    targets: Iterable[Any]
    if hasattr(optimizers_or_param_groups, "param_groups") or isinstance(optimizers_or_param_groups, dict):
        targets = [optimizers_or_param_groups]
    else:
        targets = optimizers_or_param_groups
    for target in targets:
        groups = target.param_groups if hasattr(target, "param_groups") else [target]
        for group in groups:
            group["lr"] = lr
