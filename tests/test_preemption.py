"""Preemption and Ctrl+C (issue 14, items 6-7): SIGTERM / SIGUSR1 / SIGINT make the run finish its
step, write a complete checkpoint and exit with 128 + the signal and the command that resumes;
a second Ctrl+C aborts at once (130). Under torchrun the ranks agree on the step (the stop flag
rides on the per-step all-reduce) and the resumed run matches the uninterrupted one bit for bit.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, environ_without_ranks, subprocess_env, write_config
from trm.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("restore_rank_variables")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """In-process runs set train.num_threads; later tests get this process's own count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

TRAIN = {"max_steps": 6, "checkpoint_interval": 4, "eval_interval": 0, "plots": False, "num_threads": 2}


def _state(step_dir: Path) -> dict:
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
    ds = load(step_dir / "deepspeed" / "mp_rank_00_model_states.pt")
    return {"module": ds["module"], "optimizer": ds["optimizer"], "trainer": load(step_dir / "trainer_state.pt"),
            "rank0": load(step_dir / "rank_0.pt")}


def _assert_same(a, b, where: str = ""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), where
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_sigterm_saves_the_step_reached_and_says_how_to_resume(tmp_path, sudoku_dir):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, {**TRAIN, "max_steps": 500, "checkpoint_interval": 2})
    proc = subprocess.Popen([sys.executable, "-m", "trm.train", str(cfg)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: ckpt.is_complete(ckpt.step_dir(run_dir, 2)), proc, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    latest = ckpt.find_latest_checkpoint(run_dir)
    reached = int(latest.name.split("_")[1])
    assert 2 <= reached < 500, "the stop came before the end"
    assert f"stopped by SIGTERM at step {reached}" in stderr
    command = stderr.split("Resume with: ", 1)[1].splitlines()[0]
    assert command == f"python -m trm.train {shlex.quote(str(cfg))} mode=resume"

    ckpt.verify_checkpoint(latest)  # resuming from it bit-identically: the SIGUSR1 and torchrun tests


def _signal_at(monkeypatch, step: int, *signals: int, gap_s: float = 0.0):
    """Make the trainer send itself ``signals`` at the start of training step ``step``."""
    from trm.train.trainer import Trainer

    original = Trainer.train_step

    def train_step(self):
        if self.step == step:
            for i, sig in enumerate(signals):
                if i:
                    time.sleep(gap_s)
                os.kill(os.getpid(), sig)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_sigusr1_in_process_stop_then_resume_is_bit_identical(tmp_path, sudoku_dir, monkeypatch, capfd):
    from trm.train.__main__ import main

    train = {**TRAIN, "max_steps": 4, "checkpoint_interval": 3}
    straight = write_config(tmp_path / "a.yaml", tmp_path / "a", sudoku_dir, train)
    assert main([str(straight)]) == 0

    cfg = write_config(tmp_path / "b.yaml", tmp_path / "b", sudoku_dir, train)
    with monkeypatch.context() as patch:
        _signal_at(patch, 2, signal.SIGUSR1)
        assert main([str(cfg)]) == 128 + signal.SIGUSR1
    err = capfd.readouterr().err
    assert "SIGUSR1 received" in err and "stopped by SIGUSR1 at step 2" in err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [2], "saved at the step reached, not at an interval"
    ckpt.verify_checkpoint(ckpt.step_dir(tmp_path / "b", 2))
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "handlers are restored after the run"

    assert main([str(cfg), "mode=resume"]) == 0
    _assert_same(_state(ckpt.step_dir(tmp_path / "a", 4)), _state(ckpt.step_dir(tmp_path / "b", 4)), "step_4")


def test_ctrl_c_saves_and_a_second_ctrl_c_aborts(tmp_path, sudoku_dir, monkeypatch, capfd):
    from trm.train import trainer as trainer_module
    from trm.train.__main__ import main

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, TRAIN)
    inherited = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when pytest runs as a background job
    with monkeypatch.context() as patch:  # the terminal's SIGINT and torchrun's relayed copy: one Ctrl+C
        _signal_at(patch, 2, signal.SIGINT, signal.SIGINT)
        assert main([str(cfg)]) == 130
    err = capfd.readouterr().err
    assert "stopped by SIGINT at step 2" in err and "mode=resume" in err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]

    with monkeypatch.context() as patch:  # two presses: abort at once, nothing saved
        patch.setattr(trainer_module, "RELAYED_SIGINT_WINDOW_S", 0.0)
        _signal_at(patch, 3, signal.SIGINT, signal.SIGINT, gap_s=0.01)
        assert main([str(cfg), "mode=resume"]) == 130
    err = capfd.readouterr().err
    assert "interrupted" in err and "mode=resume" in err and "Traceback" not in err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]
    assert signal.getsignal(signal.SIGINT) is inherited, "the SIGINT handler is restored after the run"


def test_slurm_script_requests_the_signal_and_has_torchrun_forward_it(tmp_path):
    """The script's settings; that torchrun with them forwards SIGUSR1 and the ranks save is the
    same path as the SIGTERM test under torchrun below (checked by hand with SIGUSR1 as well)."""
    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in script.splitlines()
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "srun").write_text('#!/usr/bin/env bash\necho "signals=$PET_SIGNALS_TO_HANDLE grace=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"\n')
    (tools / "srun").chmod(0o755)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("run_dir: runs/x\n")
    env = {**environ_without_ranks(), "PATH": f"{tools}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1"}
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 grace=100" in proc.stdout  # torchrun's env settings


# ------------------------------------------------------------------------------ torchrun (slow)
def _torchrun(*args: str) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "trm.train", *args]


def _torchrun_env() -> dict[str, str]:
    env = subprocess_env("1")
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    return env


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_an_agreed_step_and_resumes_bit_identically(tmp_path, sudoku_dir):
    train = {**TRAIN, "max_steps": 12, "checkpoint_interval": 2, "num_threads": 1}
    straight = write_config(tmp_path / "a.yaml", tmp_path / "a", sudoku_dir, train)
    done = subprocess.run(_torchrun(str(straight), "deepspeed.zero_stage=1"), cwd=REPO, env=_torchrun_env(),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "b"
    cfg = write_config(tmp_path / "b.yaml", run_dir, sudoku_dir, train)
    proc = subprocess.Popen(_torchrun(str(cfg), "deepspeed.zero_stage=1"), cwd=REPO, env=_torchrun_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: ckpt.is_complete(ckpt.step_dir(run_dir, 2)), proc, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)  # to torchrun, as a scheduler does; it forwards it to both ranks
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    latest = ckpt.find_latest_checkpoint(run_dir)
    reached = int(latest.name.split("_")[1])
    assert reached < 12, "the stop came too late to test anything"
    assert f"stopped by SIGTERM at step {reached}" in stderr, stderr[-3000:]
    assert f"torchrun --nproc_per_node=2 -m trm.train {cfg} deepspeed.zero_stage=1 mode=resume" in stderr
    assert sorted(p.name for p in latest.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    ckpt.verify_checkpoint(latest)

    resumed = subprocess.run(_torchrun(str(cfg), "deepspeed.zero_stage=1", "mode=resume"), cwd=REPO,
                             env=_torchrun_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ckpt.step_dir(tmp_path / "a", 12), ckpt.step_dir(run_dir, 12)
    _assert_same(_state(a), _state(b), "step_12")
    _assert_same(torch.load(a / "rank_1.pt", weights_only=False), torch.load(b / "rank_1.pt", weights_only=False), "rank_1")
