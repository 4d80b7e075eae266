"""Data layer: dataset format, Sudoku generator/augmentation/builders, sample stream, CLI.

Run: ``python -m pytest tests/test_data.py -q`` (CPU only, well under a minute).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trm.data import DatasetError, DatasetMetadata, SampleStream, SplitData, build_sudoku, load_split, write_split
from trm.data.format import load_identifiers, split_file, write_identifiers
from trm.data.stream import keyed_uniforms, shard
from trm.data import sudoku
from trm.data.sudoku import (
    BLANK_TOKEN,
    PuzzleGenerationError,
    augment,
    augment_at,
    count_solutions,
    generate_puzzle,
    generate_puzzles,
    import_sudoku_csv,
    solve,
    summarize,
    valid_solutions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_ARGS = dict(train_puzzles=24, test_puzzles=16, aug=3, seed=7, min_blanks=45, max_blanks=55, test_min_blanks=50, test_max_blanks=56)


def digits(tokens: np.ndarray) -> np.ndarray:
    """Token ids -> digits with 0 for a blank cell."""
    return np.asarray(tokens).astype(np.int64) - 1


def assert_consistent(inputs: np.ndarray, labels: np.ndarray) -> None:
    """Labels are valid solved grids and keep every clue of the inputs."""
    puzzle, solution = digits(inputs).reshape(-1, 81), digits(labels).reshape(-1, 81)
    assert valid_solutions(solution).all()
    assert ((puzzle == 0) | (puzzle == solution)).all()


def dataset_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sudoku") / "ds"
    build_sudoku(root, workers=2, **BUILD_ARGS)
    return root


@pytest.fixture(scope="module")
def puzzles() -> tuple[np.ndarray, np.ndarray]:
    return generate_puzzles(10, seed=3, min_blanks=50, max_blanks=56, workers=1)


# ---------------------------------------------------------------------------------------------
# Solver and generator


def test_solver_counts_and_solves() -> None:
    puzzle, solution = generate_puzzle(seed=1, index=0, min_blanks=54, max_blanks=54)
    assert count_solutions(puzzle) == 1
    assert np.array_equal(solve(puzzle), solution)
    assert np.array_equal(solve(puzzle.reshape(9, 9)), solution.reshape(9, 9))
    assert count_solutions(np.zeros(81, np.int64), limit=5) == 5
    clash = np.zeros(81, np.int64)
    clash[0] = clash[1] = 4
    assert count_solutions(clash) == 0 and solve(clash) is None
    with pytest.raises(ValueError, match="81 cells"):
        count_solutions(np.zeros(80, np.int64))


def test_generated_puzzles_are_unique_with_requested_blanks(puzzles: tuple[np.ndarray, np.ndarray]) -> None:
    puzzle, solution = puzzles
    assert puzzle.shape == solution.shape == (10, 81) and puzzle.dtype == np.uint8
    blanks = (puzzle == 0).sum(axis=1)
    assert ((blanks >= 50) & (blanks <= 56)).all()
    assert valid_solutions(solution).all()
    assert ((puzzle == 0) | (puzzle == solution)).all()
    for p, s in zip(puzzle, solution):
        assert count_solutions(p) == 1
        assert np.array_equal(solve(p), s)
    assert len({p.tobytes() for p in puzzle}) == len(puzzle)


def test_generation_does_not_depend_on_worker_count(puzzles: tuple[np.ndarray, np.ndarray]) -> None:
    parallel = generate_puzzles(10, seed=3, min_blanks=50, max_blanks=56, workers=2)
    assert np.array_equal(parallel[0], puzzles[0]) and np.array_equal(parallel[1], puzzles[1])
    tail = generate_puzzles(4, seed=3, min_blanks=50, max_blanks=56, start=6, workers=1)
    assert np.array_equal(tail[0], puzzles[0][6:])


def test_excluded_and_duplicate_puzzles_are_replaced_by_later_indices(puzzles: tuple[np.ndarray, np.ndarray]) -> None:
    exclude = {puzzles[0][0].tobytes(), puzzles[0][2].tobytes()}
    kept, solutions = sudoku._generate_distinct(8, 3, sudoku.TRAIN_STREAM, 50, 56, workers=1, exclude=exclude)
    assert np.array_equal(kept, puzzles[0][[1, 3, 4, 5, 6, 7, 8, 9]])
    assert np.array_equal(solutions, puzzles[1][[1, 3, 4, 5, 6, 7, 8, 9]])


def test_unreachable_blank_count_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sudoku, "MAX_GRIDS_PER_PUZZLE", 2)
    with pytest.raises(PuzzleGenerationError, match=">= 64 blanks.*after 2 grids.*lower min_blanks"):
        generate_puzzles(1, seed=0, min_blanks=64, max_blanks=64, workers=1)


def test_blank_range_is_validated() -> None:
    with pytest.raises(ValueError, match="larger than"):
        generate_puzzles(1, seed=0, min_blanks=50, max_blanks=40)
    with pytest.raises(ValueError, match="0..64"):
        generate_puzzles(1, seed=0, min_blanks=10, max_blanks=65)


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_augment_keeps_validity_uniqueness_and_consistency(puzzles: tuple[np.ndarray, np.ndarray]) -> None:
    inputs = np.repeat(puzzles[0] + 1, 20, axis=0).astype(np.uint8)
    labels = np.repeat(puzzles[1] + 1, 20, axis=0).astype(np.uint8)
    new_inputs, new_labels = augment(inputs, labels, np.random.default_rng(0))
    assert new_inputs.shape == inputs.shape and new_inputs.dtype == np.uint8 and new_labels.dtype == np.uint8
    assert_consistent(new_inputs, new_labels)
    assert np.array_equal((new_inputs == BLANK_TOKEN).sum(axis=1), (inputs == BLANK_TOKEN).sum(axis=1))
    assert len({row.tobytes() for row in new_inputs}) == len(new_inputs)
    for row in new_inputs[::17]:
        assert count_solutions(digits(row)) == 1
    again = augment(inputs, labels, np.random.default_rng(0))
    assert np.array_equal(again[0], new_inputs) and np.array_equal(again[1], new_labels)


def source_cells(seed: int) -> np.ndarray:
    """For each output cell, the input cell it reads under ``augment(..., default_rng(seed))``.

    Probes hold only tokens 0 and 1 (pad, blank), which the digit map keeps: probe ``b`` marks the
    cells whose index has bit ``b`` set, so 7 probes spell out every source index.
    """
    source = np.zeros(81, np.int64)
    for bit in range(7):
        probe = ((np.arange(81) >> bit) & 1).astype(np.uint8)
        moved, _ = augment(probe, probe, np.random.default_rng(seed))
        source |= moved.astype(np.int64) << bit
    return source


def test_augment_is_the_spec_symmetry_group(puzzles: tuple[np.ndarray, np.ndarray]) -> None:
    """Each transform = optional transpose, band + row-in-band shuffle, stack + column-in-stack
    shuffle, and a digit permutation (blank fixed); transposes happen about half the time."""
    label = (puzzles[1][0] + 1).astype(np.uint8)
    transposes, seen = 0, set()
    orders: dict[str, set[tuple[int, ...]]] = {}
    for seed in range(200):
        source = source_cells(seed).reshape(9, 9)
        assert sorted(source.ravel().tolist()) == list(range(81))
        seen.add(source.tobytes())
        rows_fixed = (source // 9 == (source // 9)[:, :1]).all()
        transposed = (source % 9 == (source % 9)[:, :1]).all()
        assert rows_fixed != transposed
        transposes += int(transposed)
        row_of = (source % 9 if transposed else source // 9)[:, 0]
        col_of = (source // 9 if transposed else source % 9)[0, :]
        for axis, perm in (("row", row_of), ("col", col_of)):
            assert sorted(perm.tolist()) == list(range(9))
            assert all(len(set((perm[3 * k : 3 * k + 3] // 3).tolist())) == 1 for k in range(3))
            orders.setdefault(f"{axis} blocks", set()).add(tuple((perm[::3] // 3).tolist()))
            for k in range(3):
                orders.setdefault(f"{axis}s in block {k}", set()).add(tuple((perm[3 * k : 3 * k + 3] % 3).tolist()))
        _, new_label = augment(label, label, np.random.default_rng(seed))
        digit_map = dict(zip(label[source.ravel()].tolist(), new_label.tolist()))
        assert sorted(digit_map) == sorted(digit_map.values()) == list(range(2, 11))
        orders.setdefault("digits", set()).add(tuple(digit_map[t] for t in range(2, 11)))
    assert len(seen) > 190
    assert 70 < transposes < 130
    assert len(orders.pop("digits")) > 190
    assert all(len(found) == 6 for found in orders.values()), {name: len(found) for name, found in orders.items()}


def test_augment_keeps_pad_and_blank_tokens() -> None:
    inputs = np.full((3, 81), 0, dtype=np.int64)
    inputs[:, :9] = np.arange(2, 11)
    inputs[:, 9:20] = BLANK_TOKEN
    new_inputs, _ = augment(inputs, inputs.copy(), np.random.default_rng(2))
    assert new_inputs.dtype == np.int64
    assert ((new_inputs == 0).sum(axis=1) == 61).all() and ((new_inputs == BLANK_TOKEN).sum(axis=1) == 11).all()
    assert all(sorted(row[row >= 2].tolist()) == list(range(2, 11)) for row in new_inputs)
    with pytest.raises(ValueError, match="outside"):
        augment(inputs + 20, inputs, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        augment(inputs[:, :80], inputs[:, :80], np.random.default_rng(0))


def test_augment_at_is_a_pure_function_of_position(puzzles: tuple[np.ndarray, np.ndarray]) -> None:
    inputs, labels = (puzzles[0] + 1).astype(np.uint8), (puzzles[1] + 1).astype(np.uint8)
    positions = np.arange(5000, 5010)
    full = augment_at(inputs, labels, seed=3, global_positions=positions)
    part = augment_at(inputs[4:7], labels[4:7], seed=3, global_positions=positions[4:7])
    assert np.array_equal(full[0][4:7], part[0]) and np.array_equal(full[1][4:7], part[1])
    assert_consistent(*full)
    other_seed = augment_at(inputs, labels, seed=4, global_positions=positions)
    assert not np.array_equal(other_seed[0], full[0])


# ---------------------------------------------------------------------------------------------
# Builder


def test_built_dataset_layout_and_contents(built: Path) -> None:
    train, test = load_split(built, "train"), load_split(built, "test")
    assert load_identifiers(built) == ["<blank>"]
    copies = 1 + BUILD_ARGS["aug"]
    for split, puzzles_count, stored in ((train, BUILD_ARGS["train_puzzles"], copies), (test, BUILD_ARGS["test_puzzles"], 1)):
        meta = split.metadata
        assert (meta.pad_id, meta.ignore_label_id, meta.blank_identifier_id, meta.vocab_size, meta.seq_len) == (0, 0, 0, 11, 81)
        assert meta.sets == ["all"] and meta.num_puzzle_identifiers == 1
        assert split.num_examples == split.num_puzzles == meta.total_puzzles == puzzles_count * stored
        assert split.num_groups == meta.total_groups == puzzles_count
        assert np.array_equal(split.group_indices, np.arange(0, split.num_puzzles + 1, stored))
        assert np.array_equal(split.puzzle_indices, np.arange(split.num_examples + 1))
        assert (split.puzzle_identifiers == 0).all()
        assert split.inputs.dtype == np.uint8 and split.labels.dtype == np.uint8
        assert_consistent(split.inputs, split.labels)
    train_blanks = (np.asarray(train.inputs) == BLANK_TOKEN).sum(axis=1)
    test_blanks = (np.asarray(test.inputs) == BLANK_TOKEN).sum(axis=1)
    assert ((train_blanks >= 45) & (train_blanks <= 55)).all() and ((test_blanks >= 50) & (test_blanks <= 56)).all()
    # Augmented copies keep their group's blank count and are distinct, uniquely solvable puzzles.
    assert (train_blanks.reshape(-1, copies) == train_blanks[::copies, None]).all()
    for row in np.asarray(train.inputs)[1::copies][:6]:
        assert count_solutions(digits(row)) == 1
    assert len({r.tobytes() for r in np.asarray(train.inputs)}) == train.num_examples
    train_rows = {r.tobytes() for r in np.asarray(train.inputs)}
    assert not train_rows & {r.tobytes() for r in np.asarray(test.inputs)}


def test_build_is_deterministic_for_any_worker_count(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_sudoku(again, workers=1, **BUILD_ARGS)
    assert dataset_files(again) == dataset_files(built)
    other = tmp_path / "other"
    build_sudoku(other, workers=1, **{**BUILD_ARGS, "seed": 8})
    assert dataset_files(other)["train/all__inputs.npy"] != dataset_files(built)["train/all__inputs.npy"]


def test_summary_reports_counts_and_blank_histogram(built: Path) -> None:
    text = summarize(built)
    assert "examples 96, puzzles 96, groups 24" in text
    assert "seq_len 81, vocab_size 11" in text
    blanks = (np.asarray(load_split(built, "test").inputs) == BLANK_TOKEN).sum(axis=1)
    value = int(np.bincount(blanks).argmax())
    assert f"{value:4d} blanks {int((blanks == value).sum()):9d}" in text


# ---------------------------------------------------------------------------------------------
# Format: round trip, hand-written reference layout, corrupt directories


def two_set_arrays() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "a": {
            "inputs": rng.integers(0, 300, (5, 4)),
            "labels": rng.integers(0, 300, (5, 4)),
            "puzzle_identifiers": np.array([1, 2, 3]),
            "puzzle_indices": np.array([0, 2, 3, 5]),
            "group_indices": np.array([0, 2, 3]),
        },
        "b": {
            "inputs": rng.integers(0, 300, (3, 4)),
            "labels": rng.integers(0, 300, (3, 4)),
            "puzzle_identifiers": np.array([4, 1]),
            "puzzle_indices": np.array([0, 1, 3]),
            "group_indices": np.array([0, 2]),
        },
    }


def test_write_load_round_trip_concatenates_sets(tmp_path: Path) -> None:
    arrays = two_set_arrays()
    meta = DatasetMetadata.from_arrays(arrays, vocab_size=300, seq_len=4, num_puzzle_identifiers=5)
    assert (meta.total_groups, meta.total_puzzles, meta.mean_puzzle_examples, meta.sets) == (3, 5, 8 / 5, ["a", "b"])
    write_split(tmp_path, "train", meta, arrays)
    split = load_split(tmp_path, "train")
    assert isinstance(split, SplitData) and split.metadata == meta
    assert np.load(split_file(tmp_path, "train", "a", "inputs")).dtype == np.int32
    assert np.load(split_file(tmp_path, "train", "a", "puzzle_indices")).dtype == np.int32
    assert np.array_equal(split.inputs, np.concatenate([arrays["a"]["inputs"], arrays["b"]["inputs"]]))
    assert np.array_equal(split.puzzle_indices, [0, 2, 3, 5, 6, 8])
    assert np.array_equal(split.group_indices, [0, 2, 3, 5])
    assert np.array_equal(split.puzzle_identifiers, [1, 2, 3, 4, 1])
    assert split.set_example_ranges == {"a": (0, 5), "b": (5, 8)}
    assert (split.num_examples, split.num_puzzles, split.num_groups) == (8, 5, 3)
    assert np.array_equal(split.example_puzzle_identifier(np.arange(8)), [1, 1, 2, 3, 3, 4, 1, 1])


def test_hand_written_reference_directory_loads(tmp_path: Path) -> None:
    """Exactly what the reference's build_sudoku_dataset.py writes (total_puzzles = groups there)."""
    split_dir = tmp_path / "train"
    split_dir.mkdir()
    inputs = np.random.default_rng(0).integers(1, 11, (6, 81)).astype(np.uint8)
    labels = np.random.default_rng(1).integers(2, 11, (6, 81)).astype(np.uint8)
    np.save(split_dir / "all__inputs.npy", inputs)
    np.save(split_dir / "all__labels.npy", labels)
    np.save(split_dir / "all__puzzle_identifiers.npy", np.zeros(6, np.int32))
    np.save(split_dir / "all__puzzle_indices.npy", np.arange(7, dtype=np.int32))
    np.save(split_dir / "all__group_indices.npy", np.array([0, 3, 6], np.int32))
    meta = dict(seq_len=81, vocab_size=11, pad_id=0, ignore_label_id=0, blank_identifier_id=0, num_puzzle_identifiers=1,
                total_groups=2, mean_puzzle_examples=1, total_puzzles=2, sets=["all"])
    (split_dir / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "identifiers.json").write_text(json.dumps(["<blank>"]))
    split = load_split(tmp_path, "train")
    assert isinstance(split.inputs, np.memmap)
    assert np.array_equal(split.inputs, inputs) and np.array_equal(split.labels, labels)
    assert split.num_groups == 2 and split.num_puzzles == 6 and split.metadata.total_puzzles == 2
    assert np.array_equal(split.example_puzzle_identifier(np.array([0, 5])), [0, 0])
    assert load_identifiers(tmp_path) == ["<blank>"]
    stream = SampleStream(split, seed=0)
    assert set(stream.take(60).tolist()) == set(range(6))


