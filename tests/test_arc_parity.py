"""ARC as published: whole-puzzle sampling, the epoch schedule, and the reference's scoring rules.

Checked here: ``data.sample_unit: puzzle`` streams whole puzzles (all examples of one puzzle of
each drawn group, adjacent; every group once per epoch) as a pure function of (seed, position),
and a killed run resumes bit-identically with it; ``configs/arc1.yaml`` resolves the reference's
``int(epochs * total_groups * mean_puzzle_examples / global_batch_size)`` before its first step;
the voter reproduces hand-computed pass@k (votes over two evaluations, an empty crop, an
unlabeled input) and, on random predictions, an independent implementation of the rules of the
reference's ``evaluators/arc.py``. The real-data counts are checked by hand (README).

Run: ``.venv/bin/python -m pytest tests/test_arc_parity.py -q``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY_MODEL, write_config
from trm.data import arc
from trm.data.format import DatasetMetadata, load_identifiers, load_split, write_identifiers, write_split
from trm.data.puzzle_dataset import PuzzleDataset
from trm.data.stream import PuzzleStream, SampleStream, make_stream, shard
from trm.eval.arc_vote import PASS_KS, ArcEvalSet, ArcVoter
from trm.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("restore_rank_variables")  # the in-process trainer sets RANK etc.


def _task(rng: np.random.Generator, task_id: str, demos: int, tests: int, solved: bool = True) -> arc.ArcTask:
    def grid() -> np.ndarray:
        return rng.integers(0, 10, (int(rng.integers(1, 7)), int(rng.integers(1, 7)))).astype(np.uint8)

    return arc.ArcTask(task_id, [(grid(), grid()) for _ in range(demos)], [(grid(), grid() if solved else None) for _ in range(tests)])


@pytest.fixture(scope="module")
def arc_small(tmp_path_factory) -> Path:
    """5 training + 3 test-set tasks with 1-4 demonstrations, 3 augmented versions each (seeded);
    the last test-set task has no known solution."""
    rng = np.random.default_rng(11)
    train = [_task(rng, f"train{i}", int(rng.integers(1, 5)), 1) for i in range(5)]
    tests = [_task(rng, f"eval{i}", int(rng.integers(1, 5)), 1 + i % 2, solved=i < 2) for i in range(3)]
    out = tmp_path_factory.mktemp("arc_small") / "ds"
    arc.build_arc_dataset(out, train, tests, aug=3, seed=2)
    return out


# ---------------------------------------------------------------------------------------- translation


def test_translation_plan_keeps_one_example_per_version_at_the_corner_and_fits_the_canvas() -> None:
    """The reference's rule on a 2x28 pair (input) / 1x3 (output) and three 1x1 pairs."""
    wide, small = (np.zeros((2, 28), np.uint8), np.zeros((1, 3), np.uint8)), (np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.uint8))
    pairs = [wide, small, small, small]
    rng = np.random.default_rng(4)
    versions = [(int(t), np.arange(10, dtype=np.uint8)) for t in rng.integers(0, 8, 400)]
    unshifted, offsets = arc.translation_plan("task", versions, pairs, seed=9)
    assert offsets.shape == (400, 4, 2) and (offsets[np.arange(400), unshifted] == 0).all()
    swapped = np.array([t in (1, 3, 6, 7) for t, _ in versions])
    # the 2x28 grid (28x2 after a transposing transform) always fits, and can move along its short side
    rows, cols = offsets[:, 0, 0], offsets[:, 0, 1]
    assert (np.where(swapped, rows <= 2, rows <= 28)).all() and (np.where(swapped, cols <= 28, cols <= 2)).all()
    assert rows[swapped].max() == 2 and cols[~swapped].max() == 2 and rows[~swapped].max() == 28
    # 1x1 grids: 900 offsets, so a shifted example lands on (0, 0) only by rare chance
    at_corner = (offsets == 0).all(axis=2).sum(axis=1)
    assert (at_corner >= 1).all() and (at_corner == 1).mean() > 0.95
    assert set(unshifted.tolist()) == {0, 1, 2, 3}  # the exempt example is drawn, not fixed
    again = arc.translation_plan("task", versions, pairs, seed=9)
    assert np.array_equal(again[1], offsets) and not np.array_equal(arc.translation_plan("task", versions, pairs, seed=10)[1], offsets)


