"""ARC voting inside the trainer's evaluation (and so inside ``python -m trm.evaluate``).

When the evaluation dataset is an ARC dataset (a directory written by ``trm.data.arc`` or by the
reference: ``identifiers.json`` plus ``test_puzzles.json`` or ``arc_build.json``, 30x30 canvases
of 12 tokens), every evaluation also

1. takes, for each evaluated example, the prediction after the LAST supervision step (the
   max-steps policy): the argmax tokens of the answer canvas (with retrieval on, the query slice
   of the sequence) and the halting logit ``q_halt``;
2. gathers them from every rank to rank 0, sorts them by example index (so N ranks vote exactly
   as one) and feeds them to :class:`trm.eval.arc_vote.ArcVoter` (crop, undo the augmentation,
   vote per (task, test input), rank by votes then mean halting confidence);
3. reports ``eval/arc/pass@k`` for each k of ``train.arc_pass_ks`` (plus ``input_pass@k`` and
   vote counts), the same numbers on every rank, and writes the validated ARC Prize
   ``submission.json`` (2 attempts) on rank 0.

Protocol (the defaults are the reference's ``evaluators/arc.py``): votes pile up over the
evaluations of one process (``train.arc_vote_accumulate``; they are not part of checkpoints, so a
resumed run votes from its restart on), an empty crop is a candidate
(``train.arc_abstain_empty=true``: it casts no vote), pass@{1,2,5,10,100,1000}
(``train.arc_pass_ks``).

Usage (what ``Trainer.evaluate`` does)::

    arc = ArcEvaluation.from_config(cfg, dataset, world)            # None for other datasets
    arc.begin()
    arc.collect(example_idx, valid, logits, q_halt_logits)          # every batch, every rank
    metrics.update(arc.finish("run/eval/submission_step_100.json"))

Test: ``pytest tests/test_eval_arc.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trm.config import ConfigError
from trm.data.arc import BUILD_INFO_FILE, SEQ_LEN, TEST_PUZZLES_FILE, VOCAB_SIZE
from trm.data.format import DatasetError
from trm.eval.arc_vote import PASS_KS, ArcEvalSet, ArcVoter
from trm.train.distributed import all_gather_cat, all_reduce_sum

METRIC_PREFIX = "eval/arc/"
SUBMISSION_ATTEMPTS = 2
COUNT_KEYS = ("tasks_scored", "test_inputs_scored", "tasks_with_votes", "votes", "abstained", "candidates_per_input")


def is_arc_dataset(root: str | Path) -> bool:
    """The directory holds what the ARC builders write next to the splits."""
    root = Path(root)
    return (root / "identifiers.json").is_file() and ((root / TEST_PUZZLES_FILE).is_file() or (root / BUILD_INFO_FILE).is_file())


class ArcEvaluation:
    """Collects the max-steps predictions of one evaluation on every rank and votes on rank 0."""

    def __init__(self, eval_set: ArcEvalSet, ks: Sequence[int] = PASS_KS, accumulate: bool = True,
                 query_slice: slice | None = None, is_main: bool = True, device: str | torch.device = "cpu",
                 abstain_empty: bool = False):
        ks = list(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise ConfigError(f"train.arc_pass_ks must be a non-empty list of integers >= 1 (e.g. [1, 2]), got {ks}.")
        self.ks = sorted({int(k) for k in ks})
        self.voter = ArcVoter(eval_set, accumulate=accumulate, abstain_empty=abstain_empty)
        self.query_slice = query_slice
        self.is_main = is_main
        self.device = torch.device(device)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    @classmethod
    def from_config(cls, cfg: Any, dataset: Any, world: Any) -> ArcEvaluation | None:
        """The evaluation's voter when ``dataset`` (a PuzzleDataset, possibly wrapped for retrieval)
        is an ARC dataset, else None. Every rank builds it (same files, same decision)."""
        base = getattr(dataset, "base", dataset)
        root = getattr(base, "path", None)
        if root is None or not is_arc_dataset(root):
            return None
        meta = base.eval.metadata
        if (meta.seq_len, meta.vocab_size) != (SEQ_LEN, VOCAB_SIZE):
            return None
        split = cfg.data.eval_split
        try:
            eval_set = ArcEvalSet.from_dataset(root, split)
        except DatasetError as err:
            if split == "test":
                raise DatasetError(f"ARC voting cannot read the test split of {root}: {err}. Rebuild the dataset with "
                                   f"`python -m trm.data build arc1|arc2 ...`.") from None
            if world.is_main:
                print(f"trm: ARC voting is off for data.eval_split={split} ({err}); it scores the test split.", file=sys.stderr)
            return None
        query_slice = getattr(dataset, "query_slice", None)
        return cls(eval_set, cfg.train.arc_pass_ks, cfg.train.arc_vote_accumulate, query_slice, world.is_main, world.device,
                   cfg.train.arc_abstain_empty)

    def begin(self) -> None:
        """Start an evaluation (votes are cleared unless accumulating)."""
        self.voter.begin_evaluation()
        self._parts.clear()

    @torch.no_grad()
    def collect(self, example_idx: torch.Tensor, valid: torch.Tensor, logits: torch.Tensor, q_halt_logits: torch.Tensor) -> None:
        """One batch of this rank: example indices [B], which rows count [B], logits [B, L, V] of
        the last step and its ``q_halt`` logits [B]. Collective: every rank calls it per batch."""
        device = logits.device
        if self.query_slice is not None:
            logits = logits[:, self.query_slice]
        tokens = logits.argmax(-1).to(torch.uint8)
        idx = torch.where(valid.to(device), example_idx.to(device, torch.int64), -1)
        idx, tokens, q = all_gather_cat(idx), all_gather_cat(tokens), all_gather_cat(q_halt_logits.detach().float())
        if self.is_main:
            keep = idx >= 0
            self._parts.append((idx[keep].cpu().numpy(), tokens[keep].cpu().numpy(), q[keep].cpu().numpy()))

    def metric_names(self) -> list[str]:
        return ([f"pass@{k}" for k in self.ks] + [f"input_pass@{k}" for k in self.ks] + list(COUNT_KEYS))

    def finish(self, submission_path: str | Path | None = None) -> dict[str, float]:
        """Vote (rank 0), write the submission there, and return the ``eval/arc/*`` metrics on every
        rank. Collective."""
        names = self.metric_names()
        values = {name: 0.0 for name in names}
        if self.is_main:
            if self._parts:
                idx, tokens, q = (np.concatenate(p) for p in zip(*self._parts))
                order = np.argsort(idx, kind="stable")  # vote in example order, whatever the ranks
                self.voter.add(idx[order], tokens[order], q[order])
            results = self.voter.results(self.ks)
            values = {name: float(results[name]) for name in names}
            if submission_path is not None:
                self.voter.write_submission(submission_path, attempts=SUBMISSION_ATTEMPTS)
        self._parts.clear()
        shared = all_reduce_sum({name: torch.tensor(v, dtype=torch.float64, device=self.device) for name, v in values.items()})
        return {METRIC_PREFIX + name: float(shared[name]) for name in names}


__all__ = ["ArcEvaluation", "is_arc_dataset"]
