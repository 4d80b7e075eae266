"""benchmarks/device_check.sh, the one prepared script a GPU session runs on a lent GPU machine:
it must work when that session comes, so it runs here end to end in its dry mode (toy sizes on
the CPU, where its GPU tests skip): stages, time limits, logs in $OUT, exit status, the kernels=auto
vs kernels=torch training comparison and its baseline gate (benchmarks/device_check_train.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKED, RANK_VARS, REPO, write_kernel_baseline

SCRIPT = REPO / "benchmarks" / "device_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))


def _run(root: Path, *stages, **env):
    inherited = {k: v for k, v in os.environ.items() if k not in RANK_VARS}  # a port an in-process trainer holds
    full = {**inherited, "OUT": str(root / "out"), "TRM_DC_PYTHON": sys.executable,
            "TRM_DC_WHEELS": str(root / "no-wheels"), "TRM_DC_BASELINES": str(root / "baselines"),
            "TRM_DC_WORK": str(root / "work"), **env}
    return subprocess.run(["bash", str(SCRIPT), *stages], env=full, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Every default stage in dry mode (the gpu tests narrowed to one file's opchecks)."""
    root = tmp_path_factory.mktemp("device_check")
    # What the bench stage records on a GPU before train (in dry mode it only collects): a baseline
    # backing the CPU kernels for this CPU model at the dry run's one thread, so that train's
    # kernels=auto runs them on whichever machine runs this test.
    from trm.ops import baselines
    planted = root / "kernel-baselines"
    planted.mkdir()
    write_kernel_baseline(planted, BACKED, "cpu", key=f"{baselines._cpu_prefix()}-1t")
    proc = _run(root, TRM_DC_DRY="1", TRM_KERNEL_BASELINES=str(planted), TRM_DC_TESTS_ARGS="tests/test_ops_cuda_build.py -k 'opcheck and not adam'")
    return root, proc


@pytest.mark.slow   # seven processes (four of them training runs): about a minute on an idle 2-core machine
def test_dry_mode_runs_every_stage_end_to_end(dry_run):
    root, proc = dry_run
    out = root / "out"
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "5 stage(s), 0 failed" in proc.stdout
    logs = {name: (out / f"{name}.log").read_text() for name in ("env", "build", "tests", "train", "bench")}
    assert "device class (baseline file): cpu-" in logs["env"] and "torch" in logs["env"], logs["env"]
    assert "verify cpu    rms_norm" in logs["build"] and "ok: 15 of 15 dtype x layout cases" in logs["build"], logs["build"]
    assert "kernels=auto runs:" in logs["build"] and "REFUSED" not in logs["build"]
    assert "skipped" in logs["tests"] and "deselected" in logs["tests"] and "=== tests: rc=0" in logs["tests"]
    train = logs["train"]
    assert "kernels=torch: 1 steps + checkpoint, then a resume to 2" in train
    assert "('cpu', 'rms_norm/rms_norm_fwd')" in train and "calls handed to the reference: none" in train, train
    assert "no baseline: recorded" in train and "train verdict: ok" in train, train
    curves = json.loads((out / "train_curves.json").read_text())
    assert curves["steps"] == [1, 2] and curves["max_rel_diff"] <= 0.02
    assert list((root / "baselines").glob("*-train.json")), "the first run records the baseline"
    assert "collected" in logs["bench"] and "=== bench: rc=0" in logs["bench"]


@pytest.mark.slow
def test_the_train_verdict_gates_against_its_baseline(dry_run, tmp_path, capsys):
    """The second verdict on the same runs is gated (and passes); a baseline whose curve or speed
    the runs do not reach, and a kernels=auto curve that left torch's, each fail, named."""
    import device_check_train

    root, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    work = tmp_path / "work"   # a copy to tamper with (its configs still name the dry run's data)
    shutil.copytree(root / "work", work, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    baselines = tmp_path / "baselines"
    shutil.copytree(root / "baselines", baselines)
    recorded = next(baselines.glob("*-train.json"))
    sizes = json.loads(recorded.read_text())["sizes"]

    def verdict() -> tuple[int, str]:
        code = device_check_train.main([str(work), str(tmp_path / "out"), "--baselines", str(baselines), "--sizes", sizes])
        return code, capsys.readouterr().out

    code, said = verdict()
    assert code == 0 and f"baseline {recorded}" in said and "train verdict: ok" in said, said

    good = recorded.read_text()
    slower = json.loads(good)
    slower["auto_lm_loss"] = [v * 1.1 for v in slower["auto_lm_loss"]]
    slower["auto_examples_per_s"] *= 100
    recorded.write_text(json.dumps(slower))
    code, said = verdict()
    assert code == 1 and "auto's loss curve moved" in said and "below 0.80 x the baseline" in said, said

    recorded.write_text(good)
    metrics = work / "run_auto" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows:
        if "train/lm_loss" in row:
            row["train/lm_loss"] *= 1.5
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, said = verdict()
    assert code == 1 and "kernels=auto's loss curve differs from kernels=torch" in said, said


def test_a_failing_or_overrunning_stage_is_counted_and_the_rest_still_run(tmp_path):
    proc = _run(tmp_path, "tests", "build", "env", TRM_DC_TESTS_ARGS="--no-such-option", TRM_DC_BUILD_S="1")
    out = tmp_path / "out"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "TIMED OUT after 1s (raise TRM_DC_BUILD_S)" in (out / "build.log").read_text()
    assert "=== tests: rc=4" in (out / "tests.log").read_text()
    assert "=== env: rc=0" in (out / "env.log").read_text()      # ran after the two failures


def test_unknown_stage_is_refused(tmp_path):
    proc = _run(tmp_path, "benchmark")
    assert proc.returncode == 100 and "unknown stage 'benchmark' (env build tests bench train suite)" in proc.stderr