def _write_small(root: Path) -> None:
    arrays = {"all": {
        "inputs": np.ones((4, 81), np.uint8) * 2,
        "labels": np.ones((4, 81), np.uint8) * 3,
        "puzzle_identifiers": np.zeros(4, np.int32),
        "puzzle_indices": np.arange(5, dtype=np.int32),
        "group_indices": np.array([0, 2, 4], np.int32),
    }}
    write_split(root, "train", DatasetMetadata.from_arrays(arrays, vocab_size=11, seq_len=81, num_puzzle_identifiers=1), arrays)
    write_identifiers(root, ["<blank>"])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _set_json(root: Path, **changes) -> None:
    path = root / "train" / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


CORRUPTIONS = {
    "missing dir": (lambda r: None, "nonexistent", "does not exist"),
    "missing split": (lambda r: (r / "train" / "dataset.json").unlink() or (r / "train").rename(r / "moved"), "train", "does not exist"),
    "missing file": (lambda r: (r / "train" / "all__labels.npy").unlink(), "all__labels.npy", "Missing file"),
    "truncated npy": (lambda r: _truncate(r / "train" / "all__inputs.npy"), "all__inputs.npy", "truncated or corrupt"),
    "garbage npy": (lambda r: (r / "train" / "all__group_indices.npy").write_bytes(b"not numpy"), "all__group_indices.npy", "corrupt"),
    "float npy": (lambda r: np.save(r / "train" / "all__puzzle_indices.npy", np.arange(5.0)), "all__puzzle_indices.npy", "integer"),
    "bad json": (lambda r: (r / "train" / "dataset.json").write_text("{not json"), "dataset.json", "not valid JSON"),
    "missing key": (lambda r: _drop_key(r, "vocab_size"), "dataset.json", "missing key(s) vocab_size"),
    "bad key type": (lambda r: _set_json(r, seq_len="81"), "dataset.json", "seq_len"),
    "offsets not monotonic": (lambda r: np.save(r / "train" / "all__puzzle_indices.npy", np.array([0, 2, 1, 3, 4], np.int32)), "all__puzzle_indices.npy", "not monotonic"),
    "offsets wrong end": (lambda r: np.save(r / "train" / "all__group_indices.npy", np.array([0, 1, 3], np.int32)), "all__group_indices.npy", "last CSR offset is 3"),
    "offsets not from 0": (lambda r: np.save(r / "train" / "all__group_indices.npy", np.array([1, 2, 4], np.int32)), "all__group_indices.npy", "start at 0"),
    "empty group": (lambda r: np.save(r / "train" / "all__group_indices.npy", np.array([0, 0, 4], np.int32)), "all__group_indices.npy", "group 0 is empty"),
    "token id >= vocab": (lambda r: np.save(r / "train" / "all__labels.npy", np.full((4, 81), 11, np.uint8)), "all__labels.npy", "outside the vocabulary"),
    "labels shape": (lambda r: np.save(r / "train" / "all__labels.npy", np.full((3, 81), 2, np.uint8)), "all__labels.npy", "differs from inputs"),
    "seq_len": (lambda r: _set_json(r, seq_len=80), "all__inputs.npy", "seq_len=80"),
    "identifier range": (lambda r: np.save(r / "train" / "all__puzzle_identifiers.npy", np.array([0, 0, 1, 0], np.int32)), "all__puzzle_identifiers.npy", "num_puzzle_identifiers"),
    "total_groups": (lambda r: _set_json(r, total_groups=3), "dataset.json", "total_groups is 3"),
    "puzzle count": (lambda r: np.save(r / "train" / "all__puzzle_identifiers.npy", np.zeros(3, np.int32)), "all__puzzle_indices.npy", "3 puzzle identifiers"),
}


