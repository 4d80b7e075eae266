"""Deep-supervision losses and per-step metrics of the ACT model.

Per sequence: the token loss summed over supervised tokens / their count; summed over the
batch (the trainer divides by the global batch size before backward)::

    total = lm_loss + 0.5 * (q_halt_loss + q_continue_loss)
    q_halt_loss = BCEWithLogits(q_halt, every supervised token's argmax is right, sum)

With ``deep_supervision_decay`` d, each sequence's lm and q_halt terms in ``total`` are multiplied
by d ** (s - 1), s = its supervision step (1, 2, ...); the lm_loss / q_halt_loss metrics stay unweighted.

Metrics are SUMS over the slots that halted this step (divide by ``count`` to report).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from trm import ops
from trm.ops.reference import IGNORE_LABEL_ID

TOKEN_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "stablemax_cross_entropy": ops.stablemax_cross_entropy,
    "softmax_cross_entropy": ops.softmax_cross_entropy,
}


def act_loss(outputs: dict[str, torch.Tensor], labels_BS: torch.Tensor, halted_B: torch.Tensor,
             steps_B: torch.Tensor, loss_type: str = "stablemax_cross_entropy", deep_supervision_decay: float = 1.0):
    """Return ``(total_loss, metrics)`` for one supervision step; metrics are detached sums."""
    logits = outputs["logits"]
    mask = labels_BS != IGNORE_LABEL_ID
    counts_B = mask.sum(-1)
    divisor_B = counts_B.clamp_min(1)
    with torch.no_grad():
        is_correct = mask & (logits.argmax(-1) == labels_BS)
        seq_correct_B = is_correct.sum(-1) == counts_B
        valid_B = halted_B & (counts_B > 0)
        metrics = {
            "count": valid_B.sum(),
            "token_accuracy": torch.where(valid_B, is_correct.float().sum(-1) / divisor_B, 0.0).sum(),
            "exact_accuracy": (valid_B & seq_correct_B).sum(),
            "q_halt_accuracy": (valid_B & ((outputs["q_halt_logits"] >= 0) == seq_correct_B)).sum(),
            "steps": torch.where(valid_B, steps_B, 0).sum(),
        }
    token_loss = TOKEN_LOSSES[loss_type](logits, labels_BS, ignore_index=IGNORE_LABEL_ID)
    lm_loss_B = token_loss.sum(-1) / divisor_B
    lm_loss = lm_loss_B.sum().to(torch.float32)
    q_halt = outputs["q_halt_logits"]
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct_B.to(q_halt.dtype), reduction="sum")
    total = lm_loss + 0.5 * q_halt_loss
    if deep_supervision_decay != 1.0:
        weight_B = deep_supervision_decay ** (steps_B.to(torch.float32) - 1)
        q_halt_loss_B = F.binary_cross_entropy_with_logits(q_halt, seq_correct_B.to(q_halt.dtype), reduction="none")
        total = (weight_B * (lm_loss_B.to(torch.float32) + 0.5 * q_halt_loss_B)).sum()
    metrics["lm_loss"] = lm_loss.detach()
    metrics["q_halt_loss"] = q_halt_loss.detach()
    if "target_q_continue" in outputs:
        q_continue_loss = F.binary_cross_entropy_with_logits(
            outputs["q_continue_logits"], outputs["target_q_continue"], reduction="sum"
        )
        total = total + 0.5 * q_continue_loss
        metrics["q_continue_loss"] = q_continue_loss.detach()
    return total, metrics
