"""Launch scripts (launch/): the exact command each prints under DRY_RUN=1, their input checks,
and real multi-process runs on loopback "nodes" (marked slow)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_config

LAUNCH = REPO / "launch"
PY = sys.executable
# Variables the scripts read; every test starts from an environment without them.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
               "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID", "CUDA_VISIBLE_DEVICES", "DEEPSPEED", "DRY_RUN", "TRM_ROOT")
REAL_RUN_TIMEOUT = 110  # seconds, per launch (all "nodes" of it together)


def _env(path: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHON=PY, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if path is not None:
        env["PATH"] = path
    env.update(extra)
    return env


def _tool_dir(tmp_path: Path, fakes: dict[str, str] | None = None) -> str:
    """A PATH of one folder: the few real tools the scripts use, plus fake commands (name -> bash body).
    Keeps real nvidia-smi / scontrol / deepspeed of the machine out of the dry-run tests."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    for name in ("bash", "env", "dirname", "basename", "awk", "grep"):
        if not (tools / name).exists():
            (tools / name).symlink_to(shutil.which(name))
    for name, body in (fakes or {}).items():
        (tools / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (tools / name).chmod(0o755)
    return str(tools)


def _launch(script: str, *args: str, env: dict[str, str], dry: bool = True) -> subprocess.CompletedProcess:
    if dry:
        env = {**env, "DRY_RUN": "1"}
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def _printed_command(proc: subprocess.CompletedProcess) -> list[str]:
    """The argv of the one `+ ...` line the script printed (asserting it succeeded)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0][2:])


def _fails_with(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in: {proc.stderr}"
    assert "+ " not in proc.stdout, "nothing may be launched after an error"


@pytest.fixture
def cfg(tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text("run_dir: runs/x\n")
    return path


TORCHRUN = [PY, "-m", "torch.distributed.run"]
OVERRIDES = ["run_dir=runs/x", "train.max_steps=10", "device=cpu", "deepspeed.zero_stage=2", "tag=two words"]


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "deepspeed.sh", "slurm.sbatch"])
def test_help(script):
    assert os.access(LAUNCH / script, os.X_OK), f"launch/{script} is not executable"
    proc = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "DRY_RUN" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------- single_node.sh


@pytest.mark.parametrize("gpus_args", [["--gpus", "2"], ["--gpus=2"]])
def test_single_node_command(tmp_path, cfg, gpus_args):
    proc = _launch("single_node.sh", str(cfg), *gpus_args, *OVERRIDES, env=_env(_tool_dir(tmp_path)))
    assert _printed_command(proc) == [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trm.train", str(cfg), *OVERRIDES]


@pytest.mark.parametrize("visible, fakes, expected", [
    ("0,1,2", {}, 3),
    (None, {"nvidia-smi": 'printf "GPU %d: NVIDIA H100 (UUID: GPU-%d)\\n" 0 0 1 1 2 2 3 3'}, 4),
    (None, {}, 1),
])
def test_single_node_counts_visible_gpus(tmp_path, cfg, visible, fakes, expected):
    env = _env(_tool_dir(tmp_path, fakes), **({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
    argv = _printed_command(_launch("single_node.sh", str(cfg), "a=1", env=env))
    assert f"--nproc_per_node={expected}" in argv and argv[-2:] == [str(cfg), "a=1"]


@pytest.mark.parametrize("args, message", [
    ([], "no CONFIG"),
    (["missing.yaml"], "'missing.yaml' not found"),
    (["CFG", "--gpus", "0"], "--gpus must be a positive integer"),
    (["CFG", "--gpus", "two"], "--gpus must be a positive integer"),
    (["CFG", "--nodes", "2"], "unknown option '--nodes'"),
    (["CFG", "other.yaml"], "unexpected argument 'other.yaml'"),
])
def test_single_node_rejects_bad_arguments(tmp_path, cfg, args, message):
    args = [str(cfg) if a == "CFG" else a for a in args]
    _fails_with(_launch("single_node.sh", *args, env=_env(_tool_dir(tmp_path))), message)


# ---------------------------------------------------------------- multi_node.sh

RENDEZVOUS = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NNODES": "4", "NODE_RANK": "3",
              "NPROC_PER_NODE": "8", "RDZV_ID": "job42"}


def test_multi_node_command_from_environment(tmp_path, cfg):
    proc = _launch("multi_node.sh", str(cfg), *OVERRIDES, env=_env(_tool_dir(tmp_path), **RENDEZVOUS))
    assert _printed_command(proc) == [
        *TORCHRUN, "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29500", "--rdzv_conf=is_host=0", "--nnodes=4",
        "--node_rank=3", "--nproc_per_node=8", "--rdzv_id=job42", "-m", "trm.train", str(cfg), *OVERRIDES]


def test_multi_node_zero_hosts_the_store_and_restarts(tmp_path, cfg):
    """Node 0 hosts the rendezvous store whatever its hostname resolves to, and publishes
    MASTER_ADDR (not its hostname) to the workers; MAX_RESTARTS becomes --max_restarts."""
    env = _env(_tool_dir(tmp_path), **{**RENDEZVOUS, "NODE_RANK": "0", "MAX_RESTARTS": "3"})
    assert _printed_command(_launch("multi_node.sh", str(cfg), env=env)) == [
        *TORCHRUN, "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29500", "--rdzv_conf=is_host=1",
        "--local_addr=10.0.0.1", "--max_restarts=3", "--nnodes=4", "--node_rank=0", "--nproc_per_node=8",
        "--rdzv_id=job42", "-m", "trm.train", str(cfg)]


# Stand-ins for getent / ip / hostname on a node whose hostname maps to 127.0.1.1 and whose
# cluster network is ib0 (10.1.0.0/16); MASTER_ADDR 10.1.0.1 is node 0's ib0 address.
NODE_TOOLS = {
    "getent": 'case "$2" in node0 | node1) echo "127.0.1.1 STREAM $2" ;; 10.*) echo "$2 STREAM" ;; esac',
    "hostname": "echo node0",
    "ip": """case "$*" in
  "-o route get 10.1.0.1") echo "local 10.1.0.1 dev lo src 10.1.0.1 uid 0" ;;
  "-o route get 127.0.1.1") echo "local 127.0.1.1 dev lo src 127.0.0.1 uid 0" ;;
  "-o -4 addr show") echo "1: lo inet 127.0.0.1/8 scope host lo"; echo "3: ib0 inet 10.1.0.1/16 scope global ib0" ;;