def _drop_key(root: Path, key: str) -> None:
    path = root / "train" / "dataset.json"
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_directories_raise_clear_errors(tmp_path: Path, case: str) -> None:
    corrupt, names, says = CORRUPTIONS[case]
    root = tmp_path / "ds"
    _write_small(root)
    load_split(root, "train")
    corrupt(root)
    target = tmp_path / "nonexistent" if case == "missing dir" else root
    with pytest.raises(DatasetError) as info:
        load_split(target, "train")
    message = str(info.value)
    assert names in message and says in message, message
    if case in ("missing dir", "missing split", "missing file"):
        assert "python -m trm.data build sudoku" in message and str(target) in message


def test_write_split_rejects_inconsistent_arrays(tmp_path: Path) -> None:
    arrays = two_set_arrays()
    meta = DatasetMetadata.from_arrays(arrays, vocab_size=300, seq_len=4, num_puzzle_identifiers=5)
    arrays["b"]["labels"] = arrays["b"]["labels"][:, :3]
    with pytest.raises(DatasetError, match="b__labels.npy"):
        write_split(tmp_path, "train", meta, arrays)
    assert not (tmp_path / "train" / "dataset.json").exists()
    with pytest.raises(DatasetError, match="metadata.sets"):
        write_split(tmp_path, "train", meta, {"a": two_set_arrays()["a"]})
    with pytest.raises(DatasetError, match="<blank>"):
        write_identifiers(tmp_path, ["x"])