# ---------------------------------------------------------------------------------------- sampling


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the maximal runs of equal values."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    bounds = np.concatenate([[0], cuts, [len(values)]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def test_puzzle_stream_draws_whole_puzzles_one_per_group_per_epoch(arc_small: Path) -> None:
    split = load_split(arc_small, "train")
    stream = make_stream(split, seed=5, unit="puzzle")
    assert isinstance(stream, PuzzleStream) and stream.uniform_groups  # an ARC task's versions share their size
    epochs = 6
    examples = stream.take(epochs * stream.epoch_length)
    puzzles = split.example_puzzle(examples)
    group_of_puzzle = np.searchsorted(split.group_indices, np.arange(split.num_puzzles), side="right") - 1
    for e in range(epochs):
        lo, hi = e * stream.epoch_length, (e + 1) * stream.epoch_length
        runs = _runs(puzzles[lo:hi])
        # each draw: ALL examples of one puzzle, adjacent, each once (in some order)
        for a, b in runs:
            p = puzzles[lo + a]
            assert sorted(examples[lo + a:lo + b].tolist()) == list(range(split.puzzle_indices[p], split.puzzle_indices[p + 1]))
        # one puzzle per group: every group exactly once per epoch
        assert sorted(group_of_puzzle[puzzles[lo + a]] for a, _ in runs) == list(range(split.num_groups))
    # examples are shuffled inside their draw, versions vary across epochs
    multi = [(a, b) for a, b in _runs(puzzles) if b - a > 2]
    assert any(examples[a:b].tolist() != sorted(examples[a:b].tolist()) for a, b in multi)
    assert len(set(puzzles.tolist())) > split.num_groups
    # a pure function of (seed, position): any order, any shard, a fresh stream
    positions = np.random.default_rng(0).permutation(len(examples))
    assert np.array_equal(make_stream(split, 5, "puzzle").indices(positions), examples[positions])
    fresh = make_stream(split, 5, "puzzle")
    fresh.load_state_dict({"position": 37, "seed": 5})
    assert np.array_equal(fresh.take_shard(20, 0, 3), examples[shard(np.arange(37, 57), 0, 3)])
    assert not np.array_equal(make_stream(split, 6, "puzzle").take(200), examples[:200])
    # the dataset hands the trainer those rows: a batch's first rows are the first whole puzzles
    dataset = PuzzleDataset(arc_small, seed=5, sample_unit="puzzle")
    batch = dataset.train_examples(np.arange(24))
    ids = batch["puzzle_identifiers"].numpy()
    assert np.array_equal(ids, split.puzzle_identifiers[puzzles[:24]])
    assert all(len(set(ids[a:b].tolist())) == 1 for a, b in _runs(ids))


def test_puzzle_stream_with_puzzles_of_different_sizes_in_a_group() -> None:
    """Epochs of varying length are located by summing them once; still a pure function."""
    puzzle_indices = np.array([0, 3, 4, 6, 11, 12, 14, 15])  # sizes 3 1 2 5 1 2 1
    group_indices = np.array([0, 2, 5, 7])
    stream = PuzzleStream((puzzle_indices, group_indices), seed=3)
    assert not stream.uniform_groups and stream.epoch_length is None
    first = stream.take(400)
    puzzles = np.searchsorted(puzzle_indices, first, side="right") - 1
    for e in range(20):  # within an epoch, consecutive draws are different groups
        lo, hi = stream.epoch_start(e), stream.epoch_start(e + 1)
        runs = _runs(puzzles[lo:hi])
        assert len(runs) == 3 and hi <= 400
        for a, b in runs:
            p = puzzles[lo + a]
            assert sorted(first[lo + a:lo + b].tolist()) == list(range(puzzle_indices[p], puzzle_indices[p + 1]))
    again = PuzzleStream((puzzle_indices, group_indices), seed=3)
    assert np.array_equal(again.indices(np.arange(400)[::-1]), first[::-1])
    assert again.epoch_start(5) == stream.epoch_start(5) > 0
    with pytest.raises(ValueError, match="sample unit"):
        make_stream((puzzle_indices, group_indices), 0, "task")
    assert type(make_stream((puzzle_indices, group_indices), 0)) is SampleStream


