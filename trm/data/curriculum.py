"""Curricula: training moves from easy to hard data and from shallow to deep recursion, as a
pure function of the optimizer step.

Config (top-level ``curriculum``; see ``trm.config.CurriculumConfig``)::

    curriculum:
      difficulty: changed_cells            # how hard an example is (DIFFICULTY_MEASURES)
      stages:                              # stage i covers steps (until_step[i-1], until_step[i]]
        - {until_step: 200, max_difficulty: 40, halt_max_steps: 2, H_cycles: 1}
        - {until_step: 500, max_difficulty: 50}
      # after the last stage: all data, the model's configured depth

A field a stage leaves unset means the full setting (no bound, the configured depth); stages do
not inherit from each other.

Data: a stage with a difficulty range samples only the training examples inside it. Examples
keep their puzzles and groups; the stage reads a :class:`SampleStream` over that subset at the
same global positions, so the example of sample ``k`` drawn at step ``s`` is a pure function of
(seed, k, stage of s). Stages without a range (and steps after the last stage) read the full
stream, exactly as without a curriculum.

Depth: during a stage the trainer runs each training forward with the stage's halt_max_steps /
H_cycles / L_cycles (:meth:`CurriculumSchedule.applied`); evaluation always uses the configured
depth, so evaluations are comparable across stages and with ``python -m trm.evaluate``.

Resume: the stage is a function of the restored step; the schedule itself is saved in
``trainer_state.pt`` and compared on resume.

Difficulty of an example (a per-example array over a split, see :func:`example_difficulty`):
``changed_cells`` counts supervised cells whose answer differs from the input (Sudoku: blanks;
maze: path cells = moves - 1), ``answer_cells`` counts supervised cells (ARC: output grid size
incl. its EOS row/column), ``stored`` reads ``<split>/<set>__difficulty.npy`` ([num_examples]
numbers) that a builder may write for any other measure.

Test: ``pytest tests/test_curriculum.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from trm.data.format import DatasetError, SplitData, split_file
from trm.data.stream import SampleStream, make_stream

DIFFICULTY_MEASURES = ("changed_cells", "answer_cells", "stored")
DEPTH_KEYS = ("halt_max_steps", "H_cycles", "L_cycles")
_CHUNK = 65536


def example_difficulty(split: SplitData, measure: str, root: str | Path | None = None, split_name: str = "train") -> np.ndarray:
    """Difficulty of every example of ``split`` (float64 [num_examples]) under ``measure``.

    ``stored`` needs ``root`` and ``split_name`` (the files live at ``<root>/<split>/<set>__difficulty.npy``).
    """
    if measure not in DIFFICULTY_MEASURES:
        raise ValueError(f"Unknown difficulty measure '{measure}'; choose one of {DIFFICULTY_MEASURES}.")
    if measure == "stored":
        return _stored_difficulty(split, root, split_name)
    ignore = split.metadata.ignore_label_id
    out = np.empty(split.num_examples, dtype=np.float64)
    for start in range(0, split.num_examples, _CHUNK):
        labels = np.asarray(split.labels[start:start + _CHUNK])
        supervised = labels != ignore if ignore is not None else np.ones(labels.shape, bool)
        if measure == "changed_cells":
            supervised &= labels != np.asarray(split.inputs[start:start + _CHUNK])
        out[start:start + len(labels)] = supervised.sum(-1)
    return out


def _stored_difficulty(split: SplitData, root: str | Path | None, split_name: str) -> np.ndarray:
    if root is None:
        raise ValueError("difficulty 'stored' needs the dataset directory")
    parts = []
    for set_name, (lo, hi) in split.set_example_ranges.items():
        path = split_file(root, split_name, set_name, "difficulty")
        if not path.is_file():
            raise DatasetError(
                f"curriculum.difficulty=stored but {path} does not exist. Write one number per example there "
                f"(np.save, shape [{hi - lo}]) or use difficulty: changed_cells | answer_cells."
            )
        values = np.load(path, allow_pickle=False)
        if values.shape != (hi - lo,) or not np.issubdtype(values.dtype, np.number):
            raise DatasetError(f"{path} must hold {hi - lo} numbers (one per example), got {values.dtype} {values.shape}.")
        parts.append(values.astype(np.float64))
    return np.concatenate(parts)


@dataclass(frozen=True)
class Stage:
    """One stage: the last step it covers, its difficulty range and its depth (None: full setting)."""

    until_step: int
    min_difficulty: float | None = None
    max_difficulty: float | None = None
    halt_max_steps: int | None = None
    H_cycles: int | None = None
    L_cycles: int | None = None

    @property
    def restricts_data(self) -> bool:
        return self.min_difficulty is not None or self.max_difficulty is not None

    def depth(self) -> dict[str, int]:
        """The depth keys this stage sets."""
        return {k: getattr(self, k) for k in DEPTH_KEYS if getattr(self, k) is not None}


class CurriculumSchedule:
    """The stages, and which one a step falls in (None after the last)."""

    def __init__(self, stages: Sequence[Stage], difficulty: str = "changed_cells"):
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        ends = [s.until_step for s in stages]
        if ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"curriculum stages must end at increasing steps >= 1, got until_step {ends}")
        if difficulty not in DIFFICULTY_MEASURES:
            raise ValueError(f"Unknown difficulty measure '{difficulty}'; choose one of {DIFFICULTY_MEASURES}.")
        self.stages = tuple(stages)
        self.difficulty = difficulty

    @classmethod
    def from_config(cls, cfg: Any) -> "CurriculumSchedule | None":
        """From a ``trm.config.CurriculumConfig`` (None stays None)."""
        if cfg is None:
            return None
        return cls([Stage(**asdict(s)) for s in cfg.stages], cfg.difficulty)

    def stage_index(self, step: int) -> int | None:
        """Index of the stage that covers optimizer step ``step`` (1-based), None after the last."""
        for i, stage in enumerate(self.stages):
            if step <= stage.until_step:
                return i
        return None

    def stage_at(self, step: int) -> Stage | None:
        i = self.stage_index(step)
        return None if i is None else self.stages[i]

    @contextlib.contextmanager
    def applied(self, step: int, model_config: Any) -> Iterator[None]:
        """Inside the block ``model_config`` has the depth of the stage of ``step``; restored after."""
        stage = self.stage_at(step)
        depth = stage.depth() if stage is not None else {}
        saved = {k: getattr(model_config, k) for k in depth}
        for k, v in depth.items():
            setattr(model_config, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(model_config, k, v)

    def check_model(self, model_config: Any) -> None:
        """Raise ValueError when a stage sets a depth key the model does not have."""
        for i, stage in enumerate(self.stages):
            for key in stage.depth():
                if not hasattr(model_config, key):
                    raise ValueError(
                        f"curriculum.stages[{i}] sets {key}, which this model ({type(model_config).__name__}) does not have."
                    )

    def state_dict(self) -> dict[str, Any]:
        """The schedule as plain data (saved in checkpoints and compared on resume)."""
        return {"difficulty": self.difficulty, "stages": [asdict(s) for s in self.stages]}


class CurriculumSampler:
    """Example index of global sample ``k`` drawn at step ``s``: the stage's subset stream at ``k``.

    ``difficulty`` is the per-example difficulty of ``split``. Every stage's subset is checked (and
    its stream built) up front, so an empty stage fails before training starts.
    """

    def __init__(self, split: SplitData, seed: int, schedule: CurriculumSchedule, difficulty: np.ndarray, sample_unit: str = "example"):
        difficulty = np.asarray(difficulty, dtype=np.float64)
        if difficulty.shape != (split.num_examples,):
            raise ValueError(f"difficulty has shape {difficulty.shape}, expected ({split.num_examples},)")
        self.schedule = schedule
        self.full = make_stream(split, seed, sample_unit)
        self._subsets: list[tuple[SampleStream, np.ndarray] | None] = []
        for i, stage in enumerate(schedule.stages):
            if not stage.restricts_data:
                self._subsets.append(None)
                continue
            lo = -np.inf if stage.min_difficulty is None else stage.min_difficulty
            hi = np.inf if stage.max_difficulty is None else stage.max_difficulty
            kept = np.flatnonzero((difficulty >= lo) & (difficulty <= hi))
            if not len(kept):
                raise DatasetError(
                    f"curriculum.stages[{i}] keeps no training example: its difficulty range is "
                    f"[{stage.min_difficulty}, {stage.max_difficulty}] ({schedule.difficulty}) but the training "
                    f"examples range over [{difficulty.min():g}, {difficulty.max():g}]. Widen the range."
                )
            self._subsets.append((make_stream(_subset_offsets(split, kept), seed, sample_unit), kept))

    def indices(self, global_positions: np.ndarray, step: int | None) -> np.ndarray:
        """Example indices of the positions, drawn at optimizer step ``step`` (None: the full stream)."""
        i = None if step is None else self.schedule.stage_index(step)
        subset = None if i is None else self._subsets[i]
        if subset is None:
            return self.full.indices(global_positions)
        stream, kept = subset
        return kept[stream.indices(global_positions)]


def _subset_offsets(split: SplitData, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR offsets (puzzle -> examples, group -> puzzles) of the sorted example subset ``kept``,
    dropping puzzles and groups left empty; indices address positions in ``kept``."""
    puzzle_of_example = split.example_puzzle(kept)
    examples_per_puzzle = np.bincount(puzzle_of_example, minlength=split.num_puzzles)
    kept_puzzles = np.flatnonzero(examples_per_puzzle)
    group_of_puzzle = np.searchsorted(split.group_indices, kept_puzzles, side="right") - 1
    puzzles_per_group = np.bincount(group_of_puzzle, minlength=split.num_groups)
    puzzle_offsets = np.concatenate([[0], np.cumsum(examples_per_puzzle[kept_puzzles])])
    group_offsets = np.concatenate([[0], np.cumsum(puzzles_per_group[puzzles_per_group > 0])])
    return puzzle_offsets.astype(np.int64), group_offsets.astype(np.int64)
