"""The reference implementation's dataset directory format: read, write, validate.

Layout (one directory per dataset)::

    <root>/identifiers.json            list of puzzle-identifier names; index 0 is "<blank>"
    <root>/<split>/dataset.json        DatasetMetadata (split = train | test)
    <root>/<split>/<set>__inputs.npy              [num_examples, seq_len] token ids
    <root>/<split>/<set>__labels.npy              [num_examples, seq_len] token ids
    <root>/<split>/<set>__puzzle_identifiers.npy  [num_puzzles] int32, identifier of each puzzle
    <root>/<split>/<set>__puzzle_indices.npy      [num_puzzles + 1] int32 CSR offsets puzzle -> examples
    <root>/<split>/<set>__group_indices.npy       [num_groups + 1] int32 CSR offsets group -> puzzles

Puzzle ``p`` owns examples ``puzzle_indices[p] : puzzle_indices[p + 1]``; group ``g`` owns
puzzles ``group_indices[g] : group_indices[g + 1]`` (an original puzzle and its augmentations).
Both offset arrays start at 0, increase strictly (nothing is empty) and end at the length of the
array they index. Tokens are stored as uint8 when ``vocab_size <= 256`` (else int32); any integer
dtype is accepted when reading. ``inputs``/``labels`` are memory-mapped, offsets are loaded.

Every problem with a directory (missing path, unreadable file, inconsistent shapes or ids)
raises :class:`DatasetError` with the offending path and what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
"""The per-set arrays, each stored as ``{set}__{field}.npy``."""

TOKEN_FIELDS = ("inputs", "labels")
INDEX_FIELDS = ("puzzle_identifiers", "puzzle_indices", "group_indices")
BUILD_COMMANDS: tuple[tuple[str, str], ...] = (
    # (part of a dataset folder's name, the command that builds it; the recipes' folders in configs/)
    ("sudoku-extreme", "python -m trm.data import-sudoku-csv --train-csv train.csv --test-csv test.csv --out {path} "
                       "--subsample 1000 --aug 1000"),
    ("maze", "python -m trm.data build maze --out {path} --train-mazes 1000 --test-mazes 1000 --aug --min-path-length 110"),
    ("arc2", "python -m trm.data build arc2 --out {path} --aug 1000"),
    ("arc", "python -m trm.data build arc1 --out {path} --aug 1000"),
    ("sudoku", "python -m trm.data build sudoku --out {path} --train-puzzles 1000 --aug 1000 --test-puzzles 1000"),
)
"""Sudoku-Extreme is imported from its CSVs (source,question,answer,rating), not generated."""


def build_hint(root: str | Path) -> str:
    """How to build the dataset folder ``root``: the builder its name points to (the recipes'
    folders: ``sudoku-extreme*`` -> import-sudoku-csv, ``maze*`` -> build maze, ``arc2*`` / ``arc*``
    -> build arc2 / arc1, ``sudoku*`` -> build sudoku), else the list of builders."""
    name = Path(root).name.lower()
    for part, command in BUILD_COMMANDS:
        if part in name:
            return f"build it with `{command.format(path=root)}` (see `python -m trm.data --help`)"
    return f"build one with `python -m trm.data build sudoku|maze|arc1|arc2 --out {root} ...` (see `python -m trm.data --help`)"


class DatasetError(ValueError):
    """A dataset directory is missing, unreadable or inconsistent; the message says where and why."""


@dataclass
class DatasetMetadata:
    """``dataset.json`` of one split (field order and names as in the reference).

    ``total_groups`` must equal the number of groups summed over the sets. ``total_puzzles`` and
    ``mean_puzzle_examples`` are informational: the reference's Sudoku/Maze builders write the
    group count as ``total_puzzles``, so they are not checked against the arrays.
    """

    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int
    sets: list[str]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "dataset.json") -> DatasetMetadata:
        """Validated metadata from a parsed ``dataset.json`` (extra keys are ignored)."""
        if not isinstance(data, Mapping):
            raise DatasetError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise DatasetError(f"{source}: missing key(s) {', '.join(missing)}")

        def integer(key: str, minimum: int) -> int:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DatasetError(f"{source}: '{key}' must be an integer >= {minimum}, got {value!r}")
            return value

        ignore = data["ignore_label_id"]
        if ignore is not None:
            ignore = integer("ignore_label_id", 0)
        mean = data["mean_puzzle_examples"]
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean) or mean < 0:
            raise DatasetError(f"{source}: 'mean_puzzle_examples' must be a non-negative number, got {mean!r}")
        sets = data["sets"]
        if not isinstance(sets, list) or not sets or not all(isinstance(s, str) and s for s in sets):
            raise DatasetError(f"{source}: 'sets' must be a non-empty list of set names, got {sets!r}")
        if len(set(sets)) != len(sets):
            raise DatasetError(f"{source}: 'sets' has duplicate names: {sets!r}")
        return cls(
            pad_id=integer("pad_id", 0),
            ignore_label_id=ignore,
            blank_identifier_id=integer("blank_identifier_id", 0),
            vocab_size=integer("vocab_size", 1),
            seq_len=integer("seq_len", 1),
            num_puzzle_identifiers=integer("num_puzzle_identifiers", 1),
            total_groups=integer("total_groups", 0),
            mean_puzzle_examples=float(mean),
            total_puzzles=integer("total_puzzles", 0),
            sets=list(sets),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> DatasetMetadata:
        """Read and validate ``dataset.json``."""
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"Missing metadata file {path}; {build_hint(path.parent.parent)}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def to_json(self, path: str | Path) -> None:
        """Write ``dataset.json`` (deterministic bytes for equal metadata)."""
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def from_arrays(
        cls,
        arrays_by_set: Mapping[str, Mapping[str, np.ndarray]],
        *,
        vocab_size: int,
        seq_len: int,
        num_puzzle_identifiers: int,
        pad_id: int = 0,
        ignore_label_id: int | None = 0,
        blank_identifier_id: int = 0,
    ) -> DatasetMetadata:
        """Metadata whose counts (groups, puzzles, mean examples per puzzle, sets) match the arrays."""
        num_groups = sum(len(a["group_indices"]) - 1 for a in arrays_by_set.values())
        num_puzzles = sum(len(a["puzzle_identifiers"]) for a in arrays_by_set.values())
        num_examples = sum(len(a["inputs"]) for a in arrays_by_set.values())
        return cls(
            pad_id=pad_id,
            ignore_label_id=ignore_label_id,
            blank_identifier_id=blank_identifier_id,
            vocab_size=vocab_size,
            seq_len=seq_len,
            num_puzzle_identifiers=num_puzzle_identifiers,
            total_groups=num_groups,
            mean_puzzle_examples=num_examples / num_puzzles if num_puzzles else 0.0,
            total_puzzles=num_puzzles,
            sets=list(arrays_by_set),
        )


@dataclass
class SplitData:
    """One split with its sets concatenated (offsets shifted so they index the concatenation).

    Shapes: ``inputs``/``labels`` [num_examples, seq_len]; ``puzzle_identifiers`` [num_puzzles];
    ``puzzle_indices`` [num_puzzles + 1]; ``group_indices`` [num_groups + 1].
    ``set_example_ranges[name] = (start, stop)`` is the example range of each set.
    With a single set, ``inputs``/``labels`` stay memory-mapped; several sets are concatenated in memory.
    """

    metadata: DatasetMetadata
    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    puzzle_indices: np.ndarray
    group_indices: np.ndarray
    set_example_ranges: dict[str, tuple[int, int]]

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_puzzles(self) -> int:
        return int(self.puzzle_identifiers.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_indices.shape[0] - 1)

    def example_puzzle(self, example_idx: np.ndarray) -> np.ndarray:
        """Puzzle index of each example: the ``p`` with ``puzzle_indices[p] <= i < puzzle_indices[p + 1]``."""
        return np.searchsorted(self.puzzle_indices, np.asarray(example_idx), side="right") - 1

    def example_puzzle_identifier(self, example_idx: np.ndarray) -> np.ndarray:
        """Puzzle identifier (embedding row) of each example index."""
        return self.puzzle_identifiers[self.example_puzzle(example_idx)]


def split_file(root: str | Path, split: str, set_name: str, field: str) -> Path:
    """Path of one array file: ``<root>/<split>/<set>__<field>.npy``."""
    return Path(root) / split / f"{set_name}__{field}.npy"


def _load_array(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"Missing file {path}; the dataset is incomplete, rebuild it ({build_hint(path.parent.parent)})")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable .npy file, it may be truncated or corrupt ({err})") from None
    if not isinstance(array, np.ndarray):
        raise DatasetError(f"{path}: expected a single array, found {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{path}: expected an integer array, found dtype {array.dtype}")
    return array


def _check_offsets(offsets: np.ndarray, target_len: int, path: Path, owner: str, item: str) -> None:
    """``offsets`` must be 1-D, start at 0, increase strictly and end at ``target_len``."""
    if offsets.ndim != 1 or len(offsets) < 1:
        raise DatasetError(f"{path}: expected a 1-D array of CSR offsets, got shape {offsets.shape}")
    if offsets[0] != 0:
        raise DatasetError(f"{path}: CSR offsets must start at 0, got {offsets[0]}")
    steps = np.diff(offsets.astype(np.int64))
    if len(steps) and steps.min() < 0:
        bad = int(np.argmax(steps < 0))
        raise DatasetError(f"{path}: CSR offsets are not monotonic: entry {bad + 1} ({offsets[bad + 1]}) < entry {bad} ({offsets[bad]})")
    if len(steps) and steps.min() == 0:
        bad = int(np.argmax(steps == 0))
        raise DatasetError(f"{path}: {owner} {bad} is empty (offsets {bad} and {bad + 1} are both {offsets[bad]}); every {owner} needs at least one {item}")
    if offsets[-1] != target_len:
        raise DatasetError(f"{path}: last CSR offset is {offsets[-1]} but there are {target_len} {item}s")


def _check_token_range(array: np.ndarray, vocab_size: int, path: Path) -> None:
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DatasetError(f"{path}: token id {bad} is outside the vocabulary [0, {vocab_size}) of dataset.json")


def validate_set(
    root: str | Path, split: str, set_name: str, metadata: DatasetMetadata, arrays: Mapping[str, np.ndarray], check_tokens: bool = True
) -> None:
    """Check one set's arrays against each other and the metadata; raise DatasetError naming the file.

    ``check_tokens`` also scans inputs/labels for ids outside ``[0, vocab_size)`` (a full read).
    """

    def path_of(field: str) -> Path:
        return split_file(root, split, set_name, field)

    inputs, labels = arrays["inputs"], arrays["labels"]
    identifiers, puzzle_indices, group_indices = (arrays[f] for f in INDEX_FIELDS)
    if inputs.ndim != 2 or inputs.shape[1] != metadata.seq_len:
        raise DatasetError(f"{path_of('inputs')}: expected shape [num_examples, seq_len={metadata.seq_len}], got {list(inputs.shape)}")
    if labels.shape != inputs.shape:
        raise DatasetError(f"{path_of('labels')}: shape {list(labels.shape)} differs from inputs {list(inputs.shape)}")
    if identifiers.ndim != 1:
        raise DatasetError(f"{path_of('puzzle_identifiers')}: expected a 1-D array, got shape {identifiers.shape}")
    _check_offsets(puzzle_indices, len(inputs), path_of("puzzle_indices"), "puzzle", "example")
    if len(puzzle_indices) != len(identifiers) + 1:
        raise DatasetError(
            f"{path_of('puzzle_indices')}: has {len(puzzle_indices)} offsets but there are {len(identifiers)} puzzle identifiers (expected one more offset than puzzles)"
        )
    _check_offsets(group_indices, len(identifiers), path_of("group_indices"), "group", "puzzle")
    if len(identifiers) and (identifiers.min() < 0 or identifiers.max() >= metadata.num_puzzle_identifiers):
        bad = int(identifiers.min()) if identifiers.min() < 0 else int(identifiers.max())
        raise DatasetError(f"{path_of('puzzle_identifiers')}: identifier {bad} is outside [0, num_puzzle_identifiers={metadata.num_puzzle_identifiers})")
    if check_tokens:
        _check_token_range(inputs, metadata.vocab_size, path_of("inputs"))
        _check_token_range(labels, metadata.vocab_size, path_of("labels"))


def _check_total_groups(root: str | Path, split: str, metadata: DatasetMetadata, num_groups: int) -> None:
    if metadata.total_groups != num_groups:
        raise DatasetError(f"{Path(root) / split / 'dataset.json'}: total_groups is {metadata.total_groups} but the group_indices files hold {num_groups} groups")


def token_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype of token ids: uint8 when every id fits in a byte, else int32."""
    return np.dtype(np.uint8) if vocab_size <= 256 else np.dtype(np.int32)


