"""Evidence of what ran: a count of every kernel launch, and of every call a backend's front door
handed to the PyTorch reference instead (with what the kernel did not take). Tests assert on it
("the kernel ran"; "this input fell back"), and ``auto``'s run-time verification uses it to tell a
kernel checked from a reference compared with itself.

Keys: ``launches[(backend, kernel)]`` with backend ``cpu | cuda | triton`` and kernel
``<csrc file>/<kernel>`` (``rms_norm/rms_norm_fwd`` for ``torch.ops.trm.rms_norm_fwd``,
``rms_norm/rms_norm_fwd_kernel`` for the Triton kernel of ``csrc/triton/rms_norm.py``);
``fallbacks[(backend, op, inputs)]`` with ``inputs`` a short description of what the front door
was given (dtypes, shapes, devices). A fallback is also logged once per key at DEBUG on the
``trm.ops`` logger. Nothing is counted while ``torch.compile`` traces (the trace runs once, its
graph many times).

    with counters.record() as seen:
        y = trm.ops.rms_norm(x, 1e-5)
    assert seen.ran("cpu", "rms_norm"), seen
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Iterator

import torch

log = logging.getLogger("trm.ops")

launches: Counter = Counter()
fallbacks: Counter = Counter()


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def launched(backend: str, kernel: str) -> None:
    """Count one launch of ``kernel`` (``<csrc file>/<name>``) by ``backend``."""
    if not _tracing():
        launches[(backend, kernel)] += 1


def describe_inputs(*inputs) -> str:
    """``float64[3, 4] cpu, int64[3] cpu``: what a front door was given (lists: their first tensor)."""
    parts = []
    for item in inputs:
        if isinstance(item, (list, tuple)):
            item = item[0] if item else None
            if item is None:
                parts.append("[]")
                continue
        if isinstance(item, torch.Tensor):
            layout = "" if item.is_contiguous() or item.dim() < 2 else " strided"
            parts.append(f"{str(item.dtype).removeprefix('torch.')}{list(item.shape)} {item.device.type}{layout}")
    return ", ".join(parts)


def fell_back(backend: str, op: str, *inputs) -> None:
    """Count one call of ``backend``'s ``op`` that ran the reference for ``inputs``."""
    if _tracing():
        return
    key = (backend, op, describe_inputs(*inputs))
    if key not in fallbacks:
        log.debug("trm.ops: the %s %s kernel does not take %s; the PyTorch reference runs", backend, op, key[2])
    fallbacks[key] += 1


class Record:
    """What ran between entering and leaving ``record()``."""

    def __init__(self):
        self._launches0, self._fallbacks0 = Counter(launches), Counter(fallbacks)
        self.launches: Counter = Counter()
        self.fallbacks: Counter = Counter()

    def _close(self) -> None:
        self.launches = launches - self._launches0
        self.fallbacks = fallbacks - self._fallbacks0

    def kernels(self, backend: str | None = None) -> set[str]:
        """The kernels launched (by ``backend``)."""
        return {k for (b, k) in self.launches if backend in (None, b)}

    def ran(self, backend: str, file: str, kernel: str | None = None) -> bool:
        """Whether ``backend`` launched a kernel of ``csrc/.../<file>`` (that ``kernel``, if given)."""
        return any(b == backend and k.split("/")[0] == file and kernel in (None, k.split("/")[1])
                   for (b, k) in self.launches)

    def fell_back(self, backend: str | None = None, op: str | None = None) -> list[str]:
        """The inputs (descriptions) that ``backend``'s ``op`` handed to the reference."""
        return [inputs for (b, o, inputs) in self.fallbacks if backend in (None, b) and op in (None, o)]

    def __repr__(self) -> str:
        return f"Record(launches={dict(self.launches)}, fallbacks={dict(self.fallbacks)})"


@contextlib.contextmanager
def record() -> Iterator[Record]:
    """Collect the launches and fallbacks of the block (this process, every thread)."""
    seen = Record()
    try:
        yield seen
    finally:
        seen._close()
