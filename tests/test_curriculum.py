"""Curriculum: difficulty measures, stage-restricted sampling, depth schedule in the trainer,
clear errors, and exact resume after kill -9 of a curriculum run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import kill_at_checkpoint, run_train, write_config
from test_train import _assert_identical, _checkpoint_state
from trm.config import ConfigError, load_config
from trm.data.curriculum import CurriculumSchedule, Stage, example_difficulty
from trm.data.format import DatasetError, load_split
from trm.data.puzzle_dataset import PuzzleDataset
from trm.data.rag import example_groups
from trm.data.sudoku import BLANK_TOKEN
from trm.train import checkpoint as ckpt
from trm.train import find_latest_checkpoint

CURRICULUM = """curriculum:
  stages:
  - {until_step: 2, max_difficulty: 36, halt_max_steps: 2, H_cycles: 1}
  - {until_step: 6, min_difficulty: 40, max_difficulty: 45}
"""
"""Steps 1-2: <= 36 blanks, 2 supervision steps, 1 H cycle; 3-6: 40-45 blanks; then everything.
With the tiny model (q_halt starts at -5, so nothing halts early) slots load at steps 1, 3, 7."""


pytestmark = pytest.mark.usefixtures("restore_rank_variables")  # in-process trainers set RANK etc.


def _deterministic_metrics(run_dir) -> list[dict]:
    """metrics.jsonl without wall-clock dependent values (time, throughput, memory)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    volatile = ("time", "train/examples_per_s")
    return [{k: v for k, v in r.items() if k not in volatile and not k.startswith("perf/")} for r in rows]


def _blanks(inputs) -> np.ndarray:
    return (np.asarray(inputs) == BLANK_TOKEN).sum(-1)


def test_difficulty_measures(tmp_path, sudoku_dir, rng):
    split = load_split(sudoku_dir, "train")
    np.testing.assert_array_equal(example_difficulty(split, "changed_cells"), _blanks(split.inputs))
    assert (example_difficulty(split, "answer_cells") == 81).all()

    data = tmp_path / "data"
    shutil.copytree(sudoku_dir, data)
    with pytest.raises(DatasetError, match="all__difficulty.npy does not exist"):
        example_difficulty(split, "stored", data, "train")
    stored = rng.random(split.num_examples)
    np.save(data / "train" / "all__difficulty.npy", stored)
    np.testing.assert_array_equal(example_difficulty(split, "stored", data, "train"), stored)
    np.save(data / "train" / "all__difficulty.npy", stored[:-1])
    with pytest.raises(DatasetError, match="one per example"):
        example_difficulty(split, "stored", data, "train")


def test_stages_restrict_sampled_examples_and_then_release_them(sudoku_dir, rng):
    schedule = CurriculumSchedule([Stage(3, max_difficulty=36), Stage(6, min_difficulty=40, max_difficulty=45)])
    ds = PuzzleDataset(sudoku_dir, seed=5, augment="sudoku", curriculum=schedule)
    plain = PuzzleDataset(sudoku_dir, seed=5, augment="sudoku")
    difficulty = ds.train_difficulty()
    positions = rng.integers(0, 20_000, 400)

    early = _blanks(ds.train_examples(positions, step=3)["inputs"])
    middle = _blanks(ds.train_examples(positions, step=4)["inputs"])
    late = ds.train_examples(positions, step=7)
    assert early.max() <= 36 and len(np.unique(early)) > 2
    assert middle.min() >= 40 and middle.max() <= 45
    assert _blanks(late["inputs"]).max() > 36 and _blanks(late["inputs"]).min() < 40  # the data has 30-45 blanks
    for key, value in plain.train_examples(positions).items():
        assert torch.equal(late[key], value), f"after the last stage the stream must be the plain one ({key})"

    groups = example_groups(ds.train)
    kept_groups = np.unique(groups[difficulty <= 36])
    one_epoch = ds.train_indices(np.arange(len(kept_groups)), step=1)
    assert sorted(groups[one_epoch]) == sorted(kept_groups), "one epoch of a stage visits each of its groups once"
    shuffled = rng.permutation(positions)
    np.testing.assert_array_equal(ds.train_indices(shuffled, step=2)[np.argsort(shuffled, kind="stable")],
                                  ds.train_indices(np.sort(positions), step=2))