def write_split(root: str | Path, split: str, metadata: DatasetMetadata, arrays_by_set: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Validate and write one split; ``dataset.json`` is written last, so its presence marks a complete split.

    ``arrays_by_set[set_name][field]`` for every field in :data:`FIELDS`; ``metadata.sets`` must list
    the same set names in the same order (use :meth:`DatasetMetadata.from_arrays`).
    """
    if list(arrays_by_set) != metadata.sets:
        raise DatasetError(f"write_split({split!r}): metadata.sets {metadata.sets} != sets given {list(arrays_by_set)}")
    prepared: dict[str, dict[str, np.ndarray]] = {}
    for set_name, arrays in arrays_by_set.items():
        missing = [f for f in FIELDS if f not in arrays]
        if missing:
            raise DatasetError(f"write_split({split!r}): set {set_name!r} lacks array(s) {', '.join(missing)}")
        converted = {f: np.asarray(arrays[f]) for f in FIELDS}
        for field, array in converted.items():
            if not np.issubdtype(array.dtype, np.integer):
                raise DatasetError(f"{split_file(root, split, set_name, field)}: expected integers, got dtype {array.dtype}")
        validate_set(root, split, set_name, metadata, converted)
        dtype = token_dtype(metadata.vocab_size)
        prepared[set_name] = {f: converted[f].astype(dtype if f in TOKEN_FIELDS else np.int32, copy=False) for f in FIELDS}
    _check_total_groups(root, split, metadata, sum(len(a["group_indices"]) - 1 for a in prepared.values()))

    split_dir = Path(root) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for set_name, arrays in prepared.items():
        for field, array in arrays.items():
            np.save(split_file(root, split, set_name, field), np.ascontiguousarray(array))
    metadata.to_json(split_dir / "dataset.json")


def write_identifiers(root: str | Path, names: list[str]) -> None:
    """Write ``identifiers.json``: the name of each puzzle identifier; ``names[0]`` must be "<blank>"."""
    if not names or names[0] != "<blank>":
        raise DatasetError(f"identifiers.json: the first identifier must be '<blank>', got {names[:1]}")
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "identifiers.json").write_text(json.dumps(list(names)))


def load_identifiers(root: str | Path) -> list[str]:
    """Read ``identifiers.json`` (a JSON list of strings)."""
    path = Path(root) / "identifiers.json"
    if not path.is_file():
        raise DatasetError(f"Missing file {path}; {build_hint(root)}")
    try:
        names = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path}: expected a JSON list of identifier names")
    return names


def load_split(root: str | Path, split: str, check_tokens: bool = True) -> SplitData:
    """Load and validate ``<root>/<split>``; sets are concatenated in ``metadata.sets`` order.

    ``check_tokens`` scans inputs/labels once for ids outside ``[0, vocab_size)`` (a full read of
    the memory map; switch off only for very large, already-validated datasets).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Dataset directory {root} does not exist; {build_hint(root)}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"Split directory {split_dir} does not exist (dataset at {root} has no '{split}' split); {build_hint(root)}")
    metadata = DatasetMetadata.from_json(split_dir / "dataset.json")

    per_set = []
    for set_name in metadata.sets:
        arrays = {f: _load_array(split_file(root, split, set_name, f), mmap=f in TOKEN_FIELDS) for f in FIELDS}
        validate_set(root, split, set_name, metadata, arrays, check_tokens)
        per_set.append((set_name, arrays))
    _check_total_groups(root, split, metadata, sum(len(a["group_indices"]) - 1 for _, a in per_set))

    if len(per_set) == 1:
        (set_name, arrays), = per_set
        return SplitData(
            metadata=metadata,
            inputs=arrays["inputs"],
            labels=arrays["labels"],
            puzzle_identifiers=arrays["puzzle_identifiers"].astype(np.int32, copy=False),
            puzzle_indices=arrays["puzzle_indices"].astype(np.int64),
            group_indices=arrays["group_indices"].astype(np.int64),
            set_example_ranges={set_name: (0, len(arrays["inputs"]))},
        )
    example_offset = puzzle_offset = 0
    puzzle_parts, group_parts, ranges = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], {}
    for set_name, arrays in per_set:
        puzzle_parts.append(arrays["puzzle_indices"][1:].astype(np.int64) + example_offset)
        group_parts.append(arrays["group_indices"][1:].astype(np.int64) + puzzle_offset)
        ranges[set_name] = (example_offset, example_offset + len(arrays["inputs"]))
        example_offset += len(arrays["inputs"])
        puzzle_offset += len(arrays["puzzle_identifiers"])
    return SplitData(
        metadata=metadata,
        inputs=np.concatenate([a["inputs"] for _, a in per_set]),
        labels=np.concatenate([a["labels"] for _, a in per_set]),
        puzzle_identifiers=np.concatenate([a["puzzle_identifiers"] for _, a in per_set]).astype(np.int32, copy=False),
        puzzle_indices=np.concatenate(puzzle_parts),
        group_indices=np.concatenate(group_parts),
        set_example_ranges=ranges,
    )


