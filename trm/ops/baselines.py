"""The benchmark baselines ``kernels=auto`` rests on: a kernel runs under ``auto`` on a device
class only when that class's committed baseline shows it faster than the PyTorch reference there
(and ``trm.ops.verify`` accepts it on that device; ``trm.ops.dispatch`` checks both).

Where the baselines are: the directory ``$TRM_KERNEL_BASELINES`` when set, else
``benchmarks/baselines`` of the repository checkout ``trm`` is imported from (what
``pip install -e .`` and a run from the checkout use; ``pytest benchmarks`` writes them there).
An install without the checkout (a wheel) has no such directory: ``auto`` then runs the reference
ops and ``describe()`` says so; it never fails for it.

Which file (the key ``benchmarks/bench_util.py`` names its baseline by, :func:`device_key`):

    GPU  the card's name, e.g. ``nvidia-h200.json``
    CPU  ``cpu-<model>-<ISA>-<threads>t.json``, e.g. ``cpu-intel-r-xeon-r-processor-avx512-1t.json``

A CPU process running ``N`` intra-op threads (``torch.get_num_threads()`` when the op runs) uses
the ``Nt`` file when it exists, else the file of the same CPU model and ISA with the nearest
recorded thread count (ties: the fewer threads). The benchmarks record one thread by default
(both sides slowed alike by a shared machine's load); a fused kernel saves passes over memory
and its launches split across threads as the reference's do, so its one-thread advantage is
the best evidence for N threads short of a measurement at N (``TRM_BENCH_THREADS=N
TRM_BENCH_UPDATE=1 pytest benchmarks`` records one; it is then used).

Which entries count for (backend, op): every entry named ``<op>/<mode>/<backend>/<dtype>/<shape>``
with mode ``fwd`` (the no-grad cycles), ``fwd+bwd`` (the cycle with gradient) or ``step`` (the
optimizer), at every shape and dtype the file holds (the benchmarks run the shapes the recipes
use). The kernel is backed when there is at least one such entry and EVERY one shows a speedup
above :data:`MIN_SPEEDUP`; one slower case keeps the reference. Other entries (the training
step, ``fwd+bwd-vs-compile``) do not count.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_DIR = "TRM_KERNEL_BASELINES"
REPO_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines"
COUNTED_MODES = ("fwd", "fwd+bwd", "step")
MIN_SPEEDUP = 1.0     # a counted entry must be strictly faster than the reference


@dataclass(frozen=True)
class Evidence:
    """Whether a baseline backs (backend, op) on a device, and the sentence that says why."""
    backed: bool
    why: str


_evidence: dict[tuple, Evidence] = {}
_files: dict[str, dict] = {}


def normalise(name: str) -> str:
    """A device name as a file name: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _cpu_prefix() -> str:
    return normalise(f"cpu-{cpu_model()}-{torch.backends.cpu.get_cpu_capability()}")


@functools.cache
def _gpu_name(index: int) -> str:
    return normalise(torch.cuda.get_device_name(index))


def device_key(device: torch.device | str, threads: int | None = None) -> str:
    """The baseline key of ``device``: the GPU's name, or ``cpu-<model>-<ISA>-<threads>t`` (``threads``:
    default this process's ``torch.get_num_threads()``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _gpu_name(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return f"{_cpu_prefix()}-{threads or torch.get_num_threads()}t"
    return normalise(device.type)


def directory() -> tuple[Path | None, str]:
    """``(the baselines directory, "")``, or ``(None, why there is none)``."""
    override = os.environ.get(ENV_DIR)
    if override:
        path = Path(override)
        return (path, "") if path.is_dir() else (None, f"{ENV_DIR}={override} is not a directory")
    if REPO_DIR.is_dir():
        return REPO_DIR, ""
    return None, (f"no baseline directory ({REPO_DIR} does not exist: trm is not run from its repository "
                  f"checkout); set {ENV_DIR}=<a checkout's benchmarks/baselines>")


def locate(device: torch.device | str) -> tuple[Path | None, str]:
    """``(this device's baseline file, how it was chosen)`` or ``(None, why there is none, what to do)``."""
    device = torch.device(device)
    folder, why = directory()
    if folder is None:
        return None, why
    key = device_key(device)
    exact = folder / f"{key}.json"
    if exact.is_file():
        return exact, key
    if device.type == "cpu":
        threads = torch.get_num_threads()
        pattern = re.compile(re.escape(_cpu_prefix()) + r"-(\d+)t\.json")
        recorded = sorted((abs(int(m.group(1)) - threads), int(m.group(1)), p)
                          for p in folder.iterdir() if (m := pattern.fullmatch(p.name)))
        if recorded:
            _, n, path = recorded[0]
            return path, f"{path.stem} (the nearest recorded to {threads} threads)"
        how = f"record one: TRM_BENCH_THREADS={threads} TRM_BENCH_UPDATE=1 pytest benchmarks"
    else:
        how = "record one: bash benchmarks/device_check.sh (its bench stage writes it), then commit it"
    return None, f"no baseline for {key} in {folder}; {how}"


def _entries(path: Path) -> dict:
    cached = _files.get(str(path))
    if cached is None:
        data = json.loads(path.read_text())
        cached = _files[str(path)] = data["benchmarks"]
        if not isinstance(cached, dict):
            raise TypeError("'benchmarks' is not a mapping")
    return cached


def evidence(backend: str, op: str, device: torch.device | str) -> Evidence:
    """Whether this device's baseline shows ``backend``'s ``op`` faster than the reference. Read once
    per process and cached per device (CPU: and thread count), backend and op (``auto`` asks on every
    call); :func:`forget` drops the cache, so the next call reads the files (and ``$TRM_KERNEL_BASELINES``)
    again."""
    device = torch.device(device)
    where = torch.get_num_threads() if device.type == "cpu" else device.index
    cache_key = (device.type, where, backend, op)
    found = _evidence.get(cache_key)
    if found is None:
        found = _evidence[cache_key] = _weigh(backend, op, device)
    return found


def _weigh(backend: str, op: str, device: torch.device) -> Evidence:
    path, chosen = locate(device)
    if path is None:
        return Evidence(False, chosen)
    try:
        entries = _entries(path)
        counted = {}
        for name, entry in entries.items():
            parts = name.split("/", 4)
            if len(parts) == 5 and parts[0] == op and parts[1] in COUNTED_MODES and parts[2] == backend:
                counted["/".join(parts[1:2] + parts[3:])] = float(entry["speedup"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Evidence(False, f"baseline {path} is not readable ({type(exc).__name__}: {exc}); expected "
                               f'{{"benchmarks": {{"<op>/<mode>/<backend>/<dtype>/<shape>": {{"speedup": x}}}}}}')
    if not counted:
        return Evidence(False, f"baseline {chosen} has no {backend} {op} entry")
    case, slowest = min(counted.items(), key=lambda kv: kv[1])
    if not slowest > MIN_SPEEDUP:
        return Evidence(False, f"baseline {chosen}: the {backend} kernel is {slowest:.2f}x the reference ({case})")
    fastest = max(counted.values())
    return Evidence(True, f"baseline {chosen}: {slowest:.2f}x-{fastest:.2f}x the reference in its {len(counted)} entries")


def forget() -> None:
    """Drop the cached files and verdicts (the next use reads the baselines again)."""
    _evidence.clear()
    _files.clear()
