"""The dataset the trainer sees: a directory in the reference layout, as tensors.

Training samples are addressed by GLOBAL sample index (``SampleStream``, or ``PuzzleStream`` with
``sample_unit="puzzle"``: whole puzzles, their examples adjacent): sample ``k`` is the
same example, with the same on-the-fly augmentation, whatever the world size, and the run's
data position is one integer. Labels equal to the dataset's ``ignore_label_id`` become -100.
With a curriculum (``trm.data.curriculum``) the example of sample ``k`` also depends on the
optimizer step it is drawn at (the step's stage), still a pure function of (seed, k, step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trm.data.curriculum import CurriculumSampler, CurriculumSchedule, example_difficulty
from trm.data.format import SplitData, load_split
from trm.data.stream import make_stream
from trm.ops.reference import IGNORE_LABEL_ID

AUGMENTATIONS = ("none", "sudoku", "maze")


class PuzzleDataset:
    """Train split + evaluation split of one dataset directory."""

    def __init__(self, path: str | Path, seed: int, augment: str = "none", eval_split: str = "test",
                 curriculum: CurriculumSchedule | None = None, sample_unit: str = "example"):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"Unknown augmentation '{augment}'; choose one of {AUGMENTATIONS}.")
        self.path = Path(path)
        self.seed = seed
        self.augment = augment
        self.train = load_split(self.path, "train")
        self.eval = load_split(self.path, eval_split)
        meta, eval_meta = self.train.metadata, self.eval.metadata
        if (meta.seq_len, meta.vocab_size) != (eval_meta.seq_len, eval_meta.vocab_size):
            raise ValueError(
                f"Splits of {self.path} disagree: train has seq_len {meta.seq_len} / vocab {meta.vocab_size}, "
                f"{eval_split} has {eval_meta.seq_len} / {eval_meta.vocab_size}. Rebuild the dataset."
            )
        self.sample_unit = sample_unit
        self.stream = make_stream(self.train, seed, sample_unit)
        self.curriculum = curriculum
        self.sampler = None
        if curriculum is not None and any(stage.restricts_data for stage in curriculum.stages):
            self.sampler = CurriculumSampler(self.train, seed, curriculum, self.train_difficulty(curriculum.difficulty), sample_unit)

    def train_difficulty(self, measure: str = "changed_cells") -> np.ndarray:
        """Difficulty of every training example (float64 [num_examples]); see ``trm.data.curriculum``."""
        return example_difficulty(self.train, measure, self.path, "train")

    @property
    def model_dims(self) -> dict[str, int]:
        """The data-shape keys the model is built with."""
        meta = self.train.metadata
        return {
            "seq_len": meta.seq_len,
            "vocab_size": meta.vocab_size,
            "num_puzzle_identifiers": max(meta.num_puzzle_identifiers, self.eval.metadata.num_puzzle_identifiers),
        }

    def _tensors(self, split: SplitData, example_idx: np.ndarray, inputs: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
        labels = labels.astype(np.int64)
        labels[labels == split.metadata.ignore_label_id] = IGNORE_LABEL_ID
        return {
            "inputs": torch.from_numpy(inputs.astype(np.int32)),
            "labels": torch.from_numpy(labels),
            "puzzle_identifiers": torch.from_numpy(split.example_puzzle_identifier(example_idx).astype(np.int32)),
        }

    def train_indices(self, global_positions: np.ndarray, step: int | None = None) -> np.ndarray:
        """Training example index of each global stream position, drawn at optimizer ``step``
        (which matters only with a curriculum; None: the full stream)."""
        positions = np.asarray(global_positions, dtype=np.int64)
        if self.sampler is None:
            return self.stream.indices(positions)
        return self.sampler.indices(positions, step)

    def augment_train(self, inputs: np.ndarray, labels: np.ndarray, global_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The configured on-the-fly augmentation of token rows [B, seq_len], row ``i`` keyed by
        ``global_positions[i]`` (rows with equal positions get the same transform)."""
        if self.augment == "sudoku":
            from trm.data.sudoku import augment_at

            return augment_at(inputs, labels, self.seed, global_positions)
        if self.augment == "maze":
            from trm.data.maze import augment_at as maze_augment_at

            return maze_augment_at(inputs, labels, self.seed, global_positions)
        return inputs, labels

    def train_examples(self, global_positions: np.ndarray, step: int | None = None) -> dict[str, torch.Tensor]:
        """Training samples at the given global stream positions (augmented when configured)."""
        idx = self.train_indices(global_positions, step)
        inputs, labels = self.augment_train(np.array(self.train.inputs[idx]), np.array(self.train.labels[idx]), global_positions)
        return self._tensors(self.train, idx, inputs, labels)

    @property
    def num_eval_examples(self) -> int:
        return self.eval.num_examples

    def eval_examples(self, example_idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Evaluation examples at the given indices, never augmented."""
        idx = np.asarray(example_idx, dtype=np.int64)
        return self._tensors(self.eval, idx, np.array(self.eval.inputs[idx]), np.array(self.eval.labels[idx]))