# ---------------------------------------------------------------------------------------------
# Sample stream


def stream_offsets() -> tuple[np.ndarray, np.ndarray]:
    """7 groups of 1-3 puzzles, puzzles of 1-4 examples."""
    puzzle_sizes = [1, 2, 4, 1, 3, 1, 1, 2, 2, 1, 3, 1]
    group_sizes = [1, 2, 3, 1, 2, 2, 1]
    return np.concatenate([[0], np.cumsum(puzzle_sizes)]), np.concatenate([[0], np.cumsum(group_sizes)])


def group_of_example(example: np.ndarray, puzzle_indices: np.ndarray, group_indices: np.ndarray) -> np.ndarray:
    puzzle = np.searchsorted(puzzle_indices, example, side="right") - 1
    return np.searchsorted(group_indices, puzzle, side="right") - 1


def test_stream_is_a_pure_function_of_the_global_index() -> None:
    offsets = stream_offsets()
    stream = SampleStream(offsets, seed=11)
    stream.take(23)
    taken = stream.take(50)
    assert stream.position == 73
    fresh = SampleStream(offsets, seed=11)
    assert np.array_equal(fresh.indices(np.arange(23, 73)), taken)
    assert np.array_equal(fresh.indices(np.arange(72, 22, -1)), taken[::-1])
    assert np.array_equal(fresh.indices(np.array([[30, 40], [50, 60]])), taken[[[7, 17], [27, 37]]])
    assert taken.dtype == np.int64
    assert not np.array_equal(SampleStream(offsets, seed=12).indices(np.arange(23, 73)), taken)


