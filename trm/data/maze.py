"""Maze: a seeded generator of 30x30 mazes labelled with their shortest path, the dihedral x8
augmentation, an importer for the reference's maze CSVs, and the dataset builder.

Tokens (the reference's, characters ``# SGo`` as ids 1-5, pad 0): wall 1, open cell 2, start 3,
goal 4, path 5; vocab 6, seq_len 900 (row-major 30x30). The input shows walls, open cells, S and
G; the label is the same grid with every cell strictly between S and G on the shortest path set
to 5 (S and G keep their tokens). "Path length" below is the number of moves from S to G (the BFS
distance), i.e. the number of path tokens + 1.

Generation (deterministic per (seed, stream, maze index), independent of every other maze):

1. a perfect maze by randomised depth-first search over a 15x15 lattice of rooms at odd
   coordinates (1, 3, ..., 29); row 0 and column 0 stay walls, the grid edge bounds the rest.
   DFS mazes have long winding corridors, so long shortest paths are common;
2. optionally ``loops``: each remaining wall between two adjacent rooms is opened with that
   probability (the maze then has cycles);
3. a start S (a random open cell; after 3 failed tries the cell farthest from a random one, then
   the far end of a double BFS sweep -- an end of the maze's longest path) and a goal G drawn among the open cells whose BFS distance from S lies in
   ``[min_path_length, max_path_length]`` and, with ``unique=True`` (default), whose shortest
   path is unique (always true without loops). A maze with no such pair is replaced by a new one.

Measured (300 perfect mazes): the longest shortest path is ~280 moves at the median, ~225 at the
5th percentile and ~200 at the minimum, so any ``min_path_length`` up to ~200 costs one maze
(~2 ms) per sample; "hard" as in Maze-Hard is >= 110 (the builder's default).

Commands::

    python -m trm.data build maze --out data/maze-30x30-hard-1k --train-mazes 1000 --test-mazes 1000 --min-path-length 110 --aug
    python -m trm.data import-maze-csv --train-csv train.csv --test-csv test.csv --out data/maze-30x30-hard-1k --aug
    python -m trm.data inspect data/maze

Tests: ``pytest tests/test_maze.py`` (labels checked against an independent BFS).
"""

from __future__ import annotations

import csv
import math
import random
from collections import deque
from pathlib import Path

import numpy as np

from trm.data.format import DatasetError, DatasetMetadata, SplitData, dihedral, summarize_dataset, write_identifiers, write_split
from trm.data.stream import keyed_uniforms

CHARSET = "# SGo"
"""Character of token id ``i + 1`` (the reference's CSV alphabet); token 0 is padding."""
PAD_TOKEN, WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4, 5
VOCAB_SIZE = len(CHARSET) + 1
MAZE_SIZE = 30
SEQ_LEN = MAZE_SIZE * MAZE_SIZE
MAX_PATH_LENGTH = 448
"""A perfect maze of this lattice has 449 open cells, so no shortest path is longer than 448 moves."""
MAX_MAZES_PER_SAMPLE = 200
"""Mazes tried for one sample before generation gives up (see the module docstring)."""
HARD_MIN_PATH_LENGTH = 110
"""Maze-Hard's difficulty: shortest paths of at least this many moves."""

TRAIN_STREAM, TEST_STREAM, SUBSAMPLE_STREAM = 10, 11, 12
AUGMENT_SALT = 13
"""Random streams derived from the build seed (distinct from Sudoku's)."""

_ROOMS = MAZE_SIZE // 2
_NEIGHBOURS = tuple(
    tuple(
        (r + dr) * MAZE_SIZE + c + dc
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
        if 0 <= r + dr < MAZE_SIZE and 0 <= c + dc < MAZE_SIZE
    )
    for r in range(MAZE_SIZE)
    for c in range(MAZE_SIZE)
)


class MazeGenerationError(RuntimeError):
    """No maze with a shortest path in the requested length range was found."""


def _room_cell(i: int, j: int) -> int:
    return (2 * i + 1) * MAZE_SIZE + 2 * j + 1