esac""",
}


def test_multi_node_picks_the_gloo_interface_toward_master(tmp_path, cfg):
    env = _env(_tool_dir(tmp_path, NODE_TOOLS), **{**RENDEZVOUS, "MASTER_ADDR": "10.1.0.1", "NODE_RANK": "0"})
    proc = _launch("multi_node.sh", str(cfg), env=env)
    assert _printed_command(proc)[-2:] == ["trm.train", str(cfg)]
    assert "GLOO_SOCKET_IFNAME=ib0 (the interface that reaches 10.1.0.1" in proc.stderr
    chosen = _launch("multi_node.sh", str(cfg), env={**env, "GLOO_SOCKET_IFNAME": "eth1"})
    assert _printed_command(chosen) and "GLOO_SOCKET_IFNAME" not in chosen.stderr, "a set variable wins"


def test_multi_node_without_a_usable_interface_asks_for_one(tmp_path, cfg):
    """MASTER_ADDR = node 0's own name, which resolves to 127.0.1.1 there: gloo would listen on
    loopback, so the script stops and names the variable to set."""
    env = _env(_tool_dir(tmp_path, NODE_TOOLS), **{**RENDEZVOUS, "MASTER_ADDR": "node0", "NODE_RANK": "0"})
    _fails_with(_launch("multi_node.sh", str(cfg), env=env), "hostname resolves to 127.0.1.1",
                "Set GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    assert _printed_command(_launch("multi_node.sh", str(cfg), env={**env, "GLOO_SOCKET_IFNAME": "ib0"}))


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_JOB_NODELIST": "gpu[007-009]", "SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("extra, fakes, expected", [
    # scontrol expands the node list; SLURM_GPUS_ON_NODE wins over SLURM_NTASKS_PER_NODE
    ({"SLURM_GPUS_ON_NODE": "8"}, {"scontrol": 'echo gpu007; echo gpu008; echo gpu009'},
     {"endpoint": "gpu007:18456", "nproc": "8"}),
    # no scontrol on PATH: the first host of the compressed list; one task per node, no GPUs
    ({"SLURM_JOB_NODELIST": "gpu[007-009,011],cpu1"}, {}, {"endpoint": "gpu007:18456", "nproc": "1"}),
    ({"SLURM_JOB_NODELIST": "login2,gpu[1-2]"}, {}, {"endpoint": "login2:18456", "nproc": "1"}),
    # variables that are set win over SLURM's
    ({"SLURM_GPUS_ON_NODE": "8", "MASTER_PORT": "29400", "NPROC_PER_NODE": "2"}, {},
     {"endpoint": "gpu007:29400", "nproc": "2"}),
])
def test_multi_node_maps_slurm_variables(tmp_path, cfg, extra, fakes, expected):
    proc = _launch("multi_node.sh", str(cfg), "a=1", env=_env(_tool_dir(tmp_path, fakes), **{**SLURM, **extra}))
    assert _printed_command(proc) == [
        *TORCHRUN, "--rdzv_backend=c10d", f"--rdzv_endpoint={expected['endpoint']}", "--rdzv_conf=is_host=0", "--nnodes=3",
        "--node_rank=2", f"--nproc_per_node={expected['nproc']}", "--rdzv_id=123456", "-m", "trm.train", str(cfg), "a=1"]


def test_multi_node_without_rendezvous_variables_names_them(tmp_path, cfg):
    proc = _launch("multi_node.sh", str(cfg), env=_env(_tool_dir(tmp_path)))
    _fails_with(proc, "MASTER_ADDR is not set", "MASTER_PORT is not set", "NNODES is not set",
                "NODE_RANK is not set", "export MASTER_ADDR=")
    only_rank_missing = {k: v for k, v in RENDEZVOUS.items() if k != "NODE_RANK"}
    proc = _launch("multi_node.sh", str(cfg), env=_env(_tool_dir(tmp_path), **only_rank_missing))
    _fails_with(proc, "NODE_RANK is not set")
    assert "MASTER_ADDR is not set" not in proc.stderr


@pytest.mark.parametrize("bad, message", [
    ({"NODE_RANK": "4"}, "NODE_RANK must be an integer in 0..3"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port"),
    ({"NNODES": "zero"}, "NNODES must be a positive integer"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a positive integer"),
    ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS must be a non-negative integer"),
])
def test_multi_node_rejects_bad_values(tmp_path, cfg, bad, message):
    _fails_with(_launch("multi_node.sh", str(cfg), env=_env(_tool_dir(tmp_path), **{**RENDEZVOUS, **bad})), message)


# ---------------------------------------------------------------- slurm.sbatch


def test_slurm_sbatch_runs_one_multi_node_task_per_node(tmp_path, cfg):
    env = _env(_tool_dir(tmp_path), **SLURM, SLURM_CPUS_PER_TASK="16")
    argv = _printed_command(_launch("slurm.sbatch", str(cfg), *OVERRIDES, env=env))
    assert argv == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=16",
                    str(LAUNCH / "multi_node.sh"), str(cfg), *OVERRIDES]


def test_slurm_sbatch_through_srun_reaches_torchrun(tmp_path, cfg):
    """sbatch -> (fake) srun -> multi_node.sh on a node: the torchrun command it would run there."""
    fake_srun = 'while [[ "$1" == -* ]]; do shift; done\nDRY_RUN=1 exec "$@"'
    env = _env(_tool_dir(tmp_path, {"srun": fake_srun}), **SLURM, SLURM_GPUS_ON_NODE="4")
    proc = _launch("slurm.sbatch", str(cfg), "a=1", env=env, dry=False)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert lines[0][0] == "srun" and lines[1] == [
        *TORCHRUN, "--rdzv_backend=c10d", "--rdzv_endpoint=gpu007:18456", "--rdzv_conf=is_host=0", "--nnodes=3",
        "--node_rank=2", "--nproc_per_node=4", "--rdzv_id=123456", "-m", "trm.train", str(cfg), "a=1"]


def test_slurm_sbatch_outside_slurm_says_so(tmp_path, cfg):
    _fails_with(_launch("slurm.sbatch", str(cfg), env=_env(_tool_dir(tmp_path))), "not inside a SLURM job")


# ---------------------------------------------------------------- deepspeed.sh


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("# two loopback nodes\n\nlocalhost slots=1\n  127.0.0.1   slots=1   # second node\n")
    return path


def test_deepspeed_command(tmp_path, cfg, hostfile):
    env = _env(_tool_dir(tmp_path))  # no `deepspeed` on PATH: the runner module of $PYTHON
    proc = _launch("deepspeed.sh", "--hostfile", str(hostfile), str(cfg), "--no_ssh", "--node_rank", "1",
                   "--master_addr=127.0.0.1", "--master_port", "29600", "-i", "localhost@127.0.0.1",
                   "--launcher_args", "-x FOO", *OVERRIDES, env=env)
    assert _printed_command(proc) == [
        PY, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh", "--node_rank=1",
        "--master_addr=127.0.0.1", "--master_port=29600", "--include=localhost@127.0.0.1", "--launcher_args=-x FOO",
        "--module", "trm.train", str(cfg), *OVERRIDES]


def test_deepspeed_prefers_the_entry_point_on_path(tmp_path, cfg, hostfile):
    env = _env(_tool_dir(tmp_path, {"deepspeed": "exit 1"}))
    argv = _printed_command(_launch("deepspeed.sh", f"--hostfile={hostfile}", str(cfg), "a=1", env=env))
    assert argv == ["deepspeed", "--hostfile", str(hostfile), "--module", "trm.train", str(cfg), "a=1"]


@pytest.mark.parametrize("content, message", [
    ("node0 slots=2\nnode1 slots=x\n", "line 2: 'node1 slots=x' is not 'hostname slots=N'"),
    ("# gpus\nnode1 gpus=2\n", "line 2: 'node1 gpus=2' is not 'hostname slots=N'"),
    ("node1\n", "line 1: 'node1' is not 'hostname slots=N'"),
    ("node1 slots=0\n", "line 1: 'node1 slots=0': slots must be a positive integer"),
    ("node1 slots=2\nnode1 slots=2\n", "line 2: 'node1 slots=2': host node1 is already on line 1"),
    ("", "has no host lines"),
    ("# only a comment\n\n", "has no host lines"),
])
def test_deepspeed_rejects_bad_hostfile(tmp_path, cfg, content, message):
    bad = tmp_path / "hosts"
    bad.write_text(content)
    _fails_with(_launch("deepspeed.sh", "--hostfile", str(bad), str(cfg), env=_env(_tool_dir(tmp_path))), message)


@pytest.mark.parametrize("args, message", [
    (["--hostfile", "HOSTS_MISSING", "CFG"], "does not exist"),
    (["CFG"], "--hostfile FILE is required"),
    (["--hostfile", "HOSTS", "CFG", "--no_ssh", "--master_addr=a"], "--no_ssh needs --node_rank"),
    (["--hostfile", "HOSTS", "CFG", "--no_ssh", "--node_rank=0"], "--no_ssh needs --master_addr"),
    (["--hostfile", "HOSTS", "CFG", "--bogus"], "unknown option '--bogus'"),
    (["--hostfile", "HOSTS", "CFG", "--module"], "launches the module trm.train itself"),
    (["--hostfile", "HOSTS", "missing.yaml"], "'missing.yaml' not found"),
])
def test_deepspeed_rejects_bad_arguments(tmp_path, cfg, hostfile, args, message):
    names = {"CFG": str(cfg), "HOSTS": str(hostfile), "HOSTS_MISSING": str(tmp_path / "nope")}
    _fails_with(_launch("deepspeed.sh", *[names.get(a, a) for a in args], env=_env(_tool_dir(tmp_path))), message)


def test_hostfile_example_is_valid(tmp_path, cfg):
    proc = _launch("deepspeed.sh", "--hostfile", str(LAUNCH / "hostfile.example"), str(cfg), env=_env(_tool_dir(tmp_path)))
    assert _printed_command(proc)[-3:] == ["--module", "trm.train", str(cfg)]


# ---------------------------------------------------------------- real runs on loopback "nodes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_together(launches: list[tuple[list[str], dict[str, str]]], logs: Path, timeout: float = REAL_RUN_TIMEOUT) -> list[str]:
    """Start every (argv, env) at once, each in its own process group, logging to files; wait for all.
    On a failure or the timeout, kill every process group and fail with the logs' tails."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, paths = [], []
    for i, (argv, env) in enumerate(launches):
        path = logs / f"launch_{i}.log"
        with path.open("w") as out:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        paths.append(path)
    deadline, problem = time.monotonic() + timeout, None
    while any(p.poll() is None for p in procs):
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            problem = f"launch {failed[0]} exited with {procs[failed[0]].returncode}"
            break
        if time.monotonic() > deadline:
            problem = f"timed out after {timeout:.0f} s"
            break
        time.sleep(0.5)
    if problem is None and any(p.returncode != 0 for p in procs):
        problem = "exit codes " + str([p.returncode for p in procs])
    if problem is not None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        tails = "\n".join(f"--- launch {i}: {' '.join(launches[i][0])}\n{path.read_text()[-3000:]}"
                          for i, path in enumerate(paths))
        raise AssertionError(f"{problem}\n{tails}")
    return [path.read_text() for path in paths]