def test_stream_epochs_cover_every_group_once_and_all_examples() -> None:
    puzzle_indices, group_indices = stream_offsets()
    stream = SampleStream((puzzle_indices, group_indices), seed=0)
    groups = group_of_example(stream.take(7 * 400), puzzle_indices, group_indices).reshape(400, 7)
    assert all(sorted(epoch) == list(range(7)) for epoch in groups.tolist())
    assert len({tuple(epoch) for epoch in groups.tolist()}) > 100
    assert set(stream.indices(np.arange(7 * 400)).tolist()) == set(range(puzzle_indices[-1]))
    assert stream.epoch == 400


def test_stream_state_round_trip_and_seed_check() -> None:
    offsets = stream_offsets()
    stream = SampleStream(offsets, seed=5)
    stream.take(41)
    state = stream.state_dict()
    assert state == {"position": 41, "seed": 5}
    resumed = SampleStream(offsets, seed=5)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.take(30), stream.take(30))
    with pytest.raises(ValueError, match="seed 5"):
        SampleStream(offsets, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        resumed.load_state_dict({"position": 3})


def test_sharding_partitions_positions_and_survives_a_world_size_change() -> None:
    offsets = stream_offsets()
    positions = np.arange(100, 160)
    parts = [shard(positions, rank, 3) for rank in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == positions.tolist()
    assert all((part % 3 == rank).all() for rank, part in enumerate(parts))
    with pytest.raises(ValueError):
        shard(positions, 3, 3)

    reference = SampleStream(offsets, seed=9).take(48)
    streams = [SampleStream(offsets, seed=9) for _ in range(2)]
    first = [s.take_shard(24, rank, 2) for rank, s in enumerate(streams)]  # 24 positions at world 2
    state = streams[0].state_dict()
    resumed = [SampleStream(offsets, seed=9) for _ in range(3)]
    for s in resumed:
        s.load_state_dict(state)
    second = [s.take_shard(24, rank, 3) for rank, s in enumerate(resumed)]  # then 24 at world 3
    rebuilt = np.empty(48, np.int64)
    for rank in range(2):
        rebuilt[rank:24:2] = first[rank]
    for rank in range(3):
        rebuilt[24 + rank : 48 : 3] = second[rank]
    assert np.array_equal(rebuilt, reference)


def test_stream_is_vectorised_and_validates_input() -> None:
    offsets = (np.arange(200_001), np.arange(0, 200_001, 2))
    stream = SampleStream(offsets, seed=1)
    indices = stream.take(100_000)
    assert indices.shape == (100_000,) and indices.min() >= 0 and indices.max() < 200_000
    assert np.array_equal(stream.indices(np.arange(99_990, 100_000)), indices[-10:])
    with pytest.raises(ValueError, match=">= 0"):
        stream.indices(np.array([-1]))
    with pytest.raises(ValueError, match="no empty group"):
        SampleStream((np.array([0, 1, 2]), np.array([0, 0, 2])), seed=0)
    with pytest.raises(ValueError, match="seed"):
        SampleStream(offsets, seed=-1)


def test_keyed_uniforms_depend_only_on_key_and_position() -> None:
    positions = np.array([5, 4000, 7, 123456])
    together = keyed_uniforms(1, 2, positions, 3)
    alone = np.concatenate([keyed_uniforms(1, 2, positions[i : i + 1], 3) for i in range(4)])
    assert np.array_equal(together, alone)
    assert ((together >= 0) & (together < 1)).all()
    assert not np.array_equal(keyed_uniforms(1, 3, positions, 3), together)


# ---------------------------------------------------------------------------------------------
# CSV import


def write_csv(path: Path, puzzles: np.ndarray, solutions: np.ndarray, ratings: list[int]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "question", "answer", "rating"])
        for i, (p, s, r) in enumerate(zip(puzzles, solutions, ratings)):
            question = "".join("." if d == 0 else str(d) for d in p) if i % 2 else "".join(str(d) for d in p)
            writer.writerow([f"src{i}", question, "".join(str(d) for d in s), r])


def test_import_sudoku_csv(tmp_path: Path, puzzles: tuple[np.ndarray, np.ndarray]) -> None:
    puzzle, solution = puzzles
    write_csv(tmp_path / "train.csv", puzzle[:8], solution[:8], ratings=[0, 5, 10, 15, 20, 25, 30, 35])
    write_csv(tmp_path / "test.csv", puzzle[8:], solution[8:], ratings=[1, 50])
    kwargs = dict(train_csv=tmp_path / "train.csv", test_csv=tmp_path / "test.csv", subsample=3, aug=2, min_rating=10, seed=4)
    import_sudoku_csv(tmp_path / "out", **kwargs)
    train, test = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "test")
    assert train.num_examples == 9 and train.num_groups == 3
    assert test.num_examples == 1 and np.array_equal(digits(test.inputs[0]), puzzle[9])
    originals = digits(np.asarray(train.inputs)[::3])
    kept = [int(np.flatnonzero((puzzle[:8] == row).all(axis=1))[0]) for row in originals]
    assert kept == sorted(kept) and min(kept) >= 2
    assert_consistent(train.inputs, train.labels)
    import_sudoku_csv(tmp_path / "again", **kwargs)
    assert dataset_files(tmp_path / "again") == dataset_files(tmp_path / "out")

    bad = solution[:2].copy()
    bad[1, [0, 1]] = bad[1, [1, 0]]
    write_csv(tmp_path / "bad.csv", puzzle[:2], bad, ratings=[0, 0])
    with pytest.raises(DatasetError, match=r"bad.csv:3: answer"):
        import_sudoku_csv(tmp_path / "bad", train_csv=tmp_path / "bad.csv", test_csv=tmp_path / "test.csv")
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="lacks column"):
        import_sudoku_csv(tmp_path / "bad", train_csv=tmp_path / "header.csv", test_csv=tmp_path / "test.csv")


