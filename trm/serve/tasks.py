"""Task codecs of the service: a request's grid (JSON) <-> the model's token sequence.

Each task knows which model shapes it fits (``seq_len``, ``vocab_size``), how to turn ONE grid
of a request into ``seq_len`` token ids (validating it: any problem is a :class:`RequestError`
naming the grid, row and cell), and how to turn a predicted token sequence back into a grid.
Token layouts and constants come from the dataset builders (``trm.data.sudoku``, ``.maze``,
``.arc``), so a served model sees exactly what it was trained on:

- ``sudoku``: 9x9, pad 0, blank 1, digit d -> d + 1 (vocab 11, seq_len 81). A grid is 9 lists of
  9 integers 0-9 (0 = blank) or one string of 81 characters ``1-9`` with ``0`` or ``.`` for a
  blank. Its givens must not contradict each other (a digit twice in a row, column or box: 422
  naming the cells). The answer is 9 lists of 9 digits (0 where the model predicted no digit).
- ``maze``: 30 x 30, characters ``# SGo`` -> 1-5, pad 0 (vocab 6, seq_len 900). A grid is 30
  strings of 30 characters from ``# SG`` (walls, open cells, start, goal) with exactly one start
  and one goal, the goal reachable from the start through open cells (else 422 naming the cells).
  The answer marks the predicted path with ``o`` (``?`` where the model predicted padding).
- ``arc``: up to 30 x 30, pad 0, end marker 1, colour c -> c + 2 (vocab 12, seq_len 900). A grid
  is 1-30 lists of equally many integers 0-9, placed top-left; end markers fill the row below and
  the column right of it. The answer is the largest top-left rectangle of predicted colours.

Test: ``pytest tests/test_serve.py -k malformed`` (and every solve test goes through here).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from trm.data import arc as arc_data
from trm.data import maze as maze_data
from trm.data import sudoku as sudoku_data


class RequestError(ValueError):
    """A request the service cannot answer; ``status`` is the HTTP status (4xx) to reply with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class TaskCodec:
    """Encoding of one task family; ``fits(seq_len, vocab_size)`` says whether a model can serve it."""

    name: str
    fits: Callable[[int, int], bool]
    encode: Callable[[Any, int, str], np.ndarray]
    """(grid, seq_len, what) -> int32 tokens [seq_len]; ``what`` names the grid in error messages."""
    decode: Callable[[np.ndarray], Any]
    """predicted tokens [seq_len] -> the JSON answer."""


TASKS: dict[str, TaskCodec] = {}


def register_task(codec: TaskCodec) -> TaskCodec:
    if codec.name in TASKS:
        raise ValueError(f"task '{codec.name}' is already registered")
    TASKS[codec.name] = codec
    return codec


def task_for_dims(seq_len: int, vocab_size: int) -> str | None:
    """The one registered task whose encoding fits a model of this shape (None: none or several)."""
    fitting = [name for name, codec in TASKS.items() if codec.fits(seq_len, vocab_size)]
    return fitting[0] if len(fitting) == 1 else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_rows(grid: Any, what: str, hint: str, max_rows: int, exact: bool, values: range, kind: str) -> list[list[int]]:
    """A list of equally long lists of integers in ``values`` (1..max_rows rows and columns;
    exactly max_rows x max_rows when ``exact``)."""
    if not isinstance(grid, list) or not grid:
        raise RequestError(f"{what} must be a non-empty list of rows; expected {hint}.")
    if len(grid) > max_rows or (exact and len(grid) != max_rows):
        raise RequestError(f"{what} has {len(grid)} rows; expected {hint}.")
    width = None
    for r, row in enumerate(grid):
        if not isinstance(row, list):
            raise RequestError(f"{what} row {r} is a {type(row).__name__}, not a list; expected {hint}.")
        if width is None:
            width = len(row)
        if len(row) != width or not row or len(row) > max_rows or (exact and len(row) != max_rows):
            raise RequestError(f"{what} row {r} has {len(row)} cells; expected {hint}.")
        for c, cell in enumerate(row):
            if not _is_int(cell):
                raise RequestError(f"{what} cell ({r}, {c}) is {str(cell)[:20]!r}, not an integer; expected {hint}.")
            if cell not in values:
                raise RequestError(f"{what} cell ({r}, {c}) is {str(cell)[:20]}; {kind} are {values.start}-{values.stop - 1}.")
    return grid


