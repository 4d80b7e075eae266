"""benchmarks/device_check.sh, the one prepared script a GPU session runs on a lent GPU machine:
it must work when that session comes, so its plumbing (stages, time limits, logs in $OUT, exit
status) is exercised here on the CPU, where its GPU tests skip."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "device_check.sh"


def _run(tmp_path, *stages, **env):
    full = {**os.environ, "OUT": str(tmp_path / "out"), "TRM_DC_PYTHON": sys.executable,
            "TRM_DC_WHEELS": str(tmp_path / "no-wheels"), **env}
    return subprocess.run(["bash", str(SCRIPT), *stages], env=full, capture_output=True, text=True, timeout=300)


def test_env_and_gpu_test_stages_write_their_logs(tmp_path):
    proc = _run(tmp_path, "env", "tests", TRM_DC_TESTS_ARGS="tests/test_ops_cuda_build.py -k 'opcheck and not adam'")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env_log, tests_log = (out / "env.log").read_text(), (out / "tests.log").read_text()
    assert "device class (baseline file): cpu-" in env_log and "torch" in env_log, env_log
    assert "skipped" in tests_log and "deselected" in tests_log and "=== tests: rc=0" in tests_log, tests_log
    assert "2 stage(s), 0 failed" in proc.stdout


def test_a_failing_or_overrunning_stage_is_counted_and_the_rest_still_run(tmp_path):
    proc = _run(tmp_path, "tests", "build", "env", TRM_DC_TESTS_ARGS="--no-such-option", TRM_DC_BUILD_S="1")
    out = tmp_path / "out"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "TIMED OUT after 1s (raise TRM_DC_BUILD_S)" in (out / "build.log").read_text()
    assert "=== tests: rc=4" in (out / "tests.log").read_text()
    assert "=== env: rc=0" in (out / "env.log").read_text()      # ran after the two failures


def test_unknown_stage_is_refused(tmp_path):
    proc = _run(tmp_path, "benchmark")
    assert proc.returncode == 100 and "unknown stage 'benchmark' (env build tests train bench)" in proc.stderr
