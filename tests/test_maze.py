"""Maze generator, augmentation, CSV importer, dataset layout and CLI (trm.data.maze).

Every label is checked against a BFS written here, independent of the module's own.
"""

from __future__ import annotations

import csv
import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from trm.data import maze
from trm.data.__main__ import main as cli_main
from trm.data.format import DIHEDRAL_INVERSE, DatasetError, dihedral, load_identifiers, load_split, split_file
from trm.data.puzzle_dataset import PuzzleDataset

SIDE = maze.MAZE_SIZE


def bfs_distances(grid: np.ndarray, source: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (-1 unreachable) and number of shortest paths from ``source`` over non-wall cells."""
    passable = grid != maze.WALL
    dist = np.full(grid.shape, -1)
    ways = np.zeros(grid.shape, dtype=object)
    dist[source], ways[source] = 0, 1
    queue = deque([source])
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < grid.shape[0] and 0 <= nc < grid.shape[1] and passable[nr, nc]:
                if dist[nr, nc] < 0:
                    dist[nr, nc] = dist[r, c] + 1
                    queue.append((nr, nc))
                if dist[nr, nc] == dist[r, c] + 1:
                    ways[nr, nc] += ways[r, c]
    return dist, ways


def check_shortest_path(inputs: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Assert that ``labels`` marks a shortest S-G path of the maze ``inputs``; returns (length, number of shortest paths)."""
    side = int(np.sqrt(inputs.size))
    grid, label = inputs.reshape(side, side), labels.reshape(side, side)
    assert set(np.unique(grid)) <= {maze.WALL, maze.OPEN, maze.START, maze.GOAL}
    assert (grid == maze.START).sum() == 1 and (grid == maze.GOAL).sum() == 1
    start = tuple(np.argwhere(grid == maze.START)[0])
    goal = tuple(np.argwhere(grid == maze.GOAL)[0])
    on_path = label == maze.PATH
    assert np.array_equal(np.where(on_path, maze.OPEN, label), grid), "label differs from input other than path marks on open cells"
    dist, ways = bfs_distances(grid, start)
    assert dist[goal] > 0, "goal unreachable"
    assert on_path.sum() == dist[goal] - 1, "path has the wrong number of cells for a shortest path"
    route = on_path.copy()
    route[start] = route[goal] = True
    for r, c in np.argwhere(route):
        degree = sum(
            1 for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)) if 0 <= nr < side and 0 <= nc < side and route[nr, nc]
        )
        expected = 1 if (r, c) in (start, goal) else 2
        assert degree == expected, f"cell {(r, c)} has {degree} path neighbours, expected {expected}"
    return int(dist[goal]), int(ways[goal])


@pytest.mark.parametrize(
    "low, high, loops, unique",
    [(1, None, 0.0, True), (maze.HARD_MIN_PATH_LENGTH, None, 0.0, True), (200, None, 0.0, True), (40, 60, 0.15, True), (10, 80, 0.3, False)],
)
def test_every_label_is_a_shortest_path_in_the_requested_range(low: int, high: int | None, loops: float, unique: bool, test_seed: int) -> None:
    seed = test_seed
    inputs, labels = maze.generate_mazes(12, seed, low, high, loops=loops, unique=unique)
    assert inputs.shape == labels.shape == (12, maze.SEQ_LEN) and inputs.dtype == np.uint8
    for row_in, row_lab in zip(inputs, labels):
        length, ways = check_shortest_path(row_in, row_lab)
        assert low <= length <= (high or maze.MAX_PATH_LENGTH)
        if unique:
            assert ways == 1
    assert np.array_equal(maze.path_lengths(labels), [check_shortest_path(i, l)[0] for i, l in zip(inputs, labels)])
    assert len({row.tobytes() for row in inputs}) == len(inputs)
    if loops == 0.0:  # a perfect maze: open cells = 225 rooms + 224 passages, and a border on row 0 / column 0
        assert ((inputs != maze.WALL).sum(axis=1) == 449).all()
        grids = inputs.reshape(-1, SIDE, SIDE)
        assert (grids[:, 0, :] == maze.WALL).all() and (grids[:, :, 0] == maze.WALL).all()