def describe_split(split: SplitData) -> str:
    """A few lines with the split's counts and token geometry."""
    m = split.metadata
    sets = ", ".join(f"{name} [{a}:{b})" for name, (a, b) in split.set_example_ranges.items())
    return "\n".join([
        f"  examples {split.num_examples}, puzzles {split.num_puzzles}, groups {split.num_groups}, sets: {sets}",
        f"  seq_len {m.seq_len}, vocab_size {m.vocab_size}, pad_id {m.pad_id}, ignore_label_id {m.ignore_label_id}, "
        f"puzzle identifiers {m.num_puzzle_identifiers} (blank {m.blank_identifier_id})",
        f"  token dtype {split.inputs.dtype}",
    ])


def summarize_dataset(root: str | Path, details: Callable[[SplitData], str] | None = None) -> str:
    """Summary of every split under ``root`` (each subdirectory with a ``dataset.json``).

    ``details(split)`` may add dataset-specific lines per split (e.g. Sudoku's blank histogram).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Dataset directory {root} does not exist; {build_hint(root)}")
    split_names = sorted(p.name for p in root.iterdir() if (p / "dataset.json").is_file())
    if not split_names:
        raise DatasetError(f"{root} holds no split (no */dataset.json); {build_hint(root)}")
    parts = [f"dataset {root}"]
    for split_name in split_names:
        split = load_split(root, split_name)
        parts += [f"{split_name}:", describe_split(split)]
        extra = details(split) if details else ""
        if extra:
            parts.append(extra)
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Grid symmetries shared by the Maze and ARC builders and the ARC evaluator.

DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)
"""``DIHEDRAL_INVERSE[t]`` undoes transform ``t`` of :func:`dihedral` (the reference's numbering)."""


def dihedral(grid: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 symmetries of the square applied to the last two axes of ``grid`` (a view).

    0 identity, 1 rot90 (counter-clockwise, as ``np.rot90``), 2 rot180, 3 rot270, 4 left-right
    flip, 5 up-down flip, 6 transpose, 7 anti-transpose -- the reference's numbering, so transform
    ids stored in its puzzle identifiers mean the same here. Non-square grids are fine (1, 3, 6, 7
    swap height and width).
    """
    axes = (-2, -1)
    if transform == 0:
        return grid
    if transform in (1, 2, 3):
        return np.rot90(grid, k=transform, axes=axes)
    if transform == 4:
        return np.flip(grid, axis=-1)
    if transform == 5:
        return np.flip(grid, axis=-2)
    if transform == 6:
        return np.swapaxes(grid, -2, -1)
    if transform == 7:
        return np.flip(np.rot90(grid, k=1, axes=axes), axis=-1)
    raise ValueError(f"dihedral transform id must be 0-7, got {transform!r}")