# --------------------------------------------------------------------------------------- sudoku
SUDOKU_HINT = "9 lists of 9 integers 0-9 (0 = blank), or a string of 81 characters 0-9 or '.'"


def sudoku_contradictions(digits_81: np.ndarray) -> list[str]:
    """Each digit given more than once in a row, column or 3x3 box, as "digit D twice in row R: cells
    (r, c), (r, c)" (rows and columns from 0); empty when the givens are consistent."""
    grid = digits_81.reshape(9, 9)
    problems = []
    units = [(f"row {r}", [(r, c) for c in range(9)]) for r in range(9)]
    units += [(f"column {c}", [(r, c) for r in range(9)]) for c in range(9)]
    units += [(f"box {b} (rows {b // 3 * 3}-{b // 3 * 3 + 2}, columns {b % 3 * 3}-{b % 3 * 3 + 2})",
               [(b // 3 * 3 + i, b % 3 * 3 + j) for i in range(3) for j in range(3)]) for b in range(9)]
    for unit, cells in units:
        seen: dict[int, list[tuple[int, int]]] = {}
        for r, c in cells:
            if grid[r, c]:
                seen.setdefault(int(grid[r, c]), []).append((r, c))
        for digit, where in sorted(seen.items()):
            if len(where) > 1:
                times = "twice" if len(where) == 2 else f"{len(where)} times"
                problems.append(f"digit {digit} {times} in {unit}: cells {', '.join(map(str, where))}")
    return problems


def _sudoku_encode(grid: Any, seq_len: int, what: str) -> np.ndarray:
    if isinstance(grid, str):
        if len(grid) != 81:
            raise RequestError(f"{what} is a string of {len(grid)} characters; expected {SUDOKU_HINT}.")
        bad = next((i for i, ch in enumerate(grid) if ch not in "0123456789."), None)
        if bad is not None:
            raise RequestError(f"{what} has {grid[bad]!r} at position {bad}; expected {SUDOKU_HINT}.")
        digits = np.array([0 if ch == "." else int(ch) for ch in grid], dtype=np.int32)
    else:
        rows = _int_rows(grid, what, SUDOKU_HINT, 9, exact=True, values=range(10), kind="Sudoku cells (0 = blank)")
        digits = np.array(rows, dtype=np.int32).reshape(81)
    problems = sudoku_contradictions(digits)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise RequestError(f"{what} contradicts itself, so it has no solution: {shown} (cells are (row, column) "
                           f"from 0). Check the givens.")
    return np.where(digits == 0, sudoku_data.BLANK_TOKEN, digits + sudoku_data.DIGIT_TOKEN_OFFSET).astype(np.int32)


def _sudoku_decode(tokens: np.ndarray) -> list[list[int]]:
    offset = sudoku_data.DIGIT_TOKEN_OFFSET
    digits = np.where((tokens >= 1 + offset) & (tokens <= 9 + offset), tokens - offset, 0)
    return digits.reshape(9, 9).tolist()


register_task(TaskCodec("sudoku", lambda s, v: (s, v) == (sudoku_data.SEQ_LEN, sudoku_data.VOCAB_SIZE),
                        _sudoku_encode, _sudoku_decode))


# ----------------------------------------------------------------------------------------- maze
MAZE_INPUT_CHARS = maze_data.CHARSET[:4]
"""What a request may show: wall, open cell, start, goal (the path ``o`` is the answer)."""
MAZE_HINT = (f"{maze_data.MAZE_SIZE} strings of {maze_data.MAZE_SIZE} characters from '{MAZE_INPUT_CHARS}' "
             f"(wall, open, start, goal)")


def _maze_encode(grid: Any, seq_len: int, what: str) -> np.ndarray:
    side = maze_data.MAZE_SIZE
    if not isinstance(grid, list) or len(grid) != side:
        rows = f"{len(grid)} rows" if isinstance(grid, list) else f"a {type(grid).__name__}"
        raise RequestError(f"{what} is {rows}; expected {MAZE_HINT}.")
    tokens = np.empty((side, side), dtype=np.int32)
    for r, row in enumerate(grid):
        if not isinstance(row, str) or len(row) != side:
            got = f"{len(row)} characters" if isinstance(row, str) else f"a {type(row).__name__}"
            raise RequestError(f"{what} row {r} is {got}; expected {MAZE_HINT}.")
        for c, ch in enumerate(row):
            if ch not in MAZE_INPUT_CHARS:
                raise RequestError(f"{what} cell ({r}, {c}) is {ch!r}; expected {MAZE_HINT}.")
            tokens[r, c] = maze_data.CHARSET.index(ch) + 1
    _check_maze(tokens, what)
    return tokens.reshape(seq_len)


def _check_maze(tokens: np.ndarray, what: str) -> None:
    """Exactly one start and one goal, and the goal reachable from the start (4-neighbour moves
    through anything but walls): what the dataset's mazes always satisfy."""
    for token, name, char in ((maze_data.START, "start", "S"), (maze_data.GOAL, "goal", "G")):
        cells = [tuple(map(int, rc)) for rc in np.argwhere(tokens == token)]
        if len(cells) != 1:
            found = f"{len(cells)}, at (row, column) from 0: {', '.join(map(str, cells[:10]))}" if cells else "none"
            raise RequestError(f"{what} must hold exactly one {name} '{char}'; it has {found}.")
    start = tuple(map(int, np.argwhere(tokens == maze_data.START)[0]))
    goal = tuple(map(int, np.argwhere(tokens == maze_data.GOAL)[0]))
    side = tokens.shape[0]
    reached, frontier = {start}, deque([start])
    while frontier:
        r, c = frontier.popleft()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < side and 0 <= nc < side and (nr, nc) not in reached and tokens[nr, nc] != maze_data.WALL:
                reached.add((nr, nc))
                frontier.append((nr, nc))
    if goal not in reached:
        raise RequestError(f"{what} has no path from the start 'S' at {start} to the goal 'G' at {goal}: walls "
                           f"separate them, so the maze has no solution.")


def _maze_decode(tokens: np.ndarray) -> list[str]:
    chars = np.array(list("?" + maze_data.CHARSET))[np.clip(tokens, 0, len(maze_data.CHARSET))]
    return ["".join(row) for row in chars.reshape(maze_data.MAZE_SIZE, maze_data.MAZE_SIZE)]


register_task(TaskCodec("maze", lambda s, v: (s, v) == (maze_data.SEQ_LEN, maze_data.VOCAB_SIZE),
                        _maze_encode, _maze_decode))


# ------------------------------------------------------------------------------------------ arc
ARC_HINT = f"1-{arc_data.GRID_SIZE} lists of equally many (1-{arc_data.GRID_SIZE}) integers 0-9"


def _arc_encode(grid: Any, seq_len: int, what: str) -> np.ndarray:
    rows = _int_rows(grid, what, ARC_HINT, arc_data.GRID_SIZE, exact=False, values=range(10), kind="ARC colours")
    return arc_data.encode_grid(np.array(rows, dtype=np.uint8)).astype(np.int32)


def _arc_decode(tokens: np.ndarray) -> list[list[int]]:
    return arc_data.decode_grid(tokens).astype(int).tolist()


register_task(TaskCodec("arc", lambda s, v: (s, v) == (arc_data.SEQ_LEN, arc_data.VOCAB_SIZE),
                        _arc_encode, _arc_decode))
