"""Sudoku: a unique-solution puzzle generator, a solver, the spec's augmentations, and dataset builders.

Tokens (the reference's): pad 0, blank cell 1, digit ``d`` (1-9) -> ``d + 1`` (2-10); vocab 11,
seq_len 81 (row-major 9x9). Inside this module grids of *digits* use 0 for a blank cell.

Generation (deterministic per (seed, stream, puzzle index), so the result does not depend on the
number of worker processes): a random full grid by randomised backtracking, then cells removed in
a random order, each removal kept only if the solution stays unique, until a blank count drawn
uniformly from ``[min_blanks, max_blanks]`` is reached. A pass that ends (every cell tried) short
of that target keeps its puzzle if it has at least ``min_blanks`` blanks, else starts over from a
new grid; so wide ranges with a high top lean towards fewer blanks. A pass that tries every cell
ends at a *minimal* puzzle; measured over 1000 of them: 56.6 blanks on average, P(>= 58) = 0.20,
P(>= 59) = 0.035, P(>= 60) = 0.001. So min_blanks <= 58 is cheap, 59 costs ~30 grids (~0.3 s)
per puzzle, 60 ~1000 grids, and more is practically out of reach (no 9x9 Sudoku with more than
64 blanks has a unique solution at all).

Uniqueness test of a removal: the puzzle had the unique solution S; after blanking cell c (value v)
it is still unique iff it has no solution with c != v. That is immediate when c's units leave it
no other digit, else one bitmask search answers it (candidate masks, naked-single propagation,
branching on the cell with the fewest candidates).

Augmentations (validity-preserving, as in the reference): a permutation of the digits (blank and
pad fixed), a transpose with p = 0.5, a shuffle of the three bands plus the rows inside each band,
and a shuffle of the three stacks plus the columns inside each stack.

Commands::

    python -m trm.data build sudoku --out data/sudoku --train-puzzles 1000 --aug 1000 --test-puzzles 1000
    python -m trm.data import-sudoku-csv --train-csv train.csv --test-csv test.csv --out data/sudoku-extreme-1k-aug-1000 --subsample 1000 --aug 1000
    python -m trm.data inspect data/sudoku
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np

from trm.data.format import DatasetError, DatasetMetadata, SplitData, summarize_dataset, write_identifiers, write_split
from trm.data.stream import keyed_uniforms

PAD_TOKEN = 0
BLANK_TOKEN = 1
DIGIT_TOKEN_OFFSET = 1
"""Token id of digit ``d`` is ``d + DIGIT_TOKEN_OFFSET``; blank (digit 0) becomes BLANK_TOKEN."""
VOCAB_SIZE = 11
SEQ_LEN = 81
MAX_UNIQUE_BLANKS = 64
"""A 9x9 Sudoku needs at least 17 clues for a unique solution: at most 64 blanks."""
MAX_GRIDS_PER_PUZZLE = 5000
"""Full grids tried for one puzzle before generation gives up (see the module docstring)."""
AUGMENT_WIDTH = 18
"""Uniform draws per augmented row: 9 digit sort keys, transpose, band order, 3 row-in-band
orders, stack order, 3 column-in-stack orders."""

TRAIN_STREAM, TEST_STREAM, AUGMENT_STREAM, SUBSAMPLE_STREAM = 0, 1, 2, 3
"""Independent random streams derived from the build seed (train and test puzzles never share one)."""

_AUGMENT_CHUNK = 1 << 16
_AUGMENT_BLOCK = 2048
_PERMUTATIONS_OF_3 = np.array(list(itertools.permutations(range(3))), dtype=np.int32)

_ROW = tuple(i // 9 for i in range(81))
_COL = tuple(i % 9 for i in range(81))
_BOX = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(81))
_ALL_DIGITS = 0x1FF
_POPCOUNT = tuple(bin(m).count("1") for m in range(512))
_BITS_OF = tuple(tuple(1 << d for d in range(9) if m >> d & 1) for m in range(512))
_DIGIT_OF_BIT = {1 << d: d + 1 for d in range(9)}
_PEERS = tuple(
    tuple(j for j in range(81) if j != i and (_ROW[j] == _ROW[i] or _COL[j] == _COL[i] or _BOX[j] == _BOX[i])) for i in range(81)
)


class PuzzleGenerationError(RuntimeError):
    """The generator could not reach the requested number of blank cells."""


# ----------------------------------------------------------------------------------------------
# Solver. A grid of bits has one bit per filled cell (bit d-1 for digit d, 0 = blank); rows/cols/
# boxes hold the bits used in each unit. The search works on candidate masks `cand` [81]: a cell is
# decided when one bit is left, and every decided cell's bit has been removed from its 20 peers.


def _propagate(cand: list[int], queue: list[int]) -> bool:
    """Remove the bit of each newly decided cell in `queue` from its peers (naked singles, to a
    fixed point). False on a contradiction: a cell left without candidates."""
    while queue:
        cell = queue.pop()
        bit = cand[cell]
        for peer in _PEERS[cell]:
            mask = cand[peer]
            if mask & bit:
                mask ^= bit
                if not mask:
                    return False
                cand[peer] = mask
                if not mask & (mask - 1):
                    queue.append(peer)
    return True


def _count_completions(cand: list[int], limit: int, solution: list[int] | None) -> int:
    """Solutions of a propagated candidate grid, counting stops at `limit`; branches on the
    undecided cell with the fewest candidates (MRV). The first solution is copied to `solution`."""
    best_cell, best_count = -1, 10
    for cell in range(81):
        count = _POPCOUNT[cand[cell]]
        if 1 < count < best_count:
            best_cell, best_count = cell, count
            if count == 2:
                break
    if best_cell < 0:
        if solution is not None and not solution:
            solution.extend(_DIGIT_OF_BIT[bit] for bit in cand)
        return 1
    found = 0
    for bit in _BITS_OF[cand[best_cell]]:
        child = cand[:]
        child[best_cell] = bit
        if _propagate(child, [best_cell]):
            found += _count_completions(child, limit - found, solution)
            if found >= limit:
                break
    return found


def _count_solutions_of(
    grid: list[int],
    rows: list[int],
    cols: list[int],
    boxes: list[int],
    empties: list[int],
    limit: int,
    banned_cell: int = -1,
    banned_bit: int = 0,
    solution: list[int] | None = None,
) -> int:
    """Solutions (up to `limit`) of the bit grid whose filled cells set rows/cols/boxes and whose
    blank cells are `empties`, never placing `banned_bit` at `banned_cell`."""
    cand = grid[:]
    queue = []
    for cell in empties:
        mask = _ALL_DIGITS & ~(rows[_ROW[cell]] | cols[_COL[cell]] | boxes[_BOX[cell]])
        if cell == banned_cell:
            mask &= ~banned_bit
        if not mask:
            return 0
        cand[cell] = mask
        if not mask & (mask - 1):
            queue.append(cell)
    if not _propagate(cand, queue):
        return 0
    return _count_completions(cand, limit, solution)


def _digits_of(grid: np.ndarray | list[int]) -> list[int]:
    digits = np.asarray(grid)
    if digits.size != 81:
        raise ValueError(f"a Sudoku grid has 81 cells (shape [81] or [9, 9]), got shape {digits.shape}")
    digits = digits.reshape(81)
    if not np.issubdtype(digits.dtype, np.integer) or digits.min() < 0 or digits.max() > 9:
        raise ValueError("Sudoku digits must be integers 0-9 (0 = blank cell)")
    return [int(d) for d in digits]


def _solver_state(digits: list[int]) -> tuple[list[int], list[int], list[int], list[int], list[int]] | None:
    """Bit state of a digit grid, or None when two clues clash."""
    grid, rows, cols, boxes = [0] * 81, [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(digits):
        if d:
            bit = 1 << (d - 1)
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            grid[i] = bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return grid, rows, cols, boxes, [i for i in range(81) if not digits[i]]


def count_solutions(grid: np.ndarray | list[int], limit: int = 2) -> int:
    """Number of solutions of a digit grid (0 = blank), counting stops at ``limit``."""
    state = _solver_state(_digits_of(grid))
    return 0 if state is None else _count_solutions_of(*state, limit=limit)


def solve(grid: np.ndarray | list[int]) -> np.ndarray | None:
    """A solution of a digit grid (0 = blank) as uint8 digits of the input's shape, or None."""
    shape = np.shape(grid)
    state = _solver_state(_digits_of(grid))
    solution: list[int] = []
    if state is None or not _count_solutions_of(*state, limit=1, solution=solution):
        return None
    return np.array(solution, dtype=np.uint8).reshape(shape)