def test_generation_is_deterministic_and_seeded() -> None:
    a = maze.generate_mazes(6, 5, 50)
    b = maze.generate_mazes(6, 5, 50)
    c = maze.generate_mazes(6, 6, 50)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    single = maze.generate_maze(5, 3, 50)
    assert np.array_equal(single[0], a[0][3]) and np.array_equal(single[1], a[1][3])
    excluded = maze.generate_mazes(2, 5, 50, exclude={a[0][0].tobytes()})
    assert np.array_equal(excluded[0][0], a[0][1])  # the duplicate is replaced by the next index


def test_difficulty_knob_is_validated_and_unreachable_ranges_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    for args, says in [((0, None), "min_path_length must be"), ((50, 40), "larger than"), ((10, 449), "max_path_length must be")]:
        with pytest.raises(ValueError, match=says):
            maze.generate_maze(0, 0, *args)
    with pytest.raises(ValueError, match="loops"):
        maze.generate_maze(0, 0, 10, loops=1.5)
    monkeypatch.setattr(maze, "MAX_MAZES_PER_SAMPLE", 3)
    with pytest.raises(maze.MazeGenerationError, match="lower min_path_length"):
        maze.generate_maze(0, 0, 440)


def test_dihedral_augmentation_gives_eight_invertible_valid_copies() -> None:
    inputs, labels = maze.generate_mazes(3, 11, 30)
    aug_in, aug_lab = maze.augment_all(inputs, labels)
    assert aug_in.shape == (24, maze.SEQ_LEN) and aug_in.dtype == np.uint8
    for i in range(3):
        copies = aug_in[8 * i : 8 * i + 8]
        assert len({c.tobytes() for c in copies}) == 8
        for t in range(8):
            restored_in = dihedral(aug_in[8 * i + t].reshape(SIDE, SIDE), DIHEDRAL_INVERSE[t])
            restored_lab = dihedral(aug_lab[8 * i + t].reshape(SIDE, SIDE), DIHEDRAL_INVERSE[t])
            assert np.array_equal(restored_in.reshape(-1), inputs[i]) and np.array_equal(restored_lab.reshape(-1), labels[i])
            check_shortest_path(aug_in[8 * i + t], aug_lab[8 * i + t])
    # the 8 transforms form a group: composing with the inverse is the identity on a non-square array
    odd = np.arange(12).reshape(3, 4)
    for t in range(8):
        assert np.array_equal(dihedral(dihedral(odd, t), DIHEDRAL_INVERSE[t]), odd)
    assert len({dihedral(odd, t).tobytes() + bytes(dihedral(odd, t).shape) for t in range(8)}) == 8


def test_augment_at_is_a_pure_function_of_position() -> None:
    inputs, labels = maze.generate_mazes(1, 2, 30)
    rows_in, rows_lab = np.repeat(inputs, 64, axis=0), np.repeat(labels, 64, axis=0)
    positions = np.arange(1000, 1064)
    out_in, out_lab = maze.augment_at(rows_in, rows_lab, seed=3, global_positions=positions)
    again_in, _ = maze.augment_at(rows_in[::-1], rows_lab[::-1], seed=3, global_positions=positions[::-1])
    assert np.array_equal(out_in, again_in[::-1])
    copies_in, copies_lab = maze.augment_all(inputs, labels)
    used = set()
    for row_in, row_lab in zip(out_in, out_lab):
        t = next(t for t in range(8) if np.array_equal(copies_in[t], row_in))
        assert np.array_equal(copies_lab[t], row_lab)  # input and label share the transform
        used.add(t)
    assert used == set(range(8))
    other, _ = maze.augment_at(rows_in, rows_lab, seed=4, global_positions=positions)
    assert not np.array_equal(other, out_in)
    with pytest.raises(ValueError, match="positions"):
        maze.augment_at(rows_in, rows_lab, seed=3, global_positions=positions[:3])