def _regrouped_sudoku(sudoku_dir: Path, out: Path) -> Path:
    """The sudoku fixture with its train examples grouped as puzzles of 1-3 examples (small and fast)."""
    train = load_split(sudoku_dir, "train")
    sizes = np.resize([3, 1, 2], train.num_examples)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), train.num_examples, side="right")]
    n = int(sizes.sum())
    arrays = {"inputs": np.asarray(train.inputs[:n]), "labels": np.asarray(train.labels[:n]),
              "puzzle_identifiers": np.arange(1, len(sizes) + 1, dtype=np.int32),
              "puzzle_indices": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
              "group_indices": np.arange(0, len(sizes) + 1, 2, dtype=np.int32) if len(sizes) % 2 == 0 else
              np.concatenate([np.arange(0, len(sizes), 2), [len(sizes)]]).astype(np.int32)}
    meta = train.metadata
    for split, data in (("train", arrays), ("test", None)):
        if data is None:
            test = load_split(sudoku_dir, "test")
            data = {"inputs": np.asarray(test.inputs), "labels": np.asarray(test.labels), "puzzle_identifiers": np.asarray(test.puzzle_identifiers),
                    "puzzle_indices": np.asarray(test.puzzle_indices), "group_indices": np.asarray(test.group_indices)}
        written = DatasetMetadata.from_arrays({"all": data}, vocab_size=meta.vocab_size, seq_len=meta.seq_len,
                                              num_puzzle_identifiers=len(sizes) + 1, ignore_label_id=meta.ignore_label_id)
        write_split(out, split, written, {"all": data})
    write_identifiers(out, ["<blank>"] + [f"p{i}" for i in range(len(sizes))])
    return out


class _Crash(Exception):
    pass


def _trainer(cfg_path: Path, resume_from: Path | None = None):
    """What ``python -m trm.train`` builds, in this process (same seeding order)."""
    import torch

    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    cfg = load_config(cfg_path, ["mode=resume"] if resume_from else [])
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, dataset.model_dims, world)
    torch.manual_seed(cfg.seed * 1_000_003 + world.rank + 1)
    return build_trainer(cfg, world, model, dataset, resume_from)


