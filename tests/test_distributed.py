"""Several processes on one CPU machine (DeepSpeed's CPU accelerator, gloo): world-size
invariance under ZeRO 0-3, resume at another world size, kill -9 and elastic restarts.

These start real ``torchrun`` jobs and take a few minutes together; they are marked ``slow``
(``pytest -m "not slow"`` skips them for a quick loop; ``.ci/run`` runs them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, environ_without_ranks, write_config
from trm.train import checkpoint as ckpt
from trm.train import find_latest_checkpoint

pytestmark = pytest.mark.slow

TRAIN = {"max_steps": 8, "global_batch_size": 8, "eval_interval": 4, "checkpoint_interval": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**environ_without_ranks(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun_cmd(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}", *extra,
            "-m", "trm.train", *args]


def torchrun(nproc: int, *args: str, timeout: float = 300) -> None:
    proc = subprocess.run(_torchrun_cmd(nproc, *args), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun x{nproc} {args} failed:\n{proc.stderr[-4000:]}"


def _series(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _final_module(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    states = torch.load(ckpt.step_dir(run_dir, step) / "deepspeed" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    return states["module"]


INVARIANCE_TRAIN = {**TRAIN, "max_steps": 20, "eval_interval": 10, "checkpoint_interval": 10}


def _reference(root: Path, sudoku_dir: Path, train: dict) -> Path:
    cfg = write_config(root / "cfg.yaml", root / "run", sudoku_dir, train)
    torchrun(1, str(cfg))
    return root / "run"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sudoku_dir) -> Path:
    """One process, ZeRO-0, 8 steps: the trajectory the resume tests must follow."""
    return _reference(tmp_path_factory.mktemp("ref"), sudoku_dir, TRAIN)


@pytest.fixture(scope="module")
def reference_run_20(tmp_path_factory, sudoku_dir) -> Path:
    """One process, ZeRO-0, 20 steps: the trajectory every other layout must reproduce."""
    return _reference(tmp_path_factory.mktemp("ref20"), sudoku_dir, INVARIANCE_TRAIN)


@pytest.mark.parametrize("nproc, zero, offload", [
    (2, 0, False), (2, 1, False), (2, 2, False), (2, 3, False),
    (4, 0, False), (4, 1, False), (4, 2, False), (4, 3, False),
    (2, 2, True),  # optimizer state offloaded to the CPU, client optimizer kept
])
def test_loss_curve_is_invariant_to_world_size_and_zero_stage(tmp_path, sudoku_dir, reference_run_20, nproc, zero, offload):
    reference_run = reference_run_20
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, INVARIANCE_TRAIN)
    torchrun(nproc, str(cfg), f"deepspeed.zero_stage={zero}", f"deepspeed.offload_optimizer={str(offload).lower()}")
    want = _series(reference_run, "train/lm_loss")
    got = _series(tmp_path / "run", "train/lm_loss")
    assert sorted(got) == list(range(1, INVARIANCE_TRAIN["max_steps"] + 1))
    for step, value in want.items():
        assert got[step] == pytest.approx(value, rel=1e-4), f"step {step}: {got[step]} vs {value}"
    assert _series(tmp_path / "run", "train/stream_position") == _series(reference_run, "train/stream_position")
    evals = _series(tmp_path / "run", "eval/token_accuracy")
    assert evals.keys() == {10, 20}
    for step, value in _series(reference_run, "eval/token_accuracy").items():
        assert evals[step] == pytest.approx(value, abs=1e-3)


@pytest.mark.parametrize("zero", [1, 2])
def test_resume_at_another_world_size_2_1_2(tmp_path, sudoku_dir, reference_run, zero):
    """2 processes for 4 steps, 1 process for 4 more, 2 processes for 4 more: the data stream
    continues where it stopped and the losses follow the uninterrupted trajectory."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, {**TRAIN, "max_steps": 4})
    torchrun(2, str(cfg), f"deepspeed.zero_stage={zero}")
    torchrun(1, str(cfg), f"deepspeed.zero_stage={zero}", "mode=resume", "train.max_steps=8")
    assert (ckpt.step_dir(run_dir, 4) / "universal").is_dir(), "2 -> 1 must go through a universal checkpoint"
    torchrun(2, str(cfg), f"deepspeed.zero_stage={zero}", "mode=resume", "train.max_steps=12")

    positions = _series(run_dir, "train/stream_position")
    assert sorted(positions) == list(range(1, 13)), "every step logged exactly once"
    reference = _series(reference_run, "train/stream_position")
    assert all(positions[s] == reference[s] for s in range(1, 9)), "the stream continued at the same position"
    losses, want = _series(run_dir, "train/lm_loss"), _series(reference_run, "train/lm_loss")
    for step in range(1, 9):
        assert losses[step] == pytest.approx(want[step], rel=1e-4), f"step {step}"


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "trm.train" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def straight_two_process_run(tmp_path_factory, sudoku_dir) -> Path:
    root = tmp_path_factory.mktemp("straight")
    torchrun(2, str(write_config(root / "cfg.yaml", root / "run", sudoku_dir, {**TRAIN, "max_steps": 12})),
             "deepspeed.zero_stage=1")
    return root / "run"


