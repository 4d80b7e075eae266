"""Timing, gating and reporting for ``pytest benchmarks``.

Every benchmark times OUR backend and the PyTorch reference in the same run and gates on the
RATIO (speedup = reference time / our time), never on absolute times. What makes the gate hold
on a shared machine, and still catch a real regression (tests/test_bench_gate.py plants a 2x
slowdown and sees it fail):

- Same threads both sides: the session pins torch's intra-op threads (which our C++ kernels use
  too) to ``TRM_BENCH_THREADS``, default 1 (:func:`bench_threads` says why).
- Interleaved rounds (:func:`measure`): each round times both sides back to back, alternating
  which goes first; CPU time of this thread with one thread (others' load is not counted),
  ``triton.testing.do_bench`` on a GPU. The speedup is the median of the rounds' ratios, with a
  distribution-free 95% confidence interval (:func:`median_ci`).
- The gate (:func:`gate`) passes when that interval overlaps the baseline band
  ``[speedup / factor, speedup * factor]``; a case outside is re-measured, and fails only when
  every measurement agrees. Below: a regression. Above: the baseline is stale and must be raised
  on purpose (fails too), so baselines stay honest.
- Baselines are keyed by what determines the ratio (:func:`device_class`: GPU name; CPU model,
  ISA and thread count): ``benchmarks/baselines/<device>.json``::

      {"device": "...", "benchmarks": {"<name>": {"speedup": 3.1, "factor": 1.6}, ...}}

  A device without a baseline file is recorded and reported "not gated (no baseline)", with how
  to record one. Update on purpose with ``TRM_BENCH_UPDATE=1 pytest benchmarks`` (rewrites the
  measured entries of this device's file, keeping each entry's factor) and commit the diff.
  ``TRM_BENCH_BASELINE=path.json`` points the gate at another file (the gate's own test uses this).

Results of a session go to ``benchmarks/results/<device>-<date>.csv`` (or ``TRM_BENCH_RESULTS``;
a partial run replaces its own rows of that day's file and keeps the rest)
and a short table is printed at the end of the run (conftest.py).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trm.ops import baselines

HERE = Path(__file__).resolve().parent
BASELINES = HERE / "baselines"
RESULTS = HERE / "results"
DEFAULT_FACTOR = {"cpu": 1.4, "gpu": 1.25}     # noise margins: shared 2-core CPU vs a dedicated GPU; a 2x
# regression must still land below the band with room for the noise of baseline and measurement


# ---------------------------------------------------------------------------------------------
# Device: the baseline key is what determines the ratios
# ---------------------------------------------------------------------------------------------

def on_gpu() -> bool:
    return torch.cuda.is_available()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return baselines.cpu_model()


def bench_threads() -> int:
    """Threads both sides run with on CPU: ``TRM_BENCH_THREADS``, default 1.

    One thread by default: on a shared machine a multi-threaded op waits at each parallel
    region's barrier for its slowest thread, so the load of others' processes moves our ratio
    (seen here: one case between 0.49x and 4.25x in an afternoon); one thread per side is
    slowed alike by the load. ``TRM_BENCH_THREADS=2`` measures the parallel kernels (its own
    baseline key)."""
    raw = os.environ.get("TRM_BENCH_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"TRM_BENCH_THREADS={raw!r}: give a thread count >= 1 (e.g. TRM_BENCH_THREADS=2)")
    return n


def pin_threads() -> int:
    """Set torch's intra-op threads (used by PyTorch's ops and by our C++ kernels' at::parallel_for
    alike) to :func:`bench_threads` for the whole session; returns the count."""
    n = bench_threads()
    if not on_gpu():
        torch.set_num_threads(n)
    return n


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap per large block, no trimming), so a
    CPU benchmark times the op, not the kernel zeroing fresh pages for each big tensor: that cost
    moves with the machine's load and differs between the sides (the reference allocates more
    intermediates), and moved the swiglu ratio from 0.44x to 0.84x between two runs here.
    True when applied (glibc); elsewhere the allocator is left as it is."""
    if on_gpu():
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def device_class() -> str:
    """Baseline key of this machine, made of what sets the ratios (``trm.ops.baselines.device_key``,
    the key ``kernels=auto`` reads the same files by). GPU: the card's name. CPU: the model name, the
    vector ISA PyTorch's kernels dispatch to (``AVX2``, ``AVX512``, ...) and the thread count both
    sides run with."""
    return baselines.device_key("cuda:0" if on_gpu() else "cpu")


def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