def test_a_stage_without_examples_and_bad_schedules_are_clear_errors(sudoku_dir, tmp_path):
    with pytest.raises(DatasetError, match=r"stages\[1\] keeps no training example.*Widen the range"):
        PuzzleDataset(sudoku_dir, seed=0, curriculum=CurriculumSchedule([Stage(2, max_difficulty=40), Stage(4, min_difficulty=70)]))
    with pytest.raises(ValueError, match="increasing steps"):
        CurriculumSchedule([Stage(5), Stage(5)])
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir)
    for override, message in [
        ("curriculum.stages=[{until_step: 4, min_difficulty: 40, max_difficulty: 30}]", "min_difficulty 40.0 > max_difficulty 30.0"),
        ("curriculum.stages=[{until_step: 4, halt_max_steps: 0}]", r"stages\[0\].halt_max_steps' .* must be >= 1"),
        ("curriculum.stages=[{until_step: 4, max_dificulty: 3}]", "'max_dificulty' .in a CurriculumStage entry.*Did you mean 'max_difficulty'"),
        ("curriculum.difficulty=blanks", "curriculum.difficulty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(cfg, [override])


def test_trainer_follows_the_data_and_depth_schedule(tmp_path, sudoku_dir):
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    cfg = load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, extra=CURRICULUM))
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, world, build_model_for(cfg, dataset.model_dims, world), dataset)
    drawn, depth = {}, []
    real_examples = dataset.train_examples

    def recording_examples(positions, step=None):
        batch = real_examples(positions, step=step)
        drawn.setdefault(step, []).extend(_blanks(batch["inputs"]).tolist())
        return batch

    dataset.train_examples = recording_examples
    config = trainer.model.config
    trainer.model.register_forward_pre_hook(lambda module, args: depth.append(
        (trainer.step, module.training, config.H_cycles, config.L_cycles, config.halt_max_steps)))
    for step in range(1, 9):
        trainer.step = step
        trainer.train_step()
        assert (config.H_cycles, config.halt_max_steps) == (2, 4), "the full depth is restored after each step"
        if step == 2:
            assert trainer.carry.halted.all() and (trainer.carry.steps == 2).all(), "stage 1 halts every slot at 2 steps"
            trainer.evaluate()

    assert set(drawn) == {1, 3, 7}, "slots are refilled when they halt (after 2, then 4 steps)"
    assert max(drawn[1]) <= 36 and min(drawn[3]) >= 40 and max(drawn[3]) <= 45
    training = {(s, h, l, n) for s, is_training, h, l, n in depth if is_training}
    assert training == {(s, 1, 2, 2) for s in (1, 2)} | {(s, 2, 2, 4) for s in range(3, 9)}
    assert {(h, l) for s, is_training, h, l, n in depth if not is_training} == {(2, 2)}, "evaluation runs at full depth"


def test_curriculum_run_resumes_bit_identically_after_kill(tmp_path, sudoku_dir):
    train = {"max_steps": 9, "checkpoint_interval": 3, "eval_interval": 3}
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    run_train(str(write_config(tmp_path / "a.yaml", straight_dir, sudoku_dir, train, extra=CURRICULUM)))

    cfg_b = write_config(tmp_path / "b.yaml", killed_dir, sudoku_dir, train, extra=CURRICULUM)
    kill_at_checkpoint(cfg_b, killed_dir, 3)
    latest = find_latest_checkpoint(killed_dir)
    assert latest is not None and latest.name != "step_9", "the kill came too late to test anything"

    run_train(str(cfg_b), "mode=resume")
    a, b = ckpt.step_dir(straight_dir, 9), ckpt.step_dir(killed_dir, 9)
    _assert_identical(_checkpoint_state(a), _checkpoint_state(b), "final checkpoint")
    assert _deterministic_metrics(straight_dir) == _deterministic_metrics(killed_dir)
    assert _checkpoint_state(b)["trainer"]["curriculum"]["stages"][0]["halt_max_steps"] == 2

    rows = [json.loads(line) for line in (straight_dir / "metrics.jsonl").read_text().splitlines()]
    halting = {r["step"]: r["train/steps"] for r in rows if r.get("train/halted", 0) > 0}
    assert halting == {2: 2.0, 6: 4.0}, "stage 1 halts after 2 supervision steps, later stages after 4"
