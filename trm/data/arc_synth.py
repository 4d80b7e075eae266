"""A seeded generator of ARC-like tasks on a small canvas (the CPU-scale proof of test-time adaptation).

Each task is a hidden grid PROGRAM, one or two steps drawn from these primitives:

=================  ====================================================================
``dihedral t``     one of the 7 non-identity symmetries of the square (``trm.data.format.dihedral``)
``recolour a b``   every cell of colour ``a`` becomes ``b``
``cycle k``        every non-black colour ``c`` becomes ``(c - 1 + k) mod 9 + 1``
``gravity d``      non-black cells slide to the bottom / top / left / right edge, keeping their order
``tile ry rx``     the grid repeated ``ry`` times down and ``rx`` times across (1x2, 2x1, 2x2)
``largest c``      the largest 4-connected non-black object is recoloured ``c``
``background c``   black cells become ``c``
=================  ====================================================================

A task shows 3-5 demonstration pairs and 1-2 test pairs: random inputs (sides ``min_side`` ..
``max_side``, a few colours, always including the colours the program reads) and the program's
outputs; an input the program leaves unchanged is redrawn. Grids are encoded as ARC grids on a
``canvas x canvas`` token canvas (``trm.data.arc.build_arc_dataset(canvas=...)``, at the top-left
corner: no translational augmentation), so voting, submissions and the service treat them like ARC.

Held-out tasks are genuinely new programs, guaranteed two ways:

1. by composition: a held-out program is a two-step program whose ORDERED PAIR OF KINDS is in
   :data:`HELDOUT_KIND_PAIRS` (or the ``heldout_kind_pairs`` asked for); training programs are single steps or two-step programs whose kind
   pair is not (so no held-out composition is ever seen in training);
2. by behaviour: every program's fingerprint (its outputs on fixed probe grids) is recorded;
   a held-out program whose fingerprint equals that of any training program (a composition that
   reduces to a trained one, e.g. two flips = one rotation) or of another held-out program is
   rejected. So no held-out program computes, on the probes, what a training program computes.

Every program is used by exactly one task. Dataset written by :func:`build_arc_synth`::

    <out>/                       ARC layout (identifiers.json, train/, test/, test_puzzles.json):
                                 train split = training tasks (all pairs) + validation tasks
                                 (demonstrations); test split = validation tasks' test pairs
    <out>/heldout/heldout_challenges.json + heldout_solutions.json
                                 the held-out tasks, Kaggle layout (for ``python -m trm.adapt``)
    <out>/programs.json          each task's program and role (train / validation / heldout)

Command::

    python -m trm.data build arc-synth --out data/arc-synth --train-tasks 96 --heldout-tasks 16

Tests: ``pytest tests/test_arc_synth.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trm.data.arc import ArcTask, build_arc_dataset
from trm.data.format import DatasetError, dihedral

KINDS = ("dihedral", "recolour", "cycle", "gravity", "tile", "largest", "background")
"""Primitive kinds, in a fixed order (the parameters of each are drawn in :func:`_draw_step`)."""

HELDOUT_KIND_PAIRS = frozenset({
    ("dihedral", "recolour"), ("recolour", "gravity"), ("gravity", "cycle"), ("cycle", "tile"),
    ("tile", "largest"), ("largest", "background"), ("background", "dihedral"), ("gravity", "dihedral"),
})
"""Ordered (first step, second step) kind pairs that only held-out programs use."""

COLOUR_KIND_PAIRS = frozenset((a, b) for a in ("recolour", "cycle", "background") for b in ("recolour", "cycle", "background") if a != b)
"""An easier held-out family (tests' CI-sized proof): compositions of two colour maps, which no
training program then composes (each is still a new colour map, checked by behaviour)."""

TILES = ((1, 2), (2, 1), (2, 2))
PROBE_SEED = 20251201
PROBES = 24
MAX_DRAWS = 500


Step = tuple  # (kind, *params), JSON-friendly


class SynthError(DatasetError):
    """The generator cannot produce what was asked (e.g. more distinct programs than exist)."""


# ----------------------------------------------------------------------------------- primitives
def _gravity(grid: np.ndarray, direction: int) -> np.ndarray:
    """Non-black cells slide towards edge ``direction`` (0 down, 1 up, 2 left, 3 right)."""
    moved = np.rot90(grid, k={0: 0, 1: 2, 2: 1, 3: 3}[direction])  # bring that edge to the bottom
    out = np.zeros_like(moved)
    for c in range(moved.shape[1]):
        column = moved[:, c][moved[:, c] != 0]
        if len(column):
            out[-len(column):, c] = column
    return np.rot90(out, k=-{0: 0, 1: 2, 2: 1, 3: 3}[direction])


def _largest_object(grid: np.ndarray, colour: int) -> np.ndarray:
    """Recolour the largest 4-connected set of non-black cells (ties: the first in row-major order)."""
    h, w = grid.shape
    label = -np.ones((h, w), np.int64)
    sizes = []
    for start in zip(*np.nonzero(grid)):
        if label[start] >= 0:
            continue
        stack, size = [start], 0
        label[start] = len(sizes)
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and grid[ny, nx] != 0 and label[ny, nx] < 0:
                    label[ny, nx] = len(sizes)
                    stack.append((ny, nx))
        sizes.append(size)
    out = grid.copy()
    if sizes:
        out[label == int(np.argmax(sizes))] = colour
    return out


def apply_step(grid: np.ndarray, step: Step) -> np.ndarray:
    """One primitive applied to a grid (uint8 [h, w])."""
    kind, *params = step
    if kind == "dihedral":
        return np.ascontiguousarray(dihedral(grid, params[0]))
    if kind == "recolour":
        return np.where(grid == params[0], params[1], grid).astype(np.uint8)
    if kind == "cycle":
        return np.where(grid > 0, (grid.astype(np.int64) - 1 + params[0]) % 9 + 1, 0).astype(np.uint8)
    if kind == "gravity":
        return np.ascontiguousarray(_gravity(grid, params[0]))
    if kind == "tile":
        return np.tile(grid, (params[0], params[1]))
    if kind == "largest":
        return _largest_object(grid, params[0])
    if kind == "background":
        return np.where(grid == 0, params[0], grid).astype(np.uint8)
    raise ValueError(f"unknown primitive {kind!r}")


def run_program(grid: np.ndarray, program: list[Step]) -> np.ndarray:
    """The program's output for one input grid."""
    for step in program:
        grid = apply_step(grid, step)
    return grid


def growth(program: list[Step]) -> tuple[int, int]:
    """(row, column) factor by which the program enlarges a grid (tiling)."""
    fy = fx = 1
    for kind, *params in program:
        if kind == "tile":
            fy, fx = fy * params[0], fx * params[1]
        elif kind == "dihedral" and params[0] in (1, 3, 6, 7):
            fy, fx = fx, fy
    return fy, fx


def needed_colours(program: list[Step]) -> set[int]:
    """Colours an input must show for the program to act (``recolour a b`` reads ``a``)."""
    return {params[0] for kind, *params in program if kind == "recolour"}


def _draw_step(kind: str, rng: np.random.Generator) -> Step:
    if kind == "dihedral":
        return (kind, int(rng.integers(1, 8)))
    if kind == "recolour":
        a, b = rng.choice(np.arange(1, 10), size=2, replace=False)
        return (kind, int(a), int(b))
    if kind == "cycle":
        return (kind, int(rng.integers(1, 9)))
    if kind == "gravity":
        return (kind, int(rng.integers(4)))
    if kind == "tile":
        ry, rx = TILES[int(rng.integers(len(TILES)))]
        return (kind, ry, rx)
    if kind in ("largest", "background"):
        return (kind, int(rng.integers(1, 10)))
    raise ValueError(kind)


def _probe_grids(max_side: int) -> list[np.ndarray]:
    rng = np.random.default_rng(PROBE_SEED)
    grids = []
    for _ in range(PROBES):
        h, w = rng.integers(2, max(max_side, 2) + 1, size=2)
        grid = rng.integers(1, 10, size=(h, w)) * (rng.random((h, w)) < 0.6)
        grids.append(grid.astype(np.uint8))
    return grids


def fingerprint(program: list[Step], probes: list[np.ndarray]) -> bytes:
    """Hash of the program's outputs on the probe grids: equal for programs that behave alike there."""
    digest = hashlib.blake2b(digest_size=16)
    for grid in probes:
        out = run_program(grid, program)
        digest.update(bytes(out.shape) + out.tobytes())
    return digest.digest()


# ----------------------------------------------------------------------------------- programs
@dataclass
class SynthTask:
    """A generated task, its program and its role (train | validation | heldout)."""

    task: ArcTask
    program: list[Step]
    role: str


def _random_input(rng: np.random.Generator, min_side: int, max_side: int, must: set[int]) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    palette = set(int(c) for c in rng.choice(np.arange(1, 10), size=int(rng.integers(2, 4)), replace=False)) | must
    palette = np.array(sorted(palette))
    grid = np.where(rng.random((h, w)) < 0.5, rng.choice(palette, size=(h, w)), 0).astype(np.uint8)
    for colour in must:  # the colours the program reads are present
        grid[int(rng.integers(h)), int(rng.integers(w))] = colour
    return grid


def _make_task(task_id: str, program: list[Step], rng: np.random.Generator, canvas: int, min_side: int,
               max_side: int, role: str) -> SynthTask | None:
    """Demonstrations (3-5) and tests (1-2) of a program; None when it leaves too many inputs unchanged."""
    fy, fx = growth(program)
    side_cap = min(max_side, canvas // max(fy, fx))
    if side_cap < min_side:
        return None
    must = needed_colours(program)
    pairs = []
    tests = int(rng.integers(1, 3))
    wanted = int(rng.integers(3, 6)) + tests
    for _ in range(4 * wanted):
        inp = _random_input(rng, min_side, side_cap, must)
        out = run_program(inp, program)
        if not np.array_equal(inp, out) and max(out.shape) <= canvas:
            pairs.append((inp, out))
            if len(pairs) == wanted:
                break
    if len(pairs) < wanted:
        return None
    return SynthTask(ArcTask(task_id, pairs[:-tests], pairs[-tests:]), program, role)


def check_kind_pairs(pairs: Any) -> frozenset[tuple[str, str]]:
    """The held-out kind pairs as a frozenset; SynthError unless each is two different known kinds."""
    try:
        checked = frozenset((str(a), str(b)) for a, b in pairs)
    except (TypeError, ValueError):
        raise SynthError(f"heldout_kind_pairs must be (first kind, second kind) pairs, got {pairs!r}") from None
    bad = sorted(p for p in checked if p[0] not in KINDS or p[1] not in KINDS or p[0] == p[1])
    if not checked or bad:
        raise SynthError(f"heldout_kind_pairs: need at least one pair of two different kinds of {', '.join(KINDS)}; "
                         f"bad: {bad or 'none given'}")
    return checked


def generate_tasks(train_tasks: int, heldout_tasks: int, validation_tasks: int = 0, seed: int = 0, canvas: int = 8,
                   min_side: int = 2, max_side: int = 4,
                   heldout_kind_pairs: Any = HELDOUT_KIND_PAIRS) -> list[SynthTask]:
    """Training, validation (training-family programs, evaluated on their tests) and held-out tasks.

    ``heldout_kind_pairs``: the ordered kind pairs only held-out programs use (default
    :data:`HELDOUT_KIND_PAIRS`; e.g. the colour-only pairs of :data:`COLOUR_KIND_PAIRS` for an
    easier held-out family). A pure function of the arguments. Raises SynthError when the program
    space (distinct by behaviour) is too small for the counts asked.
    """
    heldout_kind_pairs = check_kind_pairs(heldout_kind_pairs)
    if not 1 <= min_side <= max_side <= canvas <= 30:
        raise SynthError(f"need 1 <= min_side ({min_side}) <= max_side ({max_side}) <= canvas ({canvas}) <= 30")
    for name, value in (("train_tasks", train_tasks), ("heldout_tasks", heldout_tasks), ("validation_tasks", validation_tasks)):
        if value < 0:
            raise SynthError(f"{name} must be >= 0, got {value}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))
    probes = _probe_grids(max_side)
    identity = fingerprint([], probes)
    seen: set[bytes] = {identity}
    out: list[SynthTask] = []
    trained_pairs = [(a, b) for a in KINDS for b in KINDS if a != b and (a, b) not in heldout_kind_pairs]

    def draw(role: str, count: int, prefix: str) -> None:
        made, misses = 0, 0
        while made < count:
            misses += 1
            if misses > MAX_DRAWS:  # this many draws in a row gave no new program
                raise SynthError(f"only {made} distinct {role} programs found of the {count} asked; ask for fewer tasks "
                                 f"or a larger canvas/max_side")
            if role == "heldout":
                pairs = sorted(heldout_kind_pairs)
                kinds = pairs[int(rng.integers(len(pairs)))]
            elif rng.random() < 0.4:
                kinds = (KINDS[int(rng.integers(len(KINDS)))],)
            else:
                kinds = trained_pairs[int(rng.integers(len(trained_pairs)))]
            program = [_draw_step(kind, rng) for kind in kinds]
            key = fingerprint(program, probes)
            if key in seen:
                continue
            task = _make_task(f"{prefix}{made:04d}", program, rng, canvas, min_side, max_side, role)
            if task is None:
                continue
            seen.add(key)
            out.append(task)
            made, misses = made + 1, 0

    draw("train", train_tasks, f"s{seed}t")
    draw("validation", validation_tasks, f"s{seed}v")
    draw("heldout", heldout_tasks, f"s{seed}h")
    return out


def _tasks_json(tasks: list[ArcTask]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kaggle layout: (challenges without test outputs, solutions)."""
    challenges, solutions = {}, {}
    for task in tasks:
        data = task.to_json()
        solutions[task.task_id] = [t.pop("output") for t in data["test"]]
        challenges[task.task_id] = data
    return challenges, solutions


HELDOUT_DIR = "heldout"
HELDOUT_SUBSET = "heldout"
PROGRAMS_FILE = "programs.json"


def build_arc_synth(out_dir: str | Path, train_tasks: int, heldout_tasks: int, validation_tasks: int = 8, aug: int = 8,
                    seed: int = 0, canvas: int = 8, min_side: int = 2, max_side: int = 4,
                    heldout_kind_pairs: Any = HELDOUT_KIND_PAIRS) -> list[SynthTask]:
    """Write the synthetic dataset (see the module docstring); deterministic. Returns the tasks."""
    if train_tasks < 1:
        raise SynthError(f"train_tasks must be >= 1, got {train_tasks}")
    tasks = generate_tasks(train_tasks, heldout_tasks, validation_tasks, seed, canvas, min_side, max_side, heldout_kind_pairs)
    by_role: dict[str, list[ArcTask]] = {"train": [], "validation": [], "heldout": []}
    for t in tasks:
        by_role[t.role].append(t.task)
    out_dir = Path(out_dir)
    info = {"benchmark": "arc-synth", "train_tasks": train_tasks, "validation_tasks": validation_tasks,
            "heldout_tasks": heldout_tasks, "canvas": canvas, "min_side": min_side, "max_side": max_side,
            "heldout_kind_pairs": sorted(check_kind_pairs(heldout_kind_pairs))}
    # No translational augmentation: on a canvas this small the shifted copies would crowd out the
    # programs a CPU-sized model can learn in minutes (ARC's own builds keep the reference's rule).
    build_arc_dataset(out_dir, by_role["train"], by_role["validation"], aug=aug, seed=seed, build_info=info,
                      translate=False, canvas=canvas)
    heldout = out_dir / HELDOUT_DIR
    heldout.mkdir(parents=True, exist_ok=True)
    challenges, solutions = _tasks_json(by_role["heldout"])
    (heldout / f"{HELDOUT_SUBSET}_challenges.json").write_text(json.dumps(challenges))
    (heldout / f"{HELDOUT_SUBSET}_solutions.json").write_text(json.dumps(solutions))
    programs = {t.task.task_id: {"role": t.role, "program": [list(s) for s in t.program]} for t in tasks}
    (out_dir / PROGRAMS_FILE).write_text(json.dumps(programs, indent=0))
    return tasks


__all__ = ["COLOUR_KIND_PAIRS", "HELDOUT_KIND_PAIRS", "KINDS", "SynthError", "SynthTask", "apply_step", "build_arc_synth", "fingerprint",
           "generate_tasks", "run_program"]
