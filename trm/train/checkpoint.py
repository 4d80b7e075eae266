"""Checkpoints: one folder per step, complete only once its commit marker exists.

Layout of ``<run_dir>/checkpoints/step_<N>/``::

    deepspeed/            DeepSpeed's (possibly sharded) model + optimizer files
    trainer_state.pt      step, EMA shadow, puzzle table, data-stream position, best metric
    rank_<r>.pt           per-rank state: RNG states and the ACT carry of the rank's slots
    config.yaml           the resolved config of the run
    COMPLETE              commit marker, written LAST by rank 0 after every rank finished

``find_latest_checkpoint(run_dir)`` only ever returns folders with the marker, so a run
killed in the middle of a save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

COMMIT_MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which and why."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMMIT_MARKER).is_file()


def list_checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (is_complete(child) or not complete_only):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest COMPLETE checkpoint folder of ``run_dir``, or None when there is none."""
    complete = list_checkpoints(run_dir)
    return complete[-1][1] if complete else None


def commit(path: Path, step: int) -> None:
    """Write the commit marker (atomically: temp file + rename) once every rank is done."""
    tmp = path / (COMMIT_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step}) + "\n")
    os.replace(tmp, path / COMMIT_MARKER)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch(path: Path) -> Any:
    """torch.load with weights_only (no arbitrary unpickling); clear error when missing/corrupt."""
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} is missing; the checkpoint is incomplete or was moved.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"Checkpoint file {path} cannot be read ({type(err).__name__}: {err}).") from None


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
