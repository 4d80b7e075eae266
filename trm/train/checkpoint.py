"""Checkpoints: one folder per step, complete only once its commit marker exists, verified on use.

Layout of ``<run_dir>/checkpoints/step_<N>/``::

    deepspeed/            DeepSpeed's (possibly sharded) model + optimizer files
    trainer_state.pt      step, EMA shadow, puzzle table, data-stream position, dataset dims, best metric
    rank_<r>.pt           per-rank state: RNG states and the ACT carry of the rank's slots
    config.yaml           the resolved config of the run (every key: see ``load_saved_config``)
    COMPLETE              commit marker, written LAST by rank 0 after every rank finished

The marker is JSON: the step and a manifest of every file of the checkpoint with its size and
CRC-32 (zlib; ~3 GB/s, so a 100 MB checkpoint costs ~30 ms to seal and to check).
``verify_checkpoint`` re-reads every file against it and names the first bad one (missing,
truncated, altered); ``find_latest_checkpoint`` returns the newest checkpoint that verifies and
says which newer ones it skipped and why. So a run killed in the middle of a save, a truncated
copy or a flipped bit on disk all resume from (or serve) the newest GOOD checkpoint.

Folders written later by readers (``export/`` by trm.serve, ``universal/`` by a resume at another
world size) are not part of the manifest. A marker without a manifest (trm before verified
checkpoints) is accepted unverified, with a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

COMMIT_MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST_FORMAT = 1
READER_SUBDIRS = ("export", "universal")
"""Sub-folders that readers add to a committed checkpoint; outside the manifest."""
CORRUPT_SUFFIX = ".corrupt"
REPLACED_SUFFIX = ".replaced"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which and why."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint's files do not match its manifest; the message names the file."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step}"


def is_complete(path: str | Path) -> bool:
    """The commit marker exists (the save finished); ``verify_checkpoint`` checks the files."""
    return (Path(path) / COMMIT_MARKER).is_file()


def list_checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoint folders, oldest first (committed ones only by default;
    they are not verified here)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (is_complete(child) or not complete_only):
            found.append((int(match.group(1)), child))
    return sorted(found)


# ------------------------------------------------------------------ writing
def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temp file in the same folder and a rename: a reader (or a crash)
    sees the old file or the new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(obj: Any, path: Path) -> None:
    """torch.save via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def manifest(path: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, crc32}} of every file of the checkpoint folder (not the marker,
    temp files or the readers' sub-folders)."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if rel.parts[0] in READER_SUBDIRS or rel.name == COMMIT_MARKER or ".tmp" in rel.name:
            continue
        files[rel.as_posix()] = {"size": file.stat().st_size, "crc32": _crc32(file)}
    return files


def commit(path: Path, step: int) -> None:
    """Write the commit marker with the manifest (atomically) once every rank is done."""
    marker = {"step": step, "manifest_format": MANIFEST_FORMAT, "files": manifest(path)}
    atomic_write_text(path / COMMIT_MARKER, json.dumps(marker, indent=1) + "\n")


def set_aside(path: Path, suffix: str = CORRUPT_SUFFIX) -> Path:
    """Rename a checkpoint folder to ``step_N<suffix>[-k]`` instead of deleting it: it is no longer
    listed, and whoever wants to inspect it still can. Returns the new name."""
    target = path.with_name(path.name + suffix)
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}{suffix}-{k}")
    os.replace(path, target)
    return target


# ------------------------------------------------------------------ reading
_warned_unverified: set[Path] = set()


def verify_checkpoint(path: str | Path, checksums: bool = True) -> None:
    """Check every file of a committed checkpoint against its manifest (sizes, and CRC-32 with
    ``checksums``). Raises CorruptCheckpointError naming the first bad file, CheckpointError when
    there is no marker."""
    path = Path(path)
    marker_path = path / COMMIT_MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"Checkpoint {path} has no {COMMIT_MARKER} marker: its save did not finish.")
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"Checkpoint {path} is corrupt: its {COMMIT_MARKER} marker cannot be read "
                                     f"({err}).") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CorruptCheckpointError(f"Checkpoint {path} is corrupt: its {COMMIT_MARKER} marker is not a marker "
                                     f"written by trm.")
    files = marker.get("files")
    if files is None:
        if path not in _warned_unverified:
            _warned_unverified.add(path)
            print(f"trm: warning: checkpoint {path} was written before checkpoints carried a manifest; "
                  f"it is used without verifying its files.", file=sys.stderr, flush=True)
        return
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            raise CorruptCheckpointError(f"Checkpoint {path} is corrupt: {rel} is missing.")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CorruptCheckpointError(f"Checkpoint {path} is corrupt: {rel} has {size} bytes, its "
                                         f"{COMMIT_MARKER} marker records {expected['size']} (truncated or replaced).")
        if checksums and _crc32(file) != expected["crc32"]:
            raise CorruptCheckpointError(f"Checkpoint {path} is corrupt: the contents of {rel} changed since it "
                                         f"was saved (CRC-32 {_crc32(file)}, recorded {expected['crc32']}).")