# ---------------------------------------------------------------------------------------------
# Timing: interleaved rounds, the ratio per round, a confidence interval on its median
# ---------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    """One interleaved measurement: per round, the reference's and our time per call."""
    ref_times: list[float]
    our_times: list[float]

    @property
    def ratios(self) -> list[float]:
        """Speedup of each round (reference / ours, the two measured back to back)."""
        return [r / o for r, o in zip(self.ref_times, self.our_times)]

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ci(self) -> tuple[float, float]:
        return median_ci(self.ratios)

    @property
    def ref_s(self) -> float:
        return statistics.median(self.ref_times)

    @property
    def ours_s(self) -> float:
        return statistics.median(self.our_times)


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics ``x(k), x(n+1-k)``
    with the largest ``k`` whose coverage ``1 - 2 P(Binomial(n, 1/2) < k)`` is >= ``confidence``
    (the whole range when there are too few values)."""
    xs, n = sorted(values), len(values)
    k, below = 0, 0.0                       # below = P(Binomial(n, 1/2) <= k - 1)
    while k + 1 <= n // 2:
        nxt = below + math.comb(n, k) / 2 ** n
        if 1 - 2 * nxt < confidence:
            break
        k, below = k + 1, nxt
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


def measure(ref_fn: Callable[[], object], our_fn: Callable[[], object], *, rounds: int = 15,
            min_round_s: float = 0.02, warmup: int = 2) -> Measurement:
    """Time ``ref_fn`` and ``our_fn`` in the same run, interleaved: each round times both sides back
    to back (``iters`` calls each, about ``min_round_s`` for the slower side; :func:`cpu_clock`),
    alternating which goes first, so a load spike or a clock change hits both sides of a round
    alike. GPU: ``triton.testing.do_bench`` (CUDA events, cache flush) per side and round."""
    if on_gpu():
        from triton.testing import do_bench

        for fn in (ref_fn, our_fn):
            do_bench(fn, warmup=25, rep=50)
        ref_times, our_times = [], []
        for i in range(max(3, rounds // 3)):
            pair = (ref_fn, our_fn) if i % 2 == 0 else (our_fn, ref_fn)
            t = [do_bench(fn, warmup=5, rep=50, return_mode="median") * 1e-3 for fn in pair]
            ref_times.append(t[0] if i % 2 == 0 else t[1])
            our_times.append(t[1] if i % 2 == 0 else t[0])
        return Measurement(ref_times, our_times)
    clock = cpu_clock()
    for _ in range(warmup):
        ref_fn()
        our_fn()
    t0 = clock()
    ref_fn()
    t_ref = clock() - t0
    t0 = clock()
    our_fn()
    t_ours = clock() - t0
    iters = max(1, int(min_round_s / max(t_ref, t_ours, 1e-6)))
    ref_times, our_times = [], []
    for i in range(rounds):
        for fn, sink in ((ref_fn, ref_times), (our_fn, our_times))[:: 1 if i % 2 == 0 else -1]:
            t0 = clock()
            for _ in range(iters):
                fn()
            sink.append((clock() - t0) / iters)
    return Measurement(ref_times, our_times)


def cpu_clock() -> Callable[[], float]:
    """The CPU clock of :func:`measure`: with one thread, this thread's CPU time
    (``time.thread_time``: the time the other processes of a shared machine take from us is not
    counted, on either side); with more, wall time (``time.perf_counter``), since the threads'
    parallel speed is then what is measured."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large tensor)."""
    n = (256 << 20) // 4 if on_gpu() else (64 << 20) // 4
    x = torch.empty(n, dtype=torch.float32, device=device()).normal_()
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), lambda: y.copy_(x), rounds=3).ref_s
    return 2 * x.numel() * x.element_size() / t


# ---------------------------------------------------------------------------------------------
# Results and the gate
# ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    name: str                 # e.g. "rms_norm/fwd/cpu/float32/64x97x512"
    op: str
    shape: str
    backend: str
    ref_s: float              # reference seconds per call (median of the rounds)
    ours_s: float
    speedup: float            # median of the rounds' ratios (reference / ours)
    ci_low: float = 0.0       # 95% confidence interval of that median
    ci_high: float = 0.0
    rounds: int = 0
    threads: int = 0
    gbps: float | None = None         # achieved bytes/s / 1e9 (memory-bound ops)
    copy_fraction: float | None = None
    tflops: float | None = None
    max_err: float | None = None
    ref_err: float | None = None
    gate: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, m: Measurement, **fields) -> "Result":
        """A result from a :class:`Measurement` (plus name, op, shape, backend, ...)."""
        lo, hi = m.ci
        return cls(ref_s=m.ref_s, ours_s=m.ours_s, speedup=m.speedup, ci_low=lo, ci_high=hi,
                   rounds=len(m.ratios), threads=torch.get_num_threads(), **fields)


SESSION: list[Result] = []
_copy_bw: list[float] = []
REMEASURES = 2                # a case outside its band is measured this many more times before it fails


def measured_copy_bandwidth() -> float:
    if not _copy_bw:
        _copy_bw.append(copy_bandwidth())
    return _copy_bw[0]


def baseline_path() -> Path:
    override = os.environ.get("TRM_BENCH_BASELINE")
    return Path(override) if override else BASELINES / f"{device_class()}.json"