def test_sudoku_csv_rows_are_checked_and_bad_ones_can_be_skipped(tmp_path: Path, puzzles, capsys) -> None:
    """A row with more fields than the header is an error (it was accepted), a trailing blank line
    is not (it failed), --subsample beyond the CSV is an error (it silently kept all), and
    --skip-bad-rows leaves bad rows out and reports them (there was no way to)."""
    from trm.data.__main__ import main as data_main

    puzzle, solution = puzzles
    write_csv(tmp_path / "train.csv", puzzle[:4], solution[:4], ratings=[0, 0, 0, 0])
    write_csv(tmp_path / "test.csv", puzzle[8:], solution[8:], ratings=[0, 0])
    good = (tmp_path / "train.csv").read_text()
    (tmp_path / "blank_end.csv").write_text(good + "\n\n")
    import_sudoku_csv(tmp_path / "blank_end", train_csv=tmp_path / "blank_end.csv", test_csv=tmp_path / "test.csv")
    assert load_split(tmp_path / "blank_end", "train").num_examples == 4

    lines = good.splitlines()
    lines[2] += ",extra"  # the second puzzle's row (line 3) gets a fifth field
    (tmp_path / "five.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"five.csv:3: expected 4 fields like the header, got 5"):
        import_sudoku_csv(tmp_path / "five", train_csv=tmp_path / "five.csv", test_csv=tmp_path / "test.csv")
    assert not (tmp_path / "five").exists()
    with pytest.raises(DatasetError, match=r"--subsample 1000 asks for more puzzles than .*train.csv has \(4 usable rows\)"):
        import_sudoku_csv(tmp_path / "many", train_csv=tmp_path / "train.csv", test_csv=tmp_path / "test.csv", subsample=1000)

    code = data_main(["import-sudoku-csv", "--train-csv", str(tmp_path / "five.csv"), "--test-csv", str(tmp_path / "test.csv"),
                      "--out", str(tmp_path / "skipped"), "--skip-bad-rows"])
    out = capsys.readouterr().out
    assert code == 0 and "left out 1 bad row(s) (--skip-bad-rows): five.csv:3: expected 4 fields" in out
    kept = digits(np.asarray(load_split(tmp_path / "skipped", "train").inputs))
    assert len(kept) == 3 and not (kept == puzzle[1]).all(axis=1).any()


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trm.data", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, says",
    [
        (["build", "sudoku", "--train-puzzles", "-1", "--aug", "0", "--test-puzzles", "1"], "--train-puzzles must be >= 0"),
        (["build", "sudoku", "--train-puzzles", "1", "--aug", "-2", "--test-puzzles", "1"], "--aug must be >= 0"),
        (["build", "sudoku", "--train-puzzles", "1", "--aug", "0", "--test-puzzles", "1", "--min-blanks", "50", "--max-blanks", "40"], "larger than --max-blanks"),
        (["build", "sudoku", "--train-puzzles", "1", "--aug", "0", "--test-puzzles", "1", "--max-blanks", "65"], "0..64"),
        (["build", "sudoku", "--train-puzzles", "1", "--aug", "0", "--test-puzzles", "1", "--test-min-blanks", "-1"], "--test-min-blanks must be in 0..64"),
        (["build", "sudoku", "--train-puzzles", "1", "--aug", "0", "--test-puzzles", "1", "--workers", "0"], "--workers must be >= 1"),
        (["build", "sudoku", "--train-puzzles", "one", "--aug", "0", "--test-puzzles", "1"], "invalid int value"),
        (["build", "chess", "--out", "x"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, args: list[str], says: str) -> None:
    if "--out" not in args:
        args = [*args[:2], "--out", str(tmp_path / "new"), *args[2:]]
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trm.data: error:") and says in lines[0], result.stderr
    assert not (tmp_path / "new").exists()


def test_cli_build_inspect_and_refuse_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = ["build", "sudoku", "--out", str(out), "--train-puzzles", "3", "--aug", "1", "--test-puzzles", "2", "--seed", "1", "--workers", "1"]
    built = run_cli(*args)
    assert built.returncode == 0, built.stderr
    assert load_split(out, "train").num_examples == 6
    inspected = run_cli("inspect", str(out))
    assert inspected.returncode == 0 and "blanks" in inspected.stdout and "examples 6, puzzles 6, groups 3" in inspected.stdout
    refused = run_cli(*args)
    assert refused.returncode == 2 and "not empty" in refused.stderr and "--overwrite" in refused.stderr
    assert run_cli(*args, "--overwrite").returncode == 0
    missing = run_cli("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