def test_csv_round_trip_import_and_errors(tmp_path: Path) -> None:
    train = maze.generate_mazes(10, 21, 20)
    test = maze.generate_mazes(4, 22, 20)
    maze.write_maze_csv(tmp_path / "train.csv", *train)
    maze.write_maze_csv(tmp_path / "test.csv", *test)
    header = (tmp_path / "train.csv").read_text().splitlines()[0]
    assert header == "source,question,answer,rating"
    inputs, labels, ratings = maze.read_maze_csv(tmp_path / "train.csv")
    assert np.array_equal(inputs, train[0]) and np.array_equal(labels, train[1])
    assert np.array_equal(ratings, maze.path_lengths(train[1]))
    cut = float(np.median(ratings))
    kept = maze.read_maze_csv(tmp_path / "train.csv", min_rating=cut)
    assert np.array_equal(kept[0], train[0][ratings >= cut])

    out = tmp_path / "ds"
    maze.import_maze_csv(out, tmp_path / "train.csv", tmp_path / "test.csv", subsample=6, aug=True, seed=1)
    split = load_split(out, "train")
    assert (split.num_examples, split.num_groups) == (48, 6)
    originals = np.asarray(split.inputs[::8])
    chosen = [next(i for i in range(10) if np.array_equal(train[0][i], row)) for row in originals]
    assert chosen == sorted(chosen) and len(set(chosen)) == 6  # a seeded subsample, file order kept
    test_split = load_split(out, "test")
    assert np.array_equal(np.asarray(test_split.inputs), test[0]) and np.array_equal(np.asarray(test_split.labels), test[1])

    text = (tmp_path / "train.csv").read_text().splitlines()
    question = text[1].split(",")[1]
    answer = text[1].split(",")[2]
    broken = {
        "bad char": (question.replace(" ", "x", 1), answer, "outside"),
        "two starts": (question.replace(" ", "S", 1), answer, "exactly one start"),
        "answer moves a wall": (question, answer.replace("#", " ", 1), "differs from its question"),
        "short": (question[:-1], answer[:-1], "not a square grid"),
        "path in question": (question.replace(" ", "o", 1), answer, "path cell"),
    }
    for name, (q, a, says) in broken.items():
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", "question", "answer", "rating"])
            writer.writerow(["x", q, a, "1"])
        with pytest.raises(DatasetError, match=says):
            maze.read_maze_csv(path)
    (tmp_path / "noheader.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="lacks column"):
        maze.read_maze_csv(tmp_path / "noheader.csv")


def test_built_dataset_layout_loads_and_is_byte_identical(tmp_path: Path) -> None:
    kwargs = dict(train_mazes=5, test_mazes=3, seed=7, min_path_length=60, aug=True)
    maze.build_maze(tmp_path / "a", **kwargs)
    maze.build_maze(tmp_path / "b", **kwargs)
    for file in sorted((tmp_path / "a").rglob("*")):
        if file.is_file():
            assert file.read_bytes() == (tmp_path / "b" / file.relative_to(tmp_path / "a")).read_bytes(), file
    root = tmp_path / "a"
    meta = json.loads((root / "train" / "dataset.json").read_text())
    assert meta["vocab_size"] == 6 and meta["seq_len"] == 900 and meta["pad_id"] == 0 and meta["ignore_label_id"] == 0
    assert meta["num_puzzle_identifiers"] == 1 and meta["total_groups"] == 5 and meta["sets"] == ["all"]
    assert load_identifiers(root) == ["<blank>"]
    assert np.load(split_file(root, "train", "all", "inputs")).dtype == np.uint8
    for field in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
        assert np.load(split_file(root, "train", "all", field)).dtype == np.int32
    assert np.array_equal(np.load(split_file(root, "train", "all", "group_indices")), np.arange(0, 41, 8))
    train, test = load_split(root, "train"), load_split(root, "test")
    assert train.num_examples == 40 and test.num_examples == 3 and test.num_groups == 3
    assert not {r.tobytes() for r in np.asarray(test.inputs)} & {r.tobytes() for r in np.asarray(train.inputs)}
    for row_in, row_lab in zip(np.asarray(train.inputs), np.asarray(train.labels)):
        assert check_shortest_path(row_in, row_lab)[0] >= 60
    dataset = PuzzleDataset(root, seed=0)
    batch = dataset.train_examples(np.arange(6))
    assert batch["inputs"].shape == (6, 900) and batch["labels"].shape == (6, 900)
    assert dataset.model_dims == {"seq_len": 900, "vocab_size": 6, "num_puzzle_identifiers": 1}
    assert dataset.eval_examples(np.arange(3))["inputs"].shape == (3, 900)


def test_hand_written_reference_maze_directory_loads(tmp_path: Path) -> None:
    """What the reference's maze builder writes: chars '# SGo' -> 1..5, total_puzzles = groups, x8 copies."""
    inputs, labels = maze.generate_mazes(2, 31, 15)
    aug_in, aug_lab = maze.augment_all(inputs, labels)
    split_dir = tmp_path / "train"
    split_dir.mkdir()
    np.save(split_dir / "all__inputs.npy", aug_in)
    np.save(split_dir / "all__labels.npy", aug_lab)
    np.save(split_dir / "all__puzzle_identifiers.npy", np.zeros(16, np.int32))
    np.save(split_dir / "all__puzzle_indices.npy", np.arange(17, dtype=np.int32))
    np.save(split_dir / "all__group_indices.npy", np.array([0, 8, 16], np.int32))
    meta = dict(seq_len=900, vocab_size=6, pad_id=0, ignore_label_id=0, blank_identifier_id=0, num_puzzle_identifiers=1,
                total_groups=2, mean_puzzle_examples=1, total_puzzles=2, sets=["all"])
    (split_dir / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "identifiers.json").write_text(json.dumps(["<blank>"]))
    split = load_split(tmp_path, "train")
    assert (split.num_examples, split.num_puzzles, split.num_groups) == (16, 16, 2)
    assert maze.is_maze_split(split)
    assert "path length" in maze.summarize(tmp_path)


def test_cli_builds_prints_summary_and_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m"
    args = ["build", "maze", "--out", str(out), "--train-mazes", "3", "--test-mazes", "2", "--min-path-length", "40", "--aug", "--seed", "2"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "examples 24, puzzles 24, groups 3" in printed and "path length" in printed and "vocab_size 6" in printed
    assert cli_main(args) == 2 and "--overwrite" in capsys.readouterr().err
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    maze.write_maze_csv(csv_dir / "train.csv", *maze.generate_mazes(3, 1, 20))
    maze.write_maze_csv(csv_dir / "test.csv", *maze.generate_mazes(2, 2, 20))
    imported = tmp_path / "imported"
    assert cli_main(["import-maze-csv", "--out", str(imported), "--train-csv", str(csv_dir / "train.csv"), "--test-csv", str(csv_dir / "test.csv")]) == 0
    assert "examples 3, puzzles 3, groups 3" in capsys.readouterr().out
    bad = [
        (["--train-mazes", "-1", "--test-mazes", "1"], "--train-mazes must be >= 0"),
        (["--train-mazes", "1", "--test-mazes", "1", "--min-path-length", "0"], "--min-path-length must be in 1..448"),
        (["--train-mazes", "1", "--test-mazes", "1", "--max-path-length", "50"], "larger than --max-path-length"),
        (["--train-mazes", "1", "--test-mazes", "1", "--test-max-path-length", "500"], "--test-max-path-length must be in"),
        (["--train-mazes", "1", "--test-mazes", "1", "--loops", "2"], "--loops"),
        (["--train-mazes", "x", "--test-mazes", "1"], "invalid int value"),
    ]
    for extra, says in bad:
        assert cli_main(["build", "maze", "--out", str(tmp_path / "new"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("trm.data: error:") and says in err and "Traceback" not in err, err
        assert not (tmp_path / "new").exists()
    assert cli_main(["import-maze-csv", "--out", str(tmp_path / "new"), "--train-csv", "nope.csv", "--test-csv", "nope.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err