def _train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "train/lm_loss" in row]


def _assert_complete_checkpoint(run_dir: Path, step: int, world_size: int) -> None:
    path = run_dir / "checkpoints" / f"step_{step}"
    assert (path / "COMPLETE").is_file(), f"{path} has no COMPLETE marker: {sorted(p.name for p in path.glob('*'))}"
    for name in ("trainer_state.pt", "config.yaml", *[f"rank_{r}.pt" for r in range(world_size)]):
        assert (path / name).is_file(), f"{path / name} is missing"
    assert any((path / "deepspeed").iterdir()), f"{path}/deepspeed is empty"


def _tiny_config(tmp_path: Path, sudoku_dir: Path, run_dir: Path) -> Path:
    return write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir,
                        train={"max_steps": 4, "global_batch_size": 8, "checkpoint_interval": 2, "eval_interval": 4})


@pytest.mark.slow
def test_single_node_trains_with_two_processes(tmp_path, sudoku_dir):
    run_dir = tmp_path / "run"
    cfg = _tiny_config(tmp_path, sudoku_dir, run_dir)
    argv = ["bash", str(LAUNCH / "single_node.sh"), str(cfg), "--gpus", "2", "device=cpu"]
    (log,) = _run_together([(argv, _env())], tmp_path / "logs")
    assert "--standalone --nproc_per_node=2 -m trm.train" in log and "final evaluation" in log
    assert _train_steps(run_dir) == [1, 2, 3, 4]
    _assert_complete_checkpoint(run_dir, 4, world_size=2)