def _carve(rng: random.Random, loops: float) -> bytearray:
    """Open cells (1) of a random maze: DFS spanning tree over the room lattice, then ``loops``."""
    is_open = bytearray(SEQ_LEN)
    visited = bytearray(_ROOMS * _ROOMS)
    start = rng.randrange(_ROOMS * _ROOMS)
    visited[start] = 1
    is_open[_room_cell(*divmod(start, _ROOMS))] = 1
    stack = [start]
    while stack:
        room = stack[-1]
        i, j = divmod(room, _ROOMS)
        options = [
            (ni, nj)
            for ni, nj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
            if 0 <= ni < _ROOMS and 0 <= nj < _ROOMS and not visited[ni * _ROOMS + nj]
        ]
        if not options:
            stack.pop()
            continue
        ni, nj = options[rng.randrange(len(options))]
        visited[ni * _ROOMS + nj] = 1
        is_open[(i + ni + 1) * MAZE_SIZE + j + nj + 1] = 1  # the wall between the two rooms
        is_open[_room_cell(ni, nj)] = 1
        stack.append(ni * _ROOMS + nj)
    if loops > 0:
        for r in range(1, MAZE_SIZE):
            for c in range(1, MAZE_SIZE):
                if (r + c) % 2 == 1 and not is_open[r * MAZE_SIZE + c] and rng.random() < loops:
                    # (r, c) with one odd and one even coordinate lies between two rooms
                    is_open[r * MAZE_SIZE + c] = 1
    return is_open


def _bfs(is_open: bytearray | np.ndarray, source: int) -> tuple[list[int], list[int]]:
    """(distance, number of shortest paths capped at 2) from ``source`` to every cell; -1 = unreachable."""
    dist = [-1] * SEQ_LEN
    count = [0] * SEQ_LEN
    dist[source], count[source] = 0, 1
    queue = deque([source])
    while queue:
        cell = queue.popleft()
        nd = dist[cell] + 1
        for nxt in _NEIGHBOURS[cell]:
            if not is_open[nxt]:
                continue
            if dist[nxt] < 0:
                dist[nxt] = nd
                count[nxt] = count[cell]
                queue.append(nxt)
            elif dist[nxt] == nd:
                count[nxt] = min(2, count[nxt] + count[cell])
    return dist, count


def _maze_rng(seed: int, stream: int, index: int) -> random.Random:
    return random.Random(int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]))


