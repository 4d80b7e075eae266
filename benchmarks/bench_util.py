"""Timing, gating and reporting for ``pytest benchmarks``.

Every benchmark times OUR backend and the PyTorch reference in the same run, interleaved, and
gates on the RATIO (speedup = reference time / our time), never on absolute times:

- CPU: ``time.perf_counter`` around ``iters`` calls, ``rounds`` interleaved rounds (ref, ours,
  ref, ours, ...) after warm-up; the median of each side. Interleaving makes a load spike on this
  shared machine hit both sides alike.
- GPU: ``triton.testing.do_bench`` (CUDA events, cache flush, median) for each side.

The gate (:func:`gate`) compares the measured speedup with ``benchmarks/baselines/<device>.json``::

    {"device": "...", "benchmarks": {"<name>": {"speedup": 3.1, "factor": 1.6}, ...}}

A run passes when ``speedup / factor <= measured <= speedup * factor``. Below: a regression
(fails, naming op, shape, both numbers and how to update the baseline). Above: the baseline is
stale and must be raised on purpose (fails too), so baselines stay honest. Without a baseline
file or entry the result is recorded and reported as "no baseline". Update on purpose with
``TRM_BENCH_UPDATE=1 pytest benchmarks`` (rewrites the measured entries of this device's file,
keeping each entry's factor) and commit the diff. ``TRM_BENCH_BASELINE=path.json`` points the
gate at another file (the gate's own test uses this).

Results of a session go to ``benchmarks/results/<device>-<date>.csv`` (or ``TRM_BENCH_RESULTS``;
a partial run replaces its own rows of that day's file and keeps the rest)
and a short table is printed at the end of the run (conftest.py).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
BASELINES = HERE / "baselines"
RESULTS = HERE / "results"
DEFAULT_FACTOR = {"cpu": 1.6, "gpu": 1.25}     # noise margins: shared 2-core CPU vs a dedicated GPU


# ---------------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------------

def on_gpu() -> bool:
    return torch.cuda.is_available()


def device_class() -> str:
    """Baseline key of this machine: the GPU's name, or ``cpu-<arch>-<threads>t``."""
    if on_gpu():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{platform.machine()}-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def time_pair(ref_fn: Callable[[], object], our_fn: Callable[[], object], *, rounds: int = 7,
              min_round_s: float = 0.05, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call of ``ref_fn`` and ``our_fn``, measured in the same run."""
    if on_gpu():
        from triton.testing import do_bench

        ref = do_bench(ref_fn, warmup=25, rep=200, return_mode="median") * 1e-3
        ours = do_bench(our_fn, warmup=25, rep=200, return_mode="median") * 1e-3
        ref2 = do_bench(ref_fn, warmup=5, rep=100, return_mode="median") * 1e-3
        return min(ref, ref2), ours
    for _ in range(warmup):
        ref_fn()
        our_fn()
    # iterations per round so that the slower side takes about min_round_s
    t0 = time.perf_counter()
    ref_fn()
    once = max(time.perf_counter() - t0, 1e-6)
    iters = max(1, int(min_round_s / once))
    ref_times, our_times = [], []
    for _ in range(rounds):
        for fn, sink in ((ref_fn, ref_times), (our_fn, our_times)):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sink.append((time.perf_counter() - t0) / iters)
    return statistics.median(ref_times), statistics.median(our_times)


def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large tensor)."""
    n = (256 << 20) // 4 if on_gpu() else (64 << 20) // 4
    x = torch.empty(n, dtype=torch.float32, device=device()).normal_()
    y = torch.empty_like(x)
    t, _ = time_pair(lambda: y.copy_(x), lambda: y.copy_(x), rounds=3)
    return 2 * x.numel() * x.element_size() / t


# ---------------------------------------------------------------------------------------------
# Results and the gate
# ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    name: str                 # e.g. "rms_norm/fwd+bwd/cpu/float32/64x97x512"
    op: str
    shape: str
    backend: str
    ref_s: float              # reference seconds per call
    ours_s: float
    speedup: float
    gbps: float | None = None         # achieved bytes/s / 1e9 (memory-bound ops)
    copy_fraction: float | None = None
    tflops: float | None = None
    max_err: float | None = None
    ref_err: float | None = None
    gate: str = ""
    extra: dict = field(default_factory=dict)


SESSION: list[Result] = []
_copy_bw: list[float] = []


def measured_copy_bandwidth() -> float:
    if not _copy_bw:
        _copy_bw.append(copy_bandwidth())
    return _copy_bw[0]


def baseline_path() -> Path:
    override = os.environ.get("TRM_BENCH_BASELINE")
    return Path(override) if override else BASELINES / f"{device_class()}.json"


def load_baseline() -> dict:
    path = baseline_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data["benchmarks"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"benchmark baseline {path} is not valid ({exc}); expected "
                           f'{{"device": ..., "benchmarks": {{name: {{"speedup": x, "factor": f}}}}}}') from exc


class GateFailure(AssertionError):
    pass


def gate(result: Result) -> None:
    """Compare ``result.speedup`` with the baseline; raise :class:`GateFailure` outside the band."""
    entry = load_baseline().get(result.name)
    if entry is None:
        result.gate = "no baseline"
        return
    expected, factor = float(entry["speedup"]), float(entry.get("factor", DEFAULT_FACTOR["gpu" if on_gpu() else "cpu"]))
    low, high = expected / factor, expected * factor
    how = (f"If this change is intended, update the baseline on purpose: "
           f"TRM_BENCH_UPDATE=1 pytest benchmarks -k '{result.op}' and commit {baseline_path().name}.")
    if result.speedup < low:
        result.gate = "SLOWER"
        raise GateFailure(f"{result.op} ({result.backend}, shape {result.shape}) regressed: speedup over the "
                          f"PyTorch reference {result.speedup:.2f}x < baseline {expected:.2f}x / {factor} = {low:.2f}x. "
                          + how)
    if result.speedup > high:
        result.gate = "FASTER"
        raise GateFailure(f"{result.op} ({result.backend}, shape {result.shape}) is much faster than its baseline: "
                          f"{result.speedup:.2f}x > {expected:.2f}x * {factor} = {high:.2f}x. Raise the baseline so "
                          f"it keeps guarding the gain. " + how)
    result.gate = "ok"


def record(result: Result) -> Result:
    SESSION.append(result)
    if os.environ.get("TRM_BENCH_UPDATE") == "1":
        _update_baseline(result)
        result.gate = "updated"
        return result
    gate(result)
    return result


def _update_baseline(result: Result) -> None:
    path = baseline_path()
    data = json.loads(path.read_text()) if path.exists() else {"device": device_class(), "benchmarks": {}}
    old = data["benchmarks"].get(result.name, {})
    data["benchmarks"][result.name] = {
        "speedup": round(result.speedup, 3),
        "factor": old.get("factor", DEFAULT_FACTOR["gpu" if on_gpu() else "cpu"]),
    }
    data["updated"] = _dt.date.today().isoformat()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_csv() -> Path | None:
    if not SESSION:
        return None
    path = Path(os.environ.get("TRM_BENCH_RESULTS") or RESULTS / f"{device_class()}-{_dt.date.today().isoformat()}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f for f in asdict(SESSION[0]) if f != "extra"] + ["extra", "device"]
    rows: dict[str, dict] = {}
    if path.exists():   # a partial run (-k) updates its rows and keeps the others of the day's file
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames == fields:
                rows = {row["name"]: row for row in reader}
    for r in SESSION:
        row = asdict(r)
        row["extra"] = json.dumps(row["extra"], sort_keys=True)
        row["device"] = device_class()
        rows[r.name] = row
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows.values())
    return path


def summary_lines() -> list[str]:
    lines = [f"device {device_class()}; copy bandwidth "
             + (f"{_copy_bw[0] / 1e9:.1f} GB/s" if _copy_bw else "not measured"),
             f"{'benchmark':58s} {'speedup':>8s} {'GB/s':>7s} {'copy%':>6s} {'TFLOP/s':>8s} gate"]
    for r in SESSION:
        gb = f"{r.gbps:.1f}" if r.gbps is not None else "-"
        cf = f"{100 * r.copy_fraction:.0f}" if r.copy_fraction is not None else "-"
        tf = f"{r.tflops:.2f}" if r.tflops is not None else "-"
        lines.append(f"{r.name:58s} {r.speedup:8.2f} {gb:>7s} {cf:>6s} {tf:>8s} {r.gate}")
        if "examples_per_s_ours" in r.extra:  # end-to-end rows: throughput and memory, ours vs reference
            e = r.extra
            line = (f"    examples/s ours {e['examples_per_s_ours']:.0f} vs eager {e['examples_per_s_ref']:.0f}; "
                    f"peak MiB ours {e['peak_mb_ours']:.0f} vs eager {e['peak_mb_ref']:.0f}")
            if "speedup_vs_ref_compiled" in e:
                line += (f"; vs plain model under torch.compile {e['speedup_vs_ref_compiled']:.2f}x "
                         f"({e['examples_per_s_ref_compiled']:.0f} examples/s, {e['peak_mb_ref_compiled']:.0f} MiB)")
            lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# Correctness inside the benchmark (DESIGN.md error rule)
# ---------------------------------------------------------------------------------------------

def max_abs_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if torch.isnan(a).any():
        return float("inf")
    return (a.double() - ref64).abs().max().item()


def check_error_rule(ours: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, what: str,
                     floor: float = 0.0) -> tuple[float, float]:
    """Our max error vs fp64 must be <= 2x plain PyTorch's at the same precision (+ floor)."""
    e_ours, e_plain = max_abs_err(ours, ref64), max_abs_err(plain, ref64)
    assert e_ours <= 2 * e_plain + floor, (f"{what}: a fast wrong kernel does not pass: error {e_ours:.3e} > "
                                           f"2 x PyTorch's {e_plain:.3e}")
    return e_ours, e_plain