def valid_solutions(digits: np.ndarray) -> np.ndarray:
    """bool[B]: each row of ``digits`` [B, 81] (or one [81] grid) is a complete, valid Sudoku."""
    grids = np.asarray(digits).reshape(-1, 9, 9).astype(np.int64)
    bits = np.left_shift(1, np.clip(grids, 0, 10))
    full = 0x3FE  # bits 1..9
    rows_ok = (np.bitwise_or.reduce(bits, axis=2) == full).all(axis=1)
    cols_ok = (np.bitwise_or.reduce(bits, axis=1) == full).all(axis=1)
    boxes = bits.reshape(-1, 3, 3, 3, 3)
    boxes_ok = (np.bitwise_or.reduce(boxes, axis=(2, 4)) == full).all(axis=(1, 2))
    in_range = ((grids >= 1) & (grids <= 9)).all(axis=(1, 2))
    return rows_ok & cols_ok & boxes_ok & in_range


# ----------------------------------------------------------------------------------------------
# Generator


def _puzzle_rng(seed: int, stream: int, index: int) -> random.Random:
    """The random source of puzzle ``index`` of ``stream``: independent of every other puzzle."""
    return random.Random(int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]))


def _random_full_grid(rng: random.Random) -> list[int]:
    """A random solved grid (bits): backtracking over the cells in row-major order, digits tried in random order."""
    grid, rows, cols, boxes = [0] * 81, [0] * 9, [0] * 9, [0] * 9

    def fill(i: int) -> bool:
        if i == 81:
            return True
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        options = list(_BITS_OF[_ALL_DIGITS & ~(rows[r] | cols[c] | boxes[b])])
        rng.shuffle(options)
        for bit in options:
            grid[i] = bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            if fill(i + 1):
                return True
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
        grid[i] = 0
        return False

    fill(0)
    return grid


