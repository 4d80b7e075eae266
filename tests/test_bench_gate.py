"""The benchmark gate works: a real ``pytest benchmarks`` run on one benchmark fails against a
baseline demanding an impossible speedup, fails against a baseline far below the measurement, and
``TRM_BENCH_UPDATE=1`` writes the measured value (which then passes). Also checks the gate logic
and the CSV output. Run: ``python -m pytest tests/test_bench_gate.py -q``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_util  # noqa: E402

NAME = "rms_norm/fwd/cpu/float32/64x97x512"
SELECT = "rms_norm and 64x97x512 and cpu and not bwd"


def run_bench(tmp_path: Path, baseline: dict | None, update: bool = False) -> subprocess.CompletedProcess:
    base = tmp_path / "baseline.json"
    if baseline is not None:
        base.write_text(json.dumps({"device": "test", "benchmarks": baseline}))
    env = {**os.environ, "TRM_BENCH_BASELINE": str(base), "TRM_BENCH_RESULTS": str(tmp_path / "results.csv")}
    env.pop("TRM_BENCH_UPDATE", None)
    if update:
        env["TRM_BENCH_UPDATE"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_ops.py", "-k", SELECT, "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_gate_fails_both_ways_and_update_writes_the_measurement(tmp_path):
    impossible = run_bench(tmp_path, {NAME: {"speedup": 1000.0, "factor": 1.5}})
    out = impossible.stdout + impossible.stderr
    assert impossible.returncode == 1, out
    assert "regressed" in out and "rms_norm" in out and "64x97x512" in out and "TRM_BENCH_UPDATE=1" in out, out

    far_below = run_bench(tmp_path, {NAME: {"speedup": 0.001, "factor": 1.5}})
    out = far_below.stdout + far_below.stderr
    assert far_below.returncode == 1, out
    assert "much faster than its baseline" in out and "Raise the baseline" in out, out

    updated = run_bench(tmp_path, {}, update=True)
    assert updated.returncode == 0, updated.stdout + updated.stderr
    written = json.loads((tmp_path / "baseline.json").read_text())["benchmarks"]
    assert set(written) == {NAME} and written[NAME]["speedup"] > 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["name"] for r in rows] == [NAME] and float(rows[0]["speedup"]) == pytest.approx(written[NAME]["speedup"], rel=1e-2)
    assert rows[0]["device"] == bench_util.device_class()


def _result(speedup: float) -> bench_util.Result:
    return bench_util.Result(name="op/fwd/x/float32/1x2", op="op", shape="1x2", backend="x", ref_s=speedup,
                             ours_s=1.0, speedup=speedup)


def test_gate_band(tmp_path, monkeypatch):
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"benchmarks": {"op/fwd/x/float32/1x2": {"speedup": 2.0, "factor": 1.5}}}))
    monkeypatch.setenv("TRM_BENCH_BASELINE", str(base))
    for ok in (1.34, 2.0, 2.99):
        r = _result(ok)
        bench_util.gate(r)
        assert r.gate == "ok"
    for bad, word in ((1.3, "regressed"), (3.01, "much faster")):
        with pytest.raises(bench_util.GateFailure, match=word):
            bench_util.gate(_result(bad))
    r = _result(5.0)
    r.name = "other/fwd/x/float32/1x2"
    bench_util.gate(r)
    assert r.gate == "no baseline"
    base.write_text("{not json")
    with pytest.raises(RuntimeError, match="not valid"):
        bench_util.gate(_result(2.0))


def test_committed_cpu_baseline_is_well_formed():
    files = sorted((REPO / "benchmarks" / "baselines").glob("*.json"))
    assert any(f.name.startswith("cpu-") for f in files), "a baseline for this CPU machine class must be committed"
    for f in files:
        data = json.loads(f.read_text())["benchmarks"]
        assert data, f
        for name, entry in data.items():
            assert entry["speedup"] > 0 and entry["factor"] >= 1.0, (f, name)


def test_a_partial_run_updates_its_rows_of_the_days_csv(tmp_path, monkeypatch):
    """``pytest benchmarks -k X`` must not wipe the day's full results: its rows replace theirs."""
    path = tmp_path / "results.csv"
    monkeypatch.setenv("TRM_BENCH_RESULTS", str(path))
    first, second = _result(2.0), _result(3.0)
    second.name = "other/fwd/x/float32/1x2"
    monkeypatch.setattr(bench_util, "SESSION", [first, second])
    bench_util.write_csv()
    again = _result(2.5)
    monkeypatch.setattr(bench_util, "SESSION", [again])
    bench_util.write_csv()
    rows = {r["name"]: float(r["speedup"]) for r in csv.DictReader(path.open())}
    assert rows == {first.name: 2.5, second.name: 3.0}