def checkpoint_problem(path: str | Path, checksums: bool = True) -> str | None:
    """Why ``path`` is not a good checkpoint (None: it verifies)."""
    try:
        verify_checkpoint(path, checksums)
    except CheckpointError as err:
        return str(err)
    return None


def _warn_skipped(path: Path, reason: str) -> None:
    print(f"trm: warning: skipping checkpoint {path}: {reason}", file=sys.stderr, flush=True)


def find_latest_checkpoint(run_dir: str | Path, newer_than: int | None = None, checksums: bool = True,
                           on_skip: Callable[[Path, str], None] | None = _warn_skipped) -> Path | None:
    """The newest committed checkpoint of ``run_dir`` that verifies (and is past step
    ``newer_than``), or None. Each newer one that fails verification is reported to
    ``on_skip(path, reason)`` (default: a warning on stderr)."""
    for step, path in reversed(list_checkpoints(run_dir)):
        if newer_than is not None and step <= newer_than:
            return None
        problem = checkpoint_problem(path, checksums)
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(path, problem)
    return None


def load_torch(path: Path) -> Any:
    """torch.load with weights_only (no arbitrary unpickling); clear error when missing/corrupt."""
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} is missing; the checkpoint is incomplete or was moved.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CorruptCheckpointError(f"Checkpoint file {path} is corrupt: it cannot be read "
                                     f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}).") from None


def prune(run_dir: str | Path, keep_last: int, best_step: int | None, newest_step: int) -> list[Path]:
    """Delete complete checkpoints other than the last ``keep_last`` and the best one, and
    incomplete leftovers older than ``newest_step``. Returns what was deleted."""
    complete = list_checkpoints(run_dir)
    keep = {s for s, _ in complete[-keep_last:]} if keep_last > 0 else set()
    keep.add(newest_step)
    if best_step is not None:
        keep.add(best_step)
    deleted = []
    for s, path in list_checkpoints(run_dir, complete_only=False):
        if s in keep or (not is_complete(path) and s >= newest_step):
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


# ------------------------------------------------------------------ resuming
FIXED_ON_RESUME = (
    "trainer", "model.*", "train.global_batch_size", "train.optimizer", "train.ema", "train.shard_puzzle_table",
    "deepspeed.zero_stage", "data.name", "data.rag",
)
"""Config keys a resumed run must share with its checkpoint (``model.*``: every model key except
``CHANGEABLE_MODEL_KEYS``); the dataset's shape (seq_len, vocab, puzzle ids) is checked too, when
the checkpoint is loaded. Everything else may change on resume (README: Modes)."""
CHANGEABLE_MODEL_KEYS = ("model.forward_dtype",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def check_resume_config(cfg: Any, path: str | Path) -> None:
    """Raise CheckpointError (one line: each key, the checkpoint's value, the new one) when ``cfg``
    changes a setting that the run saved at ``path`` cannot continue with."""
    from trm.config import ConfigError, load_saved_config, to_dict

    path = Path(path)
    try:
        saved = _flatten(to_dict(load_saved_config(path / "config.yaml")))
    except ConfigError as err:
        raise CheckpointError(f"Checkpoint {path} cannot be resumed: {err}") from None
    new = _flatten(to_dict(cfg))
    changed = []
    for key in sorted(set(saved) | set(new)):
        fixed = any(key == f or key.startswith(f"{f[:-1] if f.endswith('*') else f + '.'}") for f in FIXED_ON_RESUME)
        if fixed and key not in CHANGEABLE_MODEL_KEYS and saved.get(key) != new.get(key):
            changed.append(f"{key} (checkpoint: {saved.get(key)!r}, now: {new.get(key)!r})")
    if changed:
        raise CheckpointError(
            f"Cannot resume {path} with changed {'; '.join(changed)}: the run cannot continue with "
            f"{'this setting' if len(changed) == 1 else 'these settings'}. Resume with the checkpoint's values, "
            f"or start a new run in another run_dir (mode=new)."
        )
