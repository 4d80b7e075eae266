"""Which model the service answers with, and following a run as it trains.

The service is pointed at one of:

- an EXPORT folder (``model.safetensors`` + ``config.yaml`` + ``export.json``): served as is;
- a CHECKPOINT folder (``step_N`` with its ``COMPLETE`` marker): exported once, then served;
- a RUN folder (``checkpoints/``): its newest checkpoint that verifies (``verify_checkpoint``: every
  file matches the manifest in its COMPLETE marker) is exported and served, and a watcher thread
  polls for newer ones. A corrupt checkpoint is skipped, once, with a line saying which file is bad;
  an older good one is served meanwhile. Until the run has a good checkpoint, the service answers 503.

Exports go to ``<checkpoint>/export/`` (or a private temporary folder when the checkpoint is not
writable) and are made by ``python -m trm.export`` in a CHILD process, so the service process
itself never unpickles anything; it loads safetensors only. A newer model is loaded completely
beside the current one and then swapped in with one reference assignment: a batch already
running keeps the model it started with, the next batch takes the new one, nothing fails.

Test: ``pytest tests/test_serve.py -k swap``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from trm.export import is_export_dir
from trm.serve import ServeError
from trm.serve.solver import ServedModel
from trm.train.checkpoint import COMMIT_MARKER, checkpoint_problem, is_complete, list_checkpoints

EXPORT_SUBDIR = "export"
MAX_EXPORT_ATTEMPTS = 3


def source_kind(path: Path) -> str:
    """export | checkpoint | run, or ServeError."""
    if is_export_dir(path):
        return "export"
    if is_complete(path):
        return "checkpoint"
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        return "run"
    raise ServeError(f"{path} is neither an export folder (model.safetensors + config.yaml + export.json), a complete "
                     f"checkpoint (<run_dir>/checkpoints/step_N with COMPLETE), nor a run folder (with checkpoints/).")


def _log(message: str) -> None:
    print(f"trm.serve: {message}", file=sys.stderr, flush=True)


class ModelSlot:
    """Holds the current :class:`ServedModel` (``current``; None until one is loaded)."""

    def __init__(self, source: str | Path, device: torch.device, poll_seconds: float = 10.0,
                 export_timeout: float = 600.0, kind: str | None = None):
        self.source = Path(source)
        self.kind = kind or source_kind(self.source)
        self.device = device
        self.poll_seconds = poll_seconds
        self.export_timeout = export_timeout
        self.current: ServedModel | None = None
        self.swaps = 0
        self._failures: dict[Path, int] = {}
        self._corrupt: dict[Path, int] = {}  # checkpoint -> mtime_ns of the marker it failed verification with
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache = None

    # ------------------------------------------------------------------ load
    def _exported(self, checkpoint: Path) -> Path:
        """The export folder of a checkpoint, made in a child process when missing."""
        target = checkpoint / EXPORT_SUBDIR
        if is_export_dir(target):
            return target
        if not os.access(checkpoint, os.W_OK):
            if self._cache is None:
                self._cache = tempfile.TemporaryDirectory(prefix="trm-serve-")
            target = Path(self._cache.name) / checkpoint.name
            if is_export_dir(target):
                return target
        _log(f"exporting {checkpoint} to {target}")
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "trm.export", str(checkpoint), "--out", str(target)],
                              capture_output=True, text=True, timeout=self.export_timeout, env=env)
        if proc.returncode != 0 or not is_export_dir(target):
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise ServeError(f"exporting {checkpoint} failed: {lines[-1] if lines else proc.returncode}")
        return target

    def _load_checkpoint(self, checkpoint: Path) -> ServedModel:
        return ServedModel(self._exported(checkpoint), self.device)

    def load_initial(self) -> None:
        """Load what the source names now (ServeError when an export/checkpoint source fails)."""
        if self.kind == "export":
            self.current = ServedModel(self.source, self.device)
        elif self.kind == "checkpoint":
            self.current = self._load_checkpoint(self.source)
        else:
            self.poll_once()
            if self.current is None:
                what = "no checkpoint that verifies" if self._corrupt else "no complete checkpoint yet"
                _log(f"{self.source} has {what}; answering 503 until one appears")

    # ---------------------------------------------------------------- follow
    def _newest_good(self, newer_than: int | None) -> Path | None:
        """The run's newest checkpoint past ``newer_than`` that verifies. A corrupt one is reported
        once and not re-read until its marker changes."""
        for step, path in reversed(list_checkpoints(self.source)):
            if newer_than is not None and step <= newer_than:
                return None
            try:
                marker_mtime = (path / COMMIT_MARKER).stat().st_mtime_ns
            except OSError:  # pruned meanwhile
                continue
            if self._corrupt.get(path) == marker_mtime:
                continue
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            self._corrupt[path] = marker_mtime
            _log(f"skipping {path}: {problem}")
        return None

    def poll_once(self) -> bool:
        """Swap in the run's newest good checkpoint if it is newer than the served one."""
        current = self.current
        latest = self._newest_good(current.step if current is not None else None)
        if latest is None or self._failures.get(latest, 0) >= MAX_EXPORT_ATTEMPTS:
            return False
        try:
            fresh = self._load_checkpoint(latest)
        except Exception as err:  # a checkpoint pruned mid-export, a full disk, ...: keep serving the old one
            self._failures[latest] = self._failures.get(latest, 0) + 1
            _log(f"could not load {latest} (attempt {self._failures[latest]}/{MAX_EXPORT_ATTEMPTS}): {err}")
            return False
        if current is not None and (fresh.seq_len, fresh.vocab_size) != (current.seq_len, current.vocab_size):
            self._failures[latest] = MAX_EXPORT_ATTEMPTS
            _log(f"{latest} has another shape (seq_len {fresh.seq_len}, vocab {fresh.vocab_size}); not swapping it in")
            return False
        self.current = fresh  # one reference assignment: the swap is atomic for every reader
        self.swaps += current is not None
        _log(f"serving step {fresh.step} from {fresh.path}")
        return True

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception as err:  # the watcher must outlive any single bad poll
                _log(f"checkpoint poll failed: {err}")

    def start(self) -> None:
        if self.kind == "run" and self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="trm-serve-follow", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._cache is not None:
            self._cache.cleanup()

    def wait_for_step(self, step: int, timeout: float) -> bool:
        """Block until a model of at least ``step`` is served (tests, scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.current is not None and self.current.step >= step:
                return True
            time.sleep(0.05)
        return False