def load_baseline() -> dict | None:
    """This device's baseline entries, or None when it has no baseline file."""
    path = baseline_path()
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return data["benchmarks"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"benchmark baseline {path} is not valid ({exc}); expected "
                           f'{{"device": ..., "benchmarks": {{name: {{"speedup": x, "factor": f}}}}}}') from exc


def no_baseline_note() -> str:
    return (f"no baseline for this device ({device_class()}: no {baseline_path()}): results recorded, not gated. "
            f"Record one with TRM_BENCH_UPDATE=1 pytest benchmarks and commit it.")


class GateFailure(AssertionError):
    pass


def _side(lo: float, hi: float, low: float, high: float) -> str:
    """Where a confidence interval lies against the band: "SLOWER", "FASTER" or "ok" (overlaps)."""
    return "SLOWER" if hi < low else "FASTER" if lo > high else "ok"


def gate(result: Result, remeasure: Callable[[], Measurement] | None = None) -> None:
    """Compare ``result`` with this device's baseline band ``[speedup / factor, speedup * factor]``.

    It passes when the 95% confidence interval of the measured speedup overlaps the band. Outside
    it, the case is measured again (``remeasure``, up to :data:`REMEASURES` times) and fails only
    if every measurement lies outside on the same side: below is a regression; above means the
    baseline is stale and must be raised on purpose, so it keeps guarding the gain. Raises
    :class:`GateFailure` with op, shape, the measurements and how to update the baseline.
    """
    baseline = load_baseline()
    entry = None if baseline is None else baseline.get(result.name)
    if entry is None:
        result.gate = "not gated (no baseline)" if baseline is None else "not gated (no entry)"
        return
    expected = float(entry["speedup"])
    factor = float(entry.get("factor", DEFAULT_FACTOR["gpu" if on_gpu() else "cpu"]))
    low, high = expected / factor, expected * factor
    seen = [(result.speedup, result.ci_low, result.ci_high)]
    side = _side(result.ci_low, result.ci_high, low, high)
    while side != "ok" and remeasure is not None and len(seen) <= REMEASURES:
        m = remeasure()
        lo, hi = m.ci
        seen.append((m.speedup, lo, hi))
        if _side(lo, hi, low, high) != side:
            result.gate = f"ok (re-measured {m.speedup:.2f}x)"
            return
    if side == "ok":
        result.gate = "ok"
        return
    result.gate = side
    measured = ", ".join(f"{sp:.2f}x [{lo:.2f}, {hi:.2f}]" for sp, lo, hi in seen)
    how = (f"If this change is intended, update the baseline on purpose: "
           f"TRM_BENCH_UPDATE=1 pytest benchmarks -k '{result.op}' and commit {baseline_path().name}.")
    if side == "SLOWER":
        raise GateFailure(f"{result.op} ({result.backend}, shape {result.shape}) regressed: speedup over the "
                          f"PyTorch reference measured {measured} (median [95% interval], {len(seen)} measurement(s)) "
                          f"< baseline {expected:.2f}x / {factor} = {low:.2f}x. " + how)
    raise GateFailure(f"{result.op} ({result.backend}, shape {result.shape}) is much faster than its baseline: "
                      f"measured {measured} > {expected:.2f}x * {factor} = {high:.2f}x. Raise the baseline so "
                      f"it keeps guarding the gain. " + how)


def record(result: Result, remeasure: Callable[[], Measurement] | None = None) -> Result:
    """Keep ``result`` for the table and CSV, then update the baseline (``TRM_BENCH_UPDATE=1``) or gate it."""
    SESSION.append(result)
    if os.environ.get("TRM_BENCH_UPDATE") == "1":
        _update_baseline(result)
        result.gate = "updated"
        return result
    gate(result, remeasure)
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
    lines = [f"device {device_class()} ({torch.get_num_threads()} thread(s) both sides); copy bandwidth "
             + (f"{_copy_bw[0] / 1e9:.1f} GB/s" if _copy_bw else "not measured")]
    if load_baseline() is None:
        lines.append(no_baseline_note())
    lines.append(f"{'benchmark':58s} {'speedup':>8s} {'95% interval':>13s} {'GB/s':>7s} {'copy%':>6s} "
                 f"{'TFLOP/s':>8s} gate")
    for r in SESSION:
        gb = f"{r.gbps:.1f}" if r.gbps is not None else "-"
        cf = f"{100 * r.copy_fraction:.0f}" if r.copy_fraction is not None else "-"
        tf = f"{r.tflops:.2f}" if r.tflops is not None else "-"
        ci = f"{r.ci_low:.2f}-{r.ci_high:.2f}"
        lines.append(f"{r.name:58s} {r.speedup:8.2f} {ci:>13s} {gb:>7s} {cf:>6s} {tf:>8s} {r.gate}")
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