def check_path_range(min_path_length: int, max_path_length: int | None, what: str = "") -> int:
    """Validate the difficulty knob; returns the effective maximum (``MAX_PATH_LENGTH`` for None)."""
    high = MAX_PATH_LENGTH if max_path_length is None else max_path_length
    for name, value in ((f"{what}min_path_length", min_path_length), (f"{what}max_path_length", high)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_PATH_LENGTH:
            raise ValueError(f"{name} must be an integer in 1..{MAX_PATH_LENGTH} (moves from S to G), got {value!r}")
    if min_path_length > high:
        raise ValueError(f"{what}min_path_length ({min_path_length}) is larger than {what}max_path_length ({high})")
    return int(high)


def _check_loops(loops: float) -> None:
    if not (isinstance(loops, (int, float)) and 0.0 <= loops <= 1.0):
        raise ValueError(f"loops must be a probability in [0, 1], got {loops!r}")


def generate_maze(
    seed: int,
    index: int,
    min_path_length: int = HARD_MIN_PATH_LENGTH,
    max_path_length: int | None = None,
    *,
    stream: int = TRAIN_STREAM,
    loops: float = 0.0,
    unique: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Maze ``index`` of ``stream``: (input tokens [900], label tokens [900]) uint8.

    The label marks a shortest S-G path of ``min_path_length..max_path_length`` moves (the only
    one when ``unique``). A pure function of its arguments.
    """
    high = check_path_range(min_path_length, max_path_length)
    _check_loops(loops)
    rng = _maze_rng(seed, stream, index)
    for _ in range(MAX_MAZES_PER_SAMPLE):
        is_open = _carve(rng, loops)
        open_cells = [i for i in range(SEQ_LEN) if is_open[i]]
        for attempt in range(6):
            if attempt < 3:
                source = open_cells[rng.randrange(len(open_cells))]
            else:  # the farthest cell from a random one; from attempt 4 on, the far end of a double sweep
                dist, _ = _bfs(is_open, open_cells[rng.randrange(len(open_cells))])
                far = max(open_cells, key=lambda c: dist[c])
                if attempt > 3:
                    dist, _ = _bfs(is_open, far)
                    far = max(open_cells, key=lambda c: dist[c])
                source = far
            dist, count = _bfs(is_open, source)
            goals = [c for c in open_cells if min_path_length <= dist[c] <= high and (count[c] == 1 or not unique)]
            if goals:
                goal = goals[rng.randrange(len(goals))]
                return _render(is_open, source, goal, dist)
    raise MazeGenerationError(
        f"no maze with a shortest path of {min_path_length}..{high} moves after {MAX_MAZES_PER_SAMPLE} mazes "
        f"(loops={loops}, unique={unique}); lower min_path_length (perfect 30x30 mazes rarely have shortest paths above ~300 moves) "
        "or reduce loops"
    )


def _render(is_open: bytearray, source: int, goal: int, dist: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Input and label tokens; the path is traced back from the goal along decreasing distance."""
    inputs = np.where(np.frombuffer(bytes(is_open), dtype=np.uint8) == 1, OPEN, WALL).astype(np.uint8)
    inputs[source], inputs[goal] = START, GOAL
    labels = inputs.copy()
    cell = goal
    while dist[cell] > 1:
        cell = next(n for n in _NEIGHBOURS[cell] if is_open[n] and dist[n] == dist[cell] - 1)
        labels[cell] = PATH
    return inputs, labels


def generate_mazes(
    count: int,
    seed: int,
    min_path_length: int = HARD_MIN_PATH_LENGTH,
    max_path_length: int | None = None,
    *,
    stream: int = TRAIN_STREAM,
    loops: float = 0.0,
    unique: bool = True,
    exclude: set[bytes] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct mazes of ``stream`` (inputs, labels) uint8 [count, 900].

    Mazes whose input repeats an earlier one or one in ``exclude`` (input bytes) are skipped and
    replaced by the next index of the stream, so the result is deterministic.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    check_path_range(min_path_length, max_path_length)
    _check_loops(loops)
    seen = set(exclude or ())
    inputs = np.zeros((count, SEQ_LEN), np.uint8)
    labels = np.zeros((count, SEQ_LEN), np.uint8)
    from tqdm import tqdm

    kept = index = 0
    # a progress bar on a terminal only (disable=None): hard mazes take a while to draw
    with tqdm(total=count, unit="maze", desc=f"{'train' if stream == TRAIN_STREAM else 'test'} mazes", disable=None,
              leave=False, dynamic_ncols=True) as bar:
        while kept < count:
            maze, solution = generate_maze(seed, index, min_path_length, max_path_length, stream=stream, loops=loops,
                                           unique=unique)
            index += 1
            key = maze.tobytes()
            if key in seen:
                continue
            seen.add(key)
            inputs[kept], labels[kept] = maze, solution
            kept += 1
            bar.update(1)
    return inputs, labels


def path_lengths(labels: np.ndarray) -> np.ndarray:
    """Moves from S to G of each label row (path tokens + 1), int64 [B]."""
    labels = np.asarray(labels)
    return (labels.reshape(len(labels), -1) == PATH).sum(axis=1).astype(np.int64) + 1


# ----------------------------------------------------------------------------------------------
# Augmentation


def _as_grids(inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    side = math.isqrt(inputs.shape[-1]) if inputs.ndim else 0
    if inputs.shape != labels.shape or inputs.ndim not in (1, 2) or side * side != inputs.shape[-1] or side == 0:
        raise ValueError(f"maze augmentation needs inputs and labels of equal shape [L] or [B, L] with L a square, got {inputs.shape} and {labels.shape}")
    return inputs.reshape(-1, side, side), labels.reshape(-1, side, side), side


def dihedral_tokens(tokens: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Row ``i`` of square token rows [B, L] (L = side^2) under ``dihedral(., transforms[i])``."""
    tokens = np.asarray(tokens)
    side = math.isqrt(tokens.shape[-1])
    grids = tokens.reshape(-1, side, side)
    transforms = np.broadcast_to(np.asarray(transforms, dtype=np.int64), (len(grids),))
    out = np.empty_like(grids)
    for t in np.unique(transforms):
        rows = transforms == t
        out[rows] = dihedral(grids[rows], int(t))
    return out.reshape(tokens.shape)


def augment_all(inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 dihedral copies of each maze: [B, L] -> [8 B, L], rows ``8 i .. 8 i + 7`` are maze i
    under transforms 0..7 (transform 0 is the original)."""
    grids_in, grids_lab, side = _as_grids(inputs, labels)
    transforms = np.tile(np.arange(8), len(grids_in))
    rep_in = np.repeat(grids_in.reshape(len(grids_in), -1), 8, axis=0)
    rep_lab = np.repeat(grids_lab.reshape(len(grids_lab), -1), 8, axis=0)
    return dihedral_tokens(rep_in, transforms), dihedral_tokens(rep_lab, transforms)


def augment_at(inputs: np.ndarray, labels: np.ndarray, seed: int, global_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On-the-fly augmentation: row ``i`` gets the dihedral transform ``floor(8 u)`` with ``u`` a
    pure function of (seed, global_positions[i]) -- the same whatever batch, rank or world size
    it is drawn in. Same signature as ``trm.data.sudoku.augment_at``; shapes and dtypes kept."""
    grids_in, grids_lab, side = _as_grids(inputs, labels)
    positions = np.asarray(global_positions).reshape(-1)
    if len(positions) != len(grids_in):
        raise ValueError(f"augment_at: {len(positions)} positions for {len(grids_in)} rows")
    transforms = np.minimum((keyed_uniforms(seed, AUGMENT_SALT, positions, 1)[:, 0] * 8).astype(np.int64), 7)
    flat_in, flat_lab = grids_in.reshape(len(grids_in), -1), grids_lab.reshape(len(grids_lab), -1)
    return (dihedral_tokens(flat_in, transforms).reshape(np.shape(inputs)),
            dihedral_tokens(flat_lab, transforms).reshape(np.shape(labels)))


# ----------------------------------------------------------------------------------------------
# CSV (the reference's maze datasets: header source,question,answer,rating; grids as strings)

_CHAR_TO_TOKEN = np.full(256, 255, np.uint8)
_CHAR_TO_TOKEN[np.frombuffer(CHARSET.encode(), np.uint8)] = np.arange(1, VOCAB_SIZE, dtype=np.uint8)
_TOKEN_TO_CHAR = np.frombuffer((" " + CHARSET).encode(), np.uint8)


def tokens_to_text(tokens: np.ndarray) -> str:
    """One maze row of tokens as the CSV's string (``# SGo``; padding is not allowed)."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.min() < 1 or tokens.max() >= VOCAB_SIZE:
        raise ValueError(f"maze tokens must be in 1..{VOCAB_SIZE - 1} to be written as text")
    return _TOKEN_TO_CHAR[tokens].tobytes().decode("ascii")


def write_maze_csv(path: str | Path, inputs: np.ndarray, labels: np.ndarray, ratings: np.ndarray | None = None, source: str = "trm") -> None:
    """Write mazes in the reference's CSV layout; ``rating`` defaults to the path length."""
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    ratings = path_lengths(labels) if ratings is None else np.asarray(ratings)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "question", "answer", "rating"])
        for maze, solution, rating in zip(inputs, labels, ratings):
            writer.writerow([source, tokens_to_text(maze), tokens_to_text(solution), rating.item()])


def read_maze_csv(path: str | Path, min_rating: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, ratings) from a maze CSV: tokens uint8 [N, L], ratings float64 [N].

    Columns by header name ``question``, ``answer`` (strings of ``# SGo`` whose length is the
    same square for every row, 900 for 30x30) and ``rating`` (needed only with ``min_rating``;
    rows rated below it are dropped; a missing column gives NaN ratings). Each question holds
    exactly one S and one G and no 'o'; each answer equals its question except open cells that
    may become 'o'.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CSV file {path} does not exist")
    questions, answers, ratings, lines = [], [], [], []
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: empty file (expected a header 'source,question,answer,rating')")
            columns = {name.strip(): i for i, name in enumerate(header)}
            needed = ["question", "answer"] + (["rating"] if min_rating is not None else [])
            missing = [n for n in needed if n not in columns]
            if missing:
                raise DatasetError(f"{path}: header {header} lacks column(s) {', '.join(missing)} (expected 'source,question,answer,rating')")
            q_col, a_col, r_col = columns["question"], columns["answer"], columns.get("rating")
            length = None
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) <= max(q_col, a_col, -1 if r_col is None else r_col):
                    raise DatasetError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
                rating = math.nan
                if r_col is not None and row[r_col].strip():
                    try:
                        rating = float(row[r_col])
                    except ValueError:
                        raise DatasetError(f"{path}:{line}: rating {row[r_col]!r} is not a number") from None
                if min_rating is not None and not rating >= min_rating:
                    continue
                question, answer = row[q_col], row[a_col]
                if length is None:
                    length = len(question)
                    if math.isqrt(length) ** 2 != length or length == 0:
                        raise DatasetError(f"{path}:{line}: question has {length} characters, not a square grid (30x30 = 900)")
                if len(question) != length or len(answer) != length:
                    raise DatasetError(f"{path}:{line}: question and answer must have {length} characters like the first row, got {len(question)} and {len(answer)}")
                questions.append(question)
                answers.append(answer)
                ratings.append(rating)
                lines.append(line)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a text CSV file ({err})") from None
    if not questions:
        return np.zeros((0, SEQ_LEN), np.uint8), np.zeros((0, SEQ_LEN), np.uint8), np.zeros(0)
    try:
        inputs = _CHAR_TO_TOKEN[np.frombuffer("".join(questions).encode("ascii"), np.uint8)].reshape(len(questions), -1)
        labels = _CHAR_TO_TOKEN[np.frombuffer("".join(answers).encode("ascii"), np.uint8)].reshape(len(answers), -1)
    except UnicodeEncodeError:
        raise DatasetError(f"{path}: questions and answers may only hold the characters {CHARSET!r}") from None
    same_or_path = (inputs == labels) | ((inputs == OPEN) & (labels == PATH))
    problems = [
        ((inputs == 255).any(axis=1), f"question holds a character outside {CHARSET!r}"),
        ((labels == 255).any(axis=1), f"answer holds a character outside {CHARSET!r}"),
        ((inputs == PATH).any(axis=1), "question holds a path cell 'o' (only answers may)"),
        ((inputs == START).sum(axis=1) != 1, "question must hold exactly one start 'S'"),
        ((inputs == GOAL).sum(axis=1) != 1, "question must hold exactly one goal 'G'"),
        (~same_or_path.all(axis=1), "answer differs from its question other than open cells marked 'o'"),
    ]
    for bad, what in problems:
        if bad.any():
            raise DatasetError(f"{path}:{lines[int(np.argmax(bad))]}: {what}")
    return inputs, labels, np.asarray(ratings, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Dataset builders


def _split_arrays(inputs: np.ndarray, labels: np.ndarray, aug: bool) -> dict[str, np.ndarray]:
    """Reference layout: every example its own puzzle (identifier 0); a maze and its dihedral
    copies (with ``aug``) form one group."""
    copies = 8 if aug else 1
    if aug:
        inputs, labels = augment_all(inputs, labels)
    num = len(inputs)
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.zeros(num, np.int32),
        "puzzle_indices": np.arange(num + 1, dtype=np.int32),
        "group_indices": np.arange(0, num + 1, copies, dtype=np.int32),
    }


def write_maze_dataset(out_dir: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], aug: bool) -> None:
    """Write (inputs, labels) token arrays as a maze dataset; only train gets the x8 augmentation.

    ``train/dataset.json`` is written last and marks a complete dataset.
    """
    seq_len = np.asarray(train[0]).shape[-1]
    if np.asarray(test[0]).shape[-1] != seq_len:
        raise DatasetError(f"train mazes have {seq_len} cells but test mazes have {np.asarray(test[0]).shape[-1]}")
    out_dir = Path(out_dir)
    write_identifiers(out_dir, ["<blank>"])
    for split, (inputs, labels), copies in (("test", test, False), ("train", train, aug)):
        arrays = {"all": _split_arrays(np.asarray(inputs, np.uint8), np.asarray(labels, np.uint8), copies)}
        metadata = DatasetMetadata.from_arrays(arrays, vocab_size=VOCAB_SIZE, seq_len=seq_len, num_puzzle_identifiers=1)
        write_split(out_dir, split, metadata, arrays)


def build_maze(
    out_dir: str | Path,
    train_mazes: int,
    test_mazes: int,
    seed: int = 0,
    min_path_length: int = HARD_MIN_PATH_LENGTH,
    max_path_length: int | None = None,
    test_min_path_length: int | None = None,
    test_max_path_length: int | None = None,
    aug: bool = False,
    loops: float = 0.0,
    unique: bool = True,
) -> None:
    """Generate a maze dataset in the reference layout (byte-identical for equal arguments).

    Train: ``train_mazes`` distinct mazes (with ``aug`` each followed by its 7 other dihedral
    copies, one group per maze). Test: ``test_mazes`` other mazes from a separate seed stream
    (inputs equal to a training maze are skipped), never augmented; path range defaults to the
    training one.
    """
    for name, value in (("train_mazes", train_mazes), ("test_mazes", test_mazes), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    test_min = min_path_length if test_min_path_length is None else test_min_path_length
    test_max = max_path_length if test_max_path_length is None else test_max_path_length
    check_path_range(min_path_length, max_path_length)
    check_path_range(test_min, test_max, what="test_")
    _check_loops(loops)
    train = generate_mazes(train_mazes, seed, min_path_length, max_path_length, stream=TRAIN_STREAM, loops=loops, unique=unique)
    test = generate_mazes(test_mazes, seed, test_min, test_max, stream=TEST_STREAM, loops=loops, unique=unique,
                          exclude={row.tobytes() for row in train[0]})
    write_maze_dataset(out_dir, train, test, aug)


def import_maze_csv(
    out_dir: str | Path,
    train_csv: str | Path,
    test_csv: str | Path,
    subsample: int | None = None,
    test_subsample: int | None = None,
    aug: bool = False,
    min_rating: float | None = None,
    seed: int = 0,
) -> None:
    """Convert the reference's maze CSVs to its dataset layout (as its builder does, but seeded).

    ``subsample`` (``test_subsample``) keeps that many rows of the train (test) CSV, chosen
    without replacement by ``seed`` and kept in file order; ``aug`` adds the dihedral x8 copies to
    the train split; ``min_rating`` drops rows rated below it first.
    """
    for name, value in (("subsample", subsample), ("test_subsample", test_subsample), ("seed", seed)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SUBSAMPLE_STREAM]))
    splits = []
    for csv_path, size in ((train_csv, subsample), (test_csv, test_subsample)):
        inputs, labels, _ = read_maze_csv(csv_path, min_rating)
        if size is not None and size < len(inputs):
            keep = np.sort(rng.choice(len(inputs), size=size, replace=False))
            inputs, labels = inputs[keep], labels[keep]
        splits.append((inputs, labels))
    write_maze_dataset(out_dir, splits[0], splits[1], aug)


# ----------------------------------------------------------------------------------------------
# Summary


def is_maze_split(split: SplitData) -> bool:
    """The split has maze geometry (vocab 6, a square number of cells)."""
    seq_len = split.metadata.seq_len
    return split.metadata.vocab_size == VOCAB_SIZE and math.isqrt(seq_len) ** 2 == seq_len


def path_length_histogram(split: SplitData, bin_width: int = 20, width: int = 40) -> str:
    """Path length per example (min / mean / max) and one line per ``bin_width`` bin, with a bar."""
    if split.num_examples == 0:
        return "  path length: (no examples)"
    lengths = np.concatenate([path_lengths(split.labels[a : a + 65536]) for a in range(0, split.num_examples, 65536)])
    lines = [f"  path length (moves S->G) per example: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}"]
    counts = np.bincount(lengths // bin_width)
    for b in np.flatnonzero(counts):
        lines.append(f"  {b * bin_width:4d}-{(b + 1) * bin_width - 1:<4d} {counts[b]:9d} {'#' * max(1, round(width * counts[b] / counts.max()))}")
    return "\n".join(lines)


def summarize(root: str | Path) -> str:
    """Counts, seq_len, vocab and the path-length histogram of every split of a maze dataset."""
    return summarize_dataset(root, details=lambda split: path_length_histogram(split) if is_maze_split(split) else "")