def _logged_steps(run_dir: Path) -> set[int]:
    """Steps whose training metrics are in metrics.jsonl so far (a line being written is skipped)."""
    path, steps = run_dir / "metrics.jsonl", set()
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/lm_loss" in row:
            steps.add(row["step"])
    return steps


def _deepspeed_files_written(run_dir: Path) -> bool:
    folder = ckpt.step_dir(run_dir, 4) / "deepspeed"
    return folder.is_dir() and any(folder.iterdir())


# Where rank 1 is killed, each an event seen on disk (no fixed delays): while step_4 is being
# written (its folder exists; its DeepSpeed files exist), right after it is complete, and in the
# middle of the later steps (step 5 / step 6 logged).
KILL_POINTS = {
    "save_started": lambda run: ckpt.step_dir(run, 4).exists(),
    "save_writing": _deepspeed_files_written,
    "checkpoint_complete": lambda run: ckpt.is_complete(ckpt.step_dir(run, 4)),
    "step_5_logged": lambda run: 5 in _logged_steps(run),
    "step_6_logged": lambda run: 6 in _logged_steps(run),
}


@pytest.mark.parametrize("moment", list(KILL_POINTS))
def test_kill_a_rank_then_resume_matches_uninterrupted_run(tmp_path, sudoku_dir, straight_two_process_run, moment):
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.yaml", killed, sudoku_dir, {**TRAIN, "max_steps": 12})
    proc = subprocess.Popen(_torchrun_cmd(2, str(cfg), "deepspeed.zero_stage=1"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: KILL_POINTS[moment](killed), proc, moment)
        _workers(proc)[-1].send_signal(signal.SIGKILL)  # rank 1
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    latest = find_latest_checkpoint(killed)
    assert latest is None or ckpt.is_complete(latest)
    if proc.returncode == 0:
        pytest.fail("the job finished before the kill landed; the kill point is too late to test anything")
    torchrun(2, str(cfg), "deepspeed.zero_stage=1", "mode=auto")
    a, b = _final_module(straight_two_process_run, 12), _final_module(killed, 12)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after kill + resume"


def test_elastic_restart_after_kill_finishes_on_its_own(tmp_path, sudoku_dir):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, {**TRAIN, "max_steps": 12})
    proc = subprocess.Popen(_torchrun_cmd(2, str(cfg), "mode=auto", extra=("--max-restarts=2",)), cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: ckpt.is_complete(ckpt.step_dir(run_dir, 4)), proc, "the first checkpoint")
        victims = _workers(proc)
        victims[0].send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert find_latest_checkpoint(run_dir).name == "step_12"
    steps = sorted(_series(run_dir, "train/lm_loss"))
    assert steps == list(range(1, 13)), "after the restart the metrics read as one uninterrupted run"