def generate_puzzle(seed: int, index: int, min_blanks: int, max_blanks: int, stream: int = TRAIN_STREAM) -> tuple[np.ndarray, np.ndarray]:
    """Puzzle ``index`` of ``stream``: (puzzle digits [81] with 0 = blank, solution digits [81]), uint8.

    The puzzle has exactly one solution and between ``min_blanks`` and ``max_blanks`` blank cells.
    """
    rng = _puzzle_rng(seed, stream, index)
    target = rng.randint(min_blanks, max_blanks)
    for _ in range(MAX_GRIDS_PER_PUZZLE):
        solution = _random_full_grid(rng)
        grid = list(solution)
        rows, cols, boxes = [_ALL_DIGITS] * 9, [_ALL_DIGITS] * 9, [_ALL_DIGITS] * 9
        empties: list[int] = []
        order = list(range(81))
        rng.shuffle(order)
        for cell in order:
            if len(empties) == target:
                break
            bit = grid[cell]
            r, c, b = _ROW[cell], _COL[cell], _BOX[cell]
            grid[cell] = 0
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            empties.append(cell)
            forced = not (_ALL_DIGITS & ~(rows[r] | cols[c] | boxes[b] | bit))
            if not forced and _count_solutions_of(grid, rows, cols, boxes, empties, 1, cell, bit):
                empties.pop()
                grid[cell] = bit
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
        if len(empties) >= min_blanks:
            puzzle = np.array([_DIGIT_OF_BIT.get(bit, 0) for bit in grid], dtype=np.uint8)
            return puzzle, np.array([_DIGIT_OF_BIT[bit] for bit in solution], dtype=np.uint8)
    raise PuzzleGenerationError(
        f"no puzzle with >= {min_blanks} blanks and a unique solution after {MAX_GRIDS_PER_PUZZLE} grids "
        "(random removal almost never gets past 59 blanks); lower min_blanks"
    )