def test_resume_after_a_crash_is_bit_identical_with_whole_puzzle_sampling(tmp_path: Path, sudoku_dir: Path) -> None:
    """6 steps straight == 3 steps, a crash right after checkpoint 3, a fresh trainer resuming to 6
    (in process; tests/test_train.py kills a real process for the checkpoint side of this)."""
    from test_train import _assert_identical, _checkpoint_state, _metrics

    data = _regrouped_sudoku(sudoku_dir, tmp_path / "grouped")
    train = {"max_steps": 6, "checkpoint_interval": 3, "eval_interval": 0}
    straight_dir, crashed_dir = tmp_path / "straight", tmp_path / "crashed"
    for name, run_dir in (("a", straight_dir), ("b", crashed_dir)):
        cfg = write_config(tmp_path / f"{name}.yaml", run_dir, data, train, {"halt_max_steps": 2})  # slots refill every 2 steps
        loaded = yaml.safe_load(cfg.read_text())
        loaded["data"]["sample_unit"] = "puzzle"
        cfg.write_text(yaml.safe_dump(loaded))
    _trainer(tmp_path / "a.yaml").fit()
    crashing = _trainer(tmp_path / "b.yaml")
    save = crashing.save_checkpoint

    def save_then_crash():
        path = save()
        if crashing.step == 3:
            raise _Crash
        return path

    crashing.save_checkpoint = save_then_crash
    with pytest.raises(_Crash):
        crashing.fit()
    crashing.metrics.close()
    assert ckpt.find_latest_checkpoint(crashed_dir).name == "step_3"
    resumed = _trainer(tmp_path / "b.yaml", ckpt.step_dir(crashed_dir, 3))
    resumed.fit()
    assert resumed.stream_position > crashing.stream_position >= 8  # the resumed run read on from the saved position
    _assert_identical(_checkpoint_state(ckpt.step_dir(straight_dir, 6)), _checkpoint_state(ckpt.step_dir(crashed_dir, 6)), "final checkpoint")
    assert _metrics(straight_dir) == _metrics(crashed_dir)
    assert "sample_unit: puzzle" in (straight_dir / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------- schedule


class _Stop(Exception):
    pass


def test_arc1_recipe_resolves_the_reference_step_count_before_its_first_step(arc_small: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    tiny = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in {**TINY_MODEL, "mlp_t": False, "pos_encodings": "rope"}.items()]
    cfg = load_config(REPO / "configs" / "arc1.yaml", [f"data.path={arc_small}", f"run_dir={tmp_path / 'run'}", "device=cpu",
                                                      "train.global_batch_size=8", *tiny])
    assert cfg.train.max_steps is None and cfg.train.epochs == 100000 and cfg.data.sample_unit == "puzzle"
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    trainer = build_trainer(cfg, world, build_model_for(cfg, dataset.model_dims, world), dataset)
    meta = json.loads((arc_small / "train" / "dataset.json").read_text())
    expected = int(100000 * meta["total_groups"] * meta["mean_puzzle_examples"] / 8)  # the reference's pretrain.py
    assert expected > 1000 and cfg.train.max_steps == expected
    assert cfg.train.eval_interval == cfg.train.checkpoint_interval == int(10000 * meta["total_groups"] * meta["mean_puzzle_examples"] / 8)
    assert f"train.max_steps {expected}" in capsys.readouterr().out
    # an evaluation counts only labeled examples; the voter scores the tasks with solutions
    from test_eval_arc import _fake_forward

    labels = np.asarray(load_split(arc_small, "test").labels)
    monkeypatch.setattr(trainer.model, "forward", _fake_forward(lambda t: t, np.random.default_rng(0)))
    metrics = trainer.evaluate(submission_path=tmp_path / "submission.json")
    assert metrics["eval/count"] == (labels != 0).any(axis=1).sum() < len(labels)
    assert metrics["eval/exact_accuracy"] == 1.0 and metrics["eval/arc/pass@1"] == 1.0  # the fake model answers the labels
    assert metrics["eval/arc/tasks_scored"] == 2 and "eval/arc/pass@1000" in metrics
    monkeypatch.undo()

    def stop():
        raise _Stop

    trainer.train_step = stop
    with pytest.raises(_Stop):
        trainer.fit()
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert resolved["max_steps"] == expected and resolved["eval_interval"] == cfg.train.eval_interval
    # given steps win over epochs; neither is an error
    assert load_config(REPO / "configs" / "arc1.yaml", ["train.max_steps=5"]).train.max_steps == 5
    from trm.config import ConfigError

    with pytest.raises(ConfigError, match="Neither train.max_steps nor train.epochs"):
        load_config(REPO / "configs" / "arc1.yaml", ["train.epochs=null"])


# ----------------------------------------------------------------------------------------- scoring


def _reference_layout(root: Path, tasks: dict[str, arc.ArcTask], versions: list[tuple[int, np.ndarray]]) -> None:
    """A test split written the reference's way: one puzzle per version, '<task>|||t<k>|||<perm>'
    names, test_puzzles.json with the solutions where known."""
    names, inputs, labels, puzzle_ids, puzzle_indices, group_indices = ["<blank>"], [], [], [], [0], [0]
    for task in tasks.values():
        for t, colours in versions:
            names.append(arc.version_name(task.task_id, t, colours))
            for inp, out in task.test:
                inputs.append(arc.encode_grid(arc.augment_grid(inp, t, colours)))
                labels.append(arc.encode_grid(arc.augment_grid(out, t, colours)) if out is not None else np.zeros(900, np.uint8))
            puzzle_ids.append(len(names) - 1)
            puzzle_indices.append(len(inputs))
        group_indices.append(len(puzzle_ids))
    data = {"inputs": np.stack(inputs), "labels": np.stack(labels), "puzzle_identifiers": np.array(puzzle_ids, np.int32),
            "puzzle_indices": np.array(puzzle_indices, np.int32), "group_indices": np.array(group_indices, np.int32)}
    write_split(root, "test", DatasetMetadata.from_arrays({"all": data}, vocab_size=12, seq_len=900, num_puzzle_identifiers=len(names)), {"all": data})
    write_identifiers(root, names)
    (root / arc.TEST_PUZZLES_FILE).write_text(json.dumps({k: t.to_json() for k, t in tasks.items()}))


VERSIONS = [(0, np.arange(10, dtype=np.uint8)), (6, np.array([0, 3, 1, 2, 9, 8, 7, 6, 5, 4], np.uint8))]


def test_voter_reproduces_hand_computed_pass_at_k(tmp_path: Path) -> None:
    """Two evaluations; task aa (1 test input), bb (2), cc (no solution: not scored)."""
    g = lambda *rows: np.array(rows, np.uint8)  # noqa: E731
    sol_a, sol_b0, sol_b1 = g([1, 2], [3, 4]), g([5, 5, 5]), g([6], [7])
    wrong, other = g([9, 9], [9, 9]), g([8])
    tasks = {"aa": arc.ArcTask("aa", [(g([1]), g([2]))], [(g([0, 1]), sol_a)]),
             "bb": arc.ArcTask("bb", [(g([1]), g([2]))], [(g([2, 2]), sol_b0), (g([3], [3]), sol_b1)]),
             "cc": arc.ArcTask("cc", [(g([1]), g([2]))], [(g([4]), None)])}
    _reference_layout(tmp_path, tasks, VERSIONS)
    es = ArcEvalSet.from_dataset(tmp_path)
    example = {(task, test, v): e for e in range(es.num_examples)
               for task, test, v in [(es.task_ids[es.example_task[e]], int(es.example_test[e]), int(es.example_transform[e] != 0))]}
    empty = np.zeros(900, np.uint8)

    def canvas(grid: np.ndarray | None, v: int) -> np.ndarray:
        return empty if grid is None else arc.encode_grid(arc.augment_grid(grid, *VERSIONS[v]))

    # (task, test input, version) -> (grid in original colours or None = empty crop, q_halt) per evaluation
    first = {("aa", 0, 0): (sol_a, 2.0), ("aa", 0, 1): (wrong, 3.0), ("bb", 0, 0): (None, 5.0), ("bb", 0, 1): (None, 5.0),
             ("bb", 1, 0): (sol_b1, 2.0), ("bb", 1, 1): (other, 1.0), ("cc", 0, 0): (wrong, 0.0), ("cc", 0, 1): (None, 0.0)}
    second = {("aa", 0, 0): (wrong, 1.0), ("aa", 0, 1): (wrong, 1.0), ("bb", 0, 0): (sol_b0, 0.0), ("bb", 0, 1): (None, 5.0),
              ("bb", 1, 0): (other, 1.0), ("bb", 1, 1): (sol_b1, 2.0), ("cc", 0, 0): (wrong, 0.0), ("cc", 0, 1): (wrong, 0.0)}

    def vote(voter: ArcVoter, evaluation: dict) -> None:
        voter.begin_evaluation()
        keys = list(evaluation)
        voter.add(np.array([example[k] for k in keys]), np.stack([canvas(evaluation[k][0], k[2]) for k in keys]),
                  np.array([evaluation[k][1] for k in keys]))

    def scores(**options) -> dict:
        voter = ArcVoter(es, **options)
        vote(voter, first)
        vote(voter, second)
        return voter.results()

    # by hand, accumulated (the default): aa: wrong 3 votes > sol 1 -> rank 2. bb/0: empty 3 > sol 1 -> rank 2.
    # bb/1: sol 2 votes (mean sigmoid(2)) vs other 2 (sigmoid(1)) -> rank 1. Task scores @1: 0, 1/2; @2: 1, 1.
    default = scores()
    assert default["pass@1"] == pytest.approx(0.25) and default["pass@2"] == 1.0 and default["pass@1000"] == 1.0
    assert default["tasks_scored"] == 2 and default["votes"] == 16 and default["abstained"] == 0
    assert [k for k in default if k.startswith("pass@")] == [f"pass@{k}" for k in PASS_KS]
    # opt-in: empty crops abstain -> bb/0 has only its solution: bb scores 1 at k=1
    assert scores(abstain_empty=True)["pass@1"] == pytest.approx(0.5) and scores(abstain_empty=True)["abstained"] == 4
    # opt-in: per-evaluation votes (second only): aa: wrong 2, sol absent -> 0 at every k; bb/0: empty (q 5)
    # beats sol (q 0) at one vote each -> rank 2; bb/1: sol (q 2) beats other (q 1) -> rank 1
    fresh = scores(accumulate=False)
    assert fresh["pass@1"] == pytest.approx(0.25) and fresh["pass@2"] == pytest.approx(0.5) and fresh["pass@1000"] == pytest.approx(0.5)
    # the submission never holds an empty grid
    submission = ArcVoter(es)
    vote(submission, first)
    assert submission.submission()["bb"][0] == {"attempt_1": [[0]], "attempt_2": [[0]]}


def _reference_rules(root: Path, evaluations: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ks) -> dict[str, float]:
    """pass@k by the rules of the reference's evaluators/arc.py, written independently: every
    prediction (over all evaluations) is cropped, de-augmented by its puzzle's name and voted
    under (task, de-augmented input grid); candidates rank by (count, mean sigmoid q) descending;
    a task scores the fraction of its test pairs solved; the mean runs over test_puzzles.json."""
    test = load_split(root, "test")
    names = load_identifiers(root)
    votes: dict[tuple[str, bytes], dict[bytes, list[float]]] = {}
    for indices, canvases, q in evaluations:
        for e, tokens, qe in zip(indices, canvases, q):
            puzzle = int(test.example_puzzle(np.array([e]))[0])
            task, t, colours = arc.parse_version_name(names[test.puzzle_identifiers[puzzle]])
            key = (task, _key(arc.invert_grid(arc.decode_grid(test.inputs[e]), t, colours)))
            pred = _key(arc.invert_grid(arc.decode_grid(tokens), t, colours))
            stats = votes.setdefault(key, {}).setdefault(pred, [0, 0.0])
            stats[0] += 1
            stats[1] += 1 / (1 + np.exp(-float(qe)))
    puzzles = json.loads((root / arc.TEST_PUZZLES_FILE).read_text())
    total = {k: 0.0 for k in ks}
    for task, puzzle in puzzles.items():
        solved = {k: 0 for k in ks}
        for pair in puzzle["test"]:
            ranked = sorted(votes.get((task, _key(np.array(pair["input"], np.uint8))), {}).items(),
                            key=lambda kv: (kv[1][0], kv[1][1] / kv[1][0]), reverse=True)
            label = _key(np.array(pair["output"], np.uint8))
            for k in ks:
                solved[k] += any(h == label for h, _ in ranked[:k])
        for k in ks:
            total[k] += solved[k] / len(puzzle["test"])
    return {f"pass@{k}": total[k] / len(puzzles) for k in ks}


def _key(grid: np.ndarray) -> bytes:
    return bytes(grid.shape) + grid.tobytes()


def test_voter_gives_the_reference_evaluators_pass_at_k_on_random_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tasks = {f"t{i}": _task(rng, f"t{i}", 2, 1 + i % 3) for i in range(6)}
    versions = [(0, np.arange(10, dtype=np.uint8))] + [(int(rng.integers(8)), np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8))
                                                       for _ in range(5)]
    _reference_layout(tmp_path, tasks, versions)
    es = ArcEvalSet.from_dataset(tmp_path)
    test = load_split(tmp_path, "test")
    pool = [np.full((2, 2), c, np.uint8) for c in range(3)]  # a few wrong answers, so votes pile up
    evaluations = []
    for _ in range(2):
        canvases = []
        for e in range(test.num_examples):
            choice = rng.integers(4)
            label = np.asarray(test.labels[e])
            t, colours = int(es.example_transform[e]), es.example_colours[e]
            canvases.append(label if choice == 0 else np.zeros(900, np.uint8) if choice == 1
                            else arc.encode_grid(arc.augment_grid(pool[int(rng.integers(3))], t, colours)))
        order = rng.permutation(test.num_examples)
        evaluations.append((order, np.stack(canvases)[order], rng.normal(size=test.num_examples)))
    voter = ArcVoter(es)
    for indices, canvases, q in evaluations:
        voter.begin_evaluation()
        for chunk in np.array_split(np.arange(len(indices)), 3):
            voter.add(indices[chunk], canvases[chunk], q[chunk])
    ours = voter.results()
    reference = _reference_rules(tmp_path, evaluations, PASS_KS)
    assert {k: ours[k] for k in reference} == pytest.approx(reference)
    assert 0 < reference["pass@1"] < reference["pass@1000"]
    # the rules matter: abstaining on empty crops, or forgetting the first evaluation, scores otherwise
    for option in ({"abstain_empty": True}, {"accumulate": False}):
        other = ArcVoter(es, **option)
        for indices, canvases, q in evaluations:
            other.begin_evaluation()
            other.add(indices, canvases, q)
        assert any(other.results()[k] != pytest.approx(reference[k]) for k in reference), option