@pytest.mark.slow
def test_multi_node_two_loopback_nodes_train_and_resume(tmp_path, sudoku_dir):
    run_dir = tmp_path / "run"
    cfg = _tiny_config(tmp_path, sudoku_dir, run_dir)

    def two_nodes(*overrides: str) -> list[tuple[list[str], dict[str, str]]]:
        port = str(_free_port())
        return [(["bash", str(LAUNCH / "multi_node.sh"), str(cfg), "device=cpu", *overrides],
                 _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NNODES="2", NODE_RANK=str(rank),
                      NPROC_PER_NODE="1", RDZV_ID=f"test-{port}"))
                for rank in (0, 1)]

    logs = _run_together(two_nodes(), tmp_path / "logs_new")
    assert "final evaluation" in "".join(logs)
    assert _train_steps(run_dir) == [1, 2, 3, 4]
    _assert_complete_checkpoint(run_dir, 4, world_size=2)

    _run_together(two_nodes("mode=resume", "train.max_steps=6"), tmp_path / "logs_resume")
    assert _train_steps(run_dir) == [1, 2, 3, 4, 5, 6], "a resumed run continues after its checkpoint, no repeats"
    _assert_complete_checkpoint(run_dir, 6, world_size=2)


@pytest.mark.slow
def test_deepspeed_hostfile_two_loopback_nodes(tmp_path, sudoku_dir):
    """DeepSpeed's launcher with --no_ssh: one launcher per hostfile line, each told its --node_rank.
    The host names only need to be distinct hostfile entries (the launcher itself never contacts them
    with --no_ssh); ranks follow the hostfile order, rendezvous is at --master_addr/--master_port."""
    run_dir = tmp_path / "run"
    cfg = _tiny_config(tmp_path, sudoku_dir, run_dir)
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # PATH is left as it is: putting the venv's bin/ first would switch ninja (the venv's 1.13 vs
    # /usr/bin's 1.11), and each switch makes DeepSpeed JIT-rebuild its CPU shm comm op (minutes here).
    env = _env()

    def two_nodes(*overrides: str) -> list[tuple[list[str], dict[str, str]]]:
        port = str(_free_port())
        return [(["bash", str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hosts), str(cfg), "--no_ssh",
                  f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", "device=cpu",
                  *overrides], env)
                for rank in (0, 1)]

    logs = _run_together(two_nodes(), tmp_path / "logs")
    assert "--module trm.train" in logs[0] and "final evaluation" in logs[0]
    assert _train_steps(run_dir) == [1, 2, 3, 4]
    _assert_complete_checkpoint(run_dir, 4, world_size=2)

    _run_together(two_nodes("mode=resume", "train.max_steps=6"), tmp_path / "logs_resume")
    assert _train_steps(run_dir) == [1, 2, 3, 4, 5, 6], "a resumed run continues after its checkpoint, no repeats"
    _assert_complete_checkpoint(run_dir, 6, world_size=2)