def _generate_range(args: tuple[int, int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, stream, start, stop, min_blanks, max_blanks = args
    pairs = [generate_puzzle(seed, i, min_blanks, max_blanks, stream) for i in range(start, stop)]
    return np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs])


def check_blank_range(min_blanks: int, max_blanks: int, what: str = "") -> None:
    """Raise ValueError unless ``0 <= min_blanks <= max_blanks <= 64``."""
    for name, value in ((f"{what}min_blanks", min_blanks), (f"{what}max_blanks", max_blanks)):
        if not 0 <= value <= MAX_UNIQUE_BLANKS:
            raise ValueError(f"{name} must be in 0..{MAX_UNIQUE_BLANKS} (more blanks cannot give a unique solution), got {value}")
    if min_blanks > max_blanks:
        raise ValueError(f"{what}min_blanks ({min_blanks}) is larger than {what}max_blanks ({max_blanks})")


def generate_puzzles(
    count: int,
    seed: int,
    min_blanks: int,
    max_blanks: int,
    *,
    stream: int = TRAIN_STREAM,
    start: int = 0,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Puzzles ``start .. start + count - 1`` of ``stream``: (puzzles, solutions) uint8 digits [count, 81].

    Runs on ``workers`` processes (default: all CPUs); the result is the same for any worker count.
    """
    check_blank_range(min_blanks, max_blanks)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count == 0:
        return np.zeros((0, 81), np.uint8), np.zeros((0, 81), np.uint8)
    workers = min(workers or os.cpu_count() or 1, count)
    chunk = max(1, math.ceil(count / (workers * 8)))
    tasks = [(seed, stream, a, min(a + chunk, start + count), min_blanks, max_blanks) for a in range(start, start + count, chunk)]
    from tqdm import tqdm

    # a progress bar on a terminal only (disable=None): generating 1000s of unique puzzles takes minutes
    bar = tqdm(total=count, unit="puzzle", desc=f"sudoku {'train' if stream == TRAIN_STREAM else 'test'} puzzles",
               disable=None, leave=False, dynamic_ncols=True)
    with bar, contextlib.ExitStack() as stack:
        if workers == 1:
            results = map(_generate_range, tasks)
        else:
            results = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers)).imap(_generate_range, tasks)
        parts = []
        for part in results:  # in task order, whatever the workers: the output does not change
            parts.append(part)
            bar.update(len(part[0]))
    return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])


def _generate_distinct(
    count: int, seed: int, stream: int, min_blanks: int, max_blanks: int, workers: int | None, exclude: set[bytes]
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` puzzles of ``stream`` whose digits differ from each other and from ``exclude``.

    Duplicates are skipped and replaced by the next indices of the stream (deterministic).
    """
    if count == 0:
        return np.zeros((0, 81), np.uint8), np.zeros((0, 81), np.uint8)
    seen = set(exclude)
    kept_puzzles, kept_solutions = [], []
    next_index = 0
    while len(kept_puzzles) < count:
        need = count - len(kept_puzzles)
        puzzles, solutions = generate_puzzles(need, seed, min_blanks, max_blanks, stream=stream, start=next_index, workers=workers)
        next_index += need
        for puzzle, solution in zip(puzzles, solutions):
            key = puzzle.tobytes()
            if key not in seen:
                seen.add(key)
                kept_puzzles.append(puzzle)
                kept_solutions.append(solution)
    return np.stack(kept_puzzles), np.stack(kept_solutions)


# ----------------------------------------------------------------------------------------------
# Augmentation


def _augment_with_uniforms(inputs: np.ndarray, labels: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply one transform per row of token arrays [B, 81], drawn from ``uniforms`` [B, AUGMENT_WIDTH].

    Output cell (r, c) reads input cell (R[r], C[c]) -- or (C[c], R[r]) when transposed -- with
    R[3 i + j] = 3 band[i] + row_in_band[i][j] and C likewise from stacks, and every digit token
    2 + d becomes 2 + perm[d] (tokens 0 and 1 are kept). The permutations of 3 are picked from
    the 6 by ``floor(6 u)``; the digit permutation sorts 9 uniforms.
    """
    new_inputs, new_labels = np.empty_like(inputs), np.empty_like(labels)
    for start in range(0, len(inputs), _AUGMENT_BLOCK):
        rows = slice(start, start + _AUGMENT_BLOCK)
        u = uniforms[rows]
        batch = len(u)
        sort_keys = ((u[:, 0:9] * (1 << 27)).astype(np.int32) << 4) | np.arange(9, dtype=np.int32)
        digit_perm = np.sort(sort_keys, axis=1) & 0xF
        bands = _PERMUTATIONS_OF_3[(u[:, 10] * 6).astype(np.intp)]
        rows_in_band = _PERMUTATIONS_OF_3[(u[:, 11:14] * 6).astype(np.intp)]
        stacks = _PERMUTATIONS_OF_3[(u[:, 14] * 6).astype(np.intp)]
        cols_in_stack = _PERMUTATIONS_OF_3[(u[:, 15:18] * 6).astype(np.intp)]
        row_of = (bands[:, :, None] * 3 + rows_in_band).reshape(batch, 9, 1)
        col_of = (stacks[:, :, None] * 3 + cols_in_stack).reshape(batch, 1, 9)
        row_stride = np.where(u[:, 9] < 0.5, 1, 9).astype(np.int32)[:, None, None]
        flat_source = (row_of * row_stride + col_of * (10 - row_stride)).reshape(batch, 81)
        flat_source += (np.arange(batch, dtype=np.int32) * SEQ_LEN)[:, None]

        table = np.empty((batch, VOCAB_SIZE), dtype=np.int32)
        table[:, : BLANK_TOKEN + 1] = np.arange(BLANK_TOKEN + 1)
        table[:, BLANK_TOKEN + 1 :] = digit_perm + BLANK_TOKEN + 1
        table_row = (np.arange(batch, dtype=np.int32) * VOCAB_SIZE)[:, None]
        new_inputs[rows] = table.reshape(-1)[inputs[rows].reshape(-1)[flat_source] + table_row]
        new_labels[rows] = table.reshape(-1)[labels[rows].reshape(-1)[flat_source] + table_row]
    return new_inputs, new_labels


def _as_token_batch(inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if inputs.shape != labels.shape or inputs.shape[-1:] != (SEQ_LEN,) or inputs.ndim not in (1, 2):
        raise ValueError(f"Sudoku augmentation needs inputs and labels of shape [81] or [B, 81], got {inputs.shape} and {labels.shape}")
    batch_inputs, batch_labels = inputs.reshape(-1, SEQ_LEN), labels.reshape(-1, SEQ_LEN)
    for name, array in (("inputs", batch_inputs), ("labels", batch_labels)):
        if array.size and (array.min() < 0 or array.max() >= VOCAB_SIZE):
            raise ValueError(f"Sudoku augmentation: {name} hold token ids outside [0, {VOCAB_SIZE})")
    return batch_inputs, batch_labels


def augment(inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Randomly transformed copies of token arrays [81] or [B, 81] (one independent transform per row).

    Inputs and labels of a row get the same transform, so a valid (puzzle, solution) pair stays
    valid and a unique solution stays unique. Dtypes and shapes are kept.
    """
    batch_inputs, batch_labels = _as_token_batch(inputs, labels)
    new_inputs, new_labels = _augment_with_uniforms(batch_inputs, batch_labels, rng.random((len(batch_inputs), AUGMENT_WIDTH)))
    return new_inputs.reshape(np.shape(inputs)), new_labels.reshape(np.shape(labels))


def augment_at(inputs: np.ndarray, labels: np.ndarray, seed: int, global_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`augment`, but row ``i``'s transform is a pure function of (seed, global_positions[i]).

    Meant for on-the-fly training augmentation: sample ``k`` is augmented the same way whatever
    the batch, rank or world size it is drawn in.
    """
    batch_inputs, batch_labels = _as_token_batch(inputs, labels)
    positions = np.asarray(global_positions).reshape(-1)
    if len(positions) != len(batch_inputs):
        raise ValueError(f"augment_at: {len(positions)} positions for {len(batch_inputs)} rows")
    uniforms = keyed_uniforms(seed, AUGMENT_STREAM, positions, AUGMENT_WIDTH)
    new_inputs, new_labels = _augment_with_uniforms(batch_inputs, batch_labels, uniforms)
    return new_inputs.reshape(np.shape(inputs)), new_labels.reshape(np.shape(labels))


# ----------------------------------------------------------------------------------------------
# Dataset builders


def _split_arrays(puzzles: np.ndarray, solutions: np.ndarray, aug: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The reference layout for digit grids: each puzzle followed by ``aug`` augmented copies.

    Every example is its own puzzle (identifier 0); a puzzle and its copies form one group.
    """
    copies = 1 + aug
    inputs = np.repeat(puzzles.astype(np.uint8) + DIGIT_TOKEN_OFFSET, copies, axis=0)
    labels = np.repeat(solutions.astype(np.uint8) + DIGIT_TOKEN_OFFSET, copies, axis=0)
    augmented = np.flatnonzero(np.arange(len(inputs)) % copies != 0)
    for start in range(0, len(augmented), _AUGMENT_CHUNK):
        rows = augmented[start : start + _AUGMENT_CHUNK]
        inputs[rows], labels[rows] = augment(inputs[rows], labels[rows], rng)
    num_examples = len(inputs)
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.zeros(num_examples, dtype=np.int32),
        "puzzle_indices": np.arange(num_examples + 1, dtype=np.int32),
        "group_indices": np.arange(0, num_examples + 1, copies, dtype=np.int32),
    }


def write_sudoku_dataset(
    out_dir: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], aug: int, seed: int
) -> None:
    """Write (puzzles, solutions) digit arrays as a Sudoku dataset; train gets ``aug`` copies per puzzle.

    Order of writes: identifiers, test split, train split (``train/dataset.json`` last marks completion).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(np.random.SeedSequence([seed, AUGMENT_STREAM]))
    write_identifiers(out_dir, ["<blank>"])
    for split, (puzzles, solutions), copies in (("test", test, 0), ("train", train, aug)):
        arrays = {"all": _split_arrays(puzzles, solutions, copies, rng)}
        metadata = DatasetMetadata.from_arrays(arrays, vocab_size=VOCAB_SIZE, seq_len=SEQ_LEN, num_puzzle_identifiers=1)
        write_split(out_dir, split, metadata, arrays)


def build_sudoku(
    out_dir: str | Path,
    train_puzzles: int,
    test_puzzles: int,
    aug: int,
    seed: int,
    min_blanks: int,
    max_blanks: int,
    test_min_blanks: int | None = None,
    test_max_blanks: int | None = None,
    workers: int | None = None,
) -> None:
    """Generate a Sudoku dataset in the reference layout (byte-identical for equal arguments).

    Train: ``train_puzzles`` generated puzzles, each followed by ``aug`` augmentations (one group
    per original). Test: ``test_puzzles`` other puzzles (a separate seed stream; exact duplicates of
    train puzzles are skipped), no augmentation, blanks in ``[test_min_blanks, test_max_blanks]``
    (defaults: the train range).
    """
    for name, value in (("train_puzzles", train_puzzles), ("test_puzzles", test_puzzles), ("aug", aug), ("seed", seed)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    test_min_blanks = min_blanks if test_min_blanks is None else test_min_blanks
    test_max_blanks = max_blanks if test_max_blanks is None else test_max_blanks
    check_blank_range(min_blanks, max_blanks)
    check_blank_range(test_min_blanks, test_max_blanks, what="test_")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    train = _generate_distinct(train_puzzles, seed, TRAIN_STREAM, min_blanks, max_blanks, workers, exclude=set())
    test = _generate_distinct(test_puzzles, seed, TEST_STREAM, test_min_blanks, test_max_blanks, workers, exclude={p.tobytes() for p in train[0]})
    write_sudoku_dataset(out_dir, train, test, aug, seed)


def read_sudoku_csv(path: str | Path, min_rating: float | None = None,
                    skipped: list[tuple[int, str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(puzzles, solutions) uint8 digits [N, 81] from a Sudoku-Extreme CSV, keeping rows with rating >= min_rating.

    Columns (by header name): ``question`` (81 chars, ``.`` or ``0`` = blank), ``answer`` (81 digits
    1-9), ``rating`` (a number; needed only with ``min_rating``). Every row has as many fields as
    the header, and every answer must be a valid grid that agrees with its question's clues. Blank
    lines are ignored. A bad row is a DatasetError naming its line, unless ``skipped`` is a list:
    then the row is left out and ``(line, reason)`` appended to it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CSV file {path} does not exist")
    questions, answers, lines = [], [], []

    def bad_row(line: int, what: str) -> None:
        if skipped is None:
            raise DatasetError(f"{path}:{line}: {what} (--skip-bad-rows leaves such rows out and counts them)")
        skipped.append((line, what))

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
            q_col, a_col = columns["question"], columns["answer"]
            for line, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue  # a blank line (e.g. a trailing one)
                if len(row) != len(header):
                    bad_row(line, f"expected {len(header)} fields like the header, got {len(row)}")
                    continue
                if min_rating is not None:
                    try:
                        rating = float(row[columns["rating"]])
                    except (ValueError, IndexError):
                        bad_row(line, "rating is not a number")
                        continue
                    if rating < min_rating:
                        continue
                question, answer = row[q_col].strip(), row[a_col].strip()
                if len(question) != 81 or len(answer) != 81:
                    bad_row(line, f"question and answer must have 81 characters, got {len(question)} and {len(answer)}")
                    continue
                if not question.isascii() or not answer.isascii():
                    bad_row(line, "questions and answers must be ASCII digits")
                    continue
                questions.append(question.replace(".", "0"))
                answers.append(answer)
                lines.append(line)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a text CSV file ({err})") from None
    if not questions:
        return np.zeros((0, 81), np.uint8), np.zeros((0, 81), np.uint8)
    puzzles = np.frombuffer("".join(questions).encode("ascii"), dtype=np.uint8).reshape(-1, 81) - ord("0")
    solutions = np.frombuffer("".join(answers).encode("ascii"), dtype=np.uint8).reshape(-1, 81) - ord("0")
    problems = [
        ((puzzles > 9).any(axis=1), "question holds a character other than 0-9 or '.'"),
        (~valid_solutions(solutions), "answer is not a valid solved Sudoku"),
        (((puzzles != 0) & (puzzles != solutions)).any(axis=1), "answer contradicts a clue of the question"),
    ]
    keep = np.ones(len(puzzles), bool)
    for bad, what in problems:
        for row in np.flatnonzero(bad & keep):
            bad_row(lines[int(row)], what)  # raises unless skipping
        keep &= ~bad
    return puzzles[keep], solutions[keep]


def import_sudoku_csv(
    out_dir: str | Path,
    train_csv: str | Path,
    test_csv: str | Path,
    subsample: int | None = None,
    aug: int = 0,
    min_rating: float | None = None,
    seed: int = 0,
    test_subsample: int | None = None,
    skip_bad_rows: bool = False,
) -> list[tuple[str, int, str]]:
    """Convert Sudoku-Extreme style CSVs to the reference layout; returns the rows left out
    (``(csv, line, reason)``, only with ``skip_bad_rows``; without it a bad row is a DatasetError).

    ``subsample`` (``test_subsample``) keeps that many rows of the train (test) CSV, chosen without
    replacement by ``seed`` and kept in file order (more than the CSV has is a DatasetError); the
    train split gets ``aug`` augmentations per puzzle; ``min_rating`` drops rows rated below it
    before subsampling.
    """
    for name, value in (("subsample", subsample), ("test_subsample", test_subsample), ("aug", aug), ("seed", seed)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SUBSAMPLE_STREAM]))
    splits, left_out = [], []
    for csv_path, size, flag in ((train_csv, subsample, "--subsample"), (test_csv, test_subsample, "--test-subsample")):
        skipped: list[tuple[int, str]] | None = [] if skip_bad_rows else None
        puzzles, solutions = read_sudoku_csv(csv_path, min_rating, skipped)
        left_out += [(str(csv_path), line, what) for line, what in skipped or ()]
        if size is not None and size > len(puzzles):
            raise DatasetError(f"{flag} {size} asks for more puzzles than {csv_path} has ({len(puzzles)} usable rows"
                               f"{' at --min-rating' if min_rating is not None else ''}); lower it or leave it out to keep all")
        if size is not None and size < len(puzzles):
            keep = np.sort(rng.choice(len(puzzles), size=size, replace=False))
            puzzles, solutions = puzzles[keep], solutions[keep]
        splits.append((puzzles, solutions))
    write_sudoku_dataset(out_dir, splits[0], splits[1], aug, seed)
    return left_out


# ----------------------------------------------------------------------------------------------
# Summary


def blank_histogram(split: SplitData, width: int = 40) -> str:
    """Blank cells per example (min / mean / max) and one line per blank count present, with a bar."""
    if split.num_examples == 0:
        return "  blanks: (no examples)"
    per_chunk = [(split.inputs[a : a + _AUGMENT_CHUNK] == BLANK_TOKEN).sum(axis=1) for a in range(0, split.num_examples, _AUGMENT_CHUNK)]
    blanks = np.concatenate(per_chunk)
    counts = np.bincount(blanks)
    lines = [f"  blanks per example: min {blanks.min()}, mean {blanks.mean():.1f}, max {blanks.max()}"]
    for value in np.flatnonzero(counts):
        lines.append(f"  {value:4d} blanks {counts[value]:9d} {'#' * max(1, round(width * counts[value] / counts.max()))}")
    return "\n".join(lines)


def is_sudoku_split(split: SplitData) -> bool:
    """The split has Sudoku geometry (81 cells, vocab 11)."""
    return (split.metadata.seq_len, split.metadata.vocab_size) == (SEQ_LEN, VOCAB_SIZE)


def summarize(root: str | Path) -> str:
    """Counts, seq_len, vocab and the histogram of blank counts of every split of a Sudoku dataset."""
    return summarize_dataset(root, details=lambda split: blank_histogram(split) if is_sudoku_split(split) else "")
