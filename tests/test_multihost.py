"""Multi-node for real: each "node" is a network namespace with its own address (10.231.7.<i> on
interface trm0), hostname (trm-h<i>, which its own /etc/hosts maps to 127.0.1.1 only, like a
Debian install) and view of the filesystem (see tests/netns.py). Nothing here runs on 127.0.0.1:
the rendezvous, the workers' store and gloo must find the other host over the bridge.

Scenarios, each a real short job of a tiny config through a launcher of launch/:
multi_node.sh (train, checkpoint to the shared run_dir, resume; the one-process loss curve),
deepspeed.sh with a hostfile (--no_ssh, node ranks), slurm.sbatch with the variables of a SLURM
allocation (a fake srun that starts one task per host), a host that dies mid-run and comes back
(MAX_RESTARTS, mode=auto: the uninterrupted run's parameters, bit-identical), and a run_dir that
is not shared between the hosts (a clear error at the start, no checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import netns
from conftest import REPO, run_train, write_config
from trm.train import checkpoint as ckpt

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns.usable() is not None, reason=f"no network namespaces here: {netns.usable()}"),
]

LAUNCH = REPO / "launch"
PORT = "29500"  # free in any fresh namespace
LAUNCH_TIMEOUT = 150  # seconds, all hosts of one launch together
# Variables of the test's own environment that a host of a cluster would not have.
FOREIGN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
           "NPROC_PER_NODE", "RDZV_ID", "MAX_RESTARTS", "CUDA_VISIBLE_DEVICES", "DEEPSPEED", "DRY_RUN", "TRM_ROOT",
           "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
TRAIN = {"max_steps": 6, "global_batch_size": 8, "checkpoint_interval": 2, "eval_interval": 6, "keep_last": 3}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class Launch:
    """One launcher process on one host, logging to a file."""

    def __init__(self, host: netns.Host, argv: list[str], env: dict[str, str], log: Path,
                 private_dirs: tuple[Path, ...] = ()):
        self.host, self.argv, self.env, self.log = host, argv, env, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            self.proc = subprocess.Popen(host.command(argv, private_dirs), cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()


def _wait(launches: list[Launch], timeout: float = LAUNCH_TIMEOUT, expect_success: bool = True) -> list[str]:
    """Wait for every launch; on a failure (when success is expected) or the timeout, kill every
    host's processes and fail with the logs' tails. Returns the logs."""
    deadline, problem = time.monotonic() + timeout, None
    while any(launch.proc.poll() is None for launch in launches):
        failed = [launch for launch in launches if launch.proc.poll() not in (None, 0)]
        if expect_success and failed:
            problem = f"{failed[0].host.hostname} exited with {failed[0].proc.returncode}"
            break
        if time.monotonic() > deadline:
            problem = f"timed out after {timeout:.0f} s"
            break
        time.sleep(0.2)
    if problem is None and expect_success and any(launch.proc.returncode != 0 for launch in launches):
        problem = "exit codes " + str([launch.proc.returncode for launch in launches])
    if problem is not None:
        for launch in launches:
            launch.host.kill_all()
            with contextlib.suppress(subprocess.TimeoutExpired):
                launch.proc.wait(timeout=10)
        tails = "\n".join(f"--- {launch.host.hostname}: {shlex.join(launch.argv)}\n{launch.text()[-3000:]}"
                          for launch in launches)
        raise AssertionError(f"{problem}\n{tails}")
    return [launch.text() for launch in launches]


def _series(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def _train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "train/lm_loss" in row]


def _module(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    states = torch.load(ckpt.step_dir(run_dir, step) / "deepspeed" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    return states["module"]


def _assert_two_rank_checkpoint(run_dir: Path, step: int) -> None:
    path = ckpt.step_dir(run_dir, step)
    assert ckpt.is_complete(path), f"{path} is not complete: {sorted(p.name for p in path.glob('*'))}"
    for name in ("trainer_state.pt", "rank_0.pt", "rank_1.pt"):
        assert (path / name).is_file(), f"{path / name} is missing"


def _assert_losses_follow(run_dir: Path, reference: Path, steps: range) -> None:
    got, want = _series(run_dir, "train/lm_loss"), _series(reference, "train/lm_loss")
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"step {step}: {got[step]} vs one process {want[step]}"


def test_hosts_reach_each_other_and_nothing_else(tmp_path):
    """The harness itself: a leftover of a crashed run is removed first; host 1 reaches host 2's
    address over the bridge, under its own hostname; names resolve per host; there is no route
    off the subnet; a private directory is empty on its host only; nothing is left afterwards."""
    subprocess.run(["ip", "netns", "add", f"{netns.PREFIX}-h9"], check=True)  # as if a run had crashed
    (tmp_path / "seen_by_all").write_text("x")
    server_code = ("import socket, sys; s = socket.socket(); s.bind(('10.231.7.2', 29501)); s.listen(); "
                   "c, peer = s.accept(); print(peer[0], c.recv(64).decode())")
    client_code = ("import socket, time\nfor _ in range(100):\n    try:\n"
                   "        c = socket.create_connection(('trm-h2', 29501), timeout=5); break\n"
                   "    except OSError:\n        time.sleep(0.05)\n"
                   "c.sendall(socket.gethostname().encode())")
    with netns.HostNetwork(2) as net:
        assert set(netns.namespaces()) == {net.switch, "trmh-h1", "trmh-h2"}, "the leftover trmh-h9 is gone"
        h1, h2 = net.hosts
        server = subprocess.Popen(h2.command([sys.executable, "-c", server_code]), stdout=subprocess.PIPE, text=True)
        subprocess.run(h1.command([sys.executable, "-c", client_code]), check=True, timeout=60)
        assert server.communicate(timeout=60)[0].split() == ["10.231.7.1", "trm-h1"]
        lookups = subprocess.run(h1.command(["getent", "hosts", "trm-h1", "trm-h2"]), capture_output=True, text=True)
        assert lookups.stdout.split() == ["127.0.1.1", "trm-h1", "10.231.7.2", "trm-h2"]
        off_subnet = subprocess.run(["ip", "-n", h1.namespace, "route", "get", "1.1.1.1"], capture_output=True, text=True)
        assert off_subnet.returncode != 0 and "unreachable" in off_subnet.stderr
        listing = [h.command(["ls", "-A", str(tmp_path)], private_dirs=(tmp_path,) if h is h2 else ()) for h in net.hosts]
        assert [subprocess.run(argv, capture_output=True, text=True).stdout.split() for argv in listing] == [
            ["seen_by_all"], []]
    assert not netns.namespaces()
    assert not list(netns.NETNS_ETC.glob(netns.PREFIX + "-*"))
    assert (tmp_path / "seen_by_all").exists(), "the private directory hid the shared one, it did not replace it"


@pytest.fixture(scope="module")
def network():
    """Two hosts on one bridge for the whole module; removed at the end even after a failure."""
    net = netns.HostNetwork(2)
    yield net
    net.close()


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Whatever a test leaves running on the hosts is killed before the next one."""
    yield
    for namespace in netns.namespaces():
        netns.kill_namespace_processes(namespace)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sudoku_dir) -> Path:
    """One process on this machine, 8 steps: the loss curve every layout must follow."""
    root = tmp_path_factory.mktemp("one_process")
    run_train(str(write_config(root / "cfg.yaml", root / "run", sudoku_dir, {**TRAIN, "max_steps": 8})))
    return root / "run"


def _multi_node(network: netns.HostNetwork, cfg: Path, logs: Path, *overrides: str,
                private_on_second: tuple[Path, ...] = (), **variables: str) -> list[Launch]:
    """launch/multi_node.sh on every host, rendezvous at host 1's bridge address."""
    return [Launch(host, ["bash", str(LAUNCH / "multi_node.sh"), str(cfg), "device=cpu", *overrides],
                   _env(MASTER_ADDR=network.hosts[0].address, MASTER_PORT=PORT, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                        RDZV_ID=logs.name, **variables),
                   logs / f"{host.hostname}.log", private_on_second if rank == 1 else ())
            for rank, host in enumerate(network.hosts)]


@pytest.fixture(scope="module")
def two_host_run(network, tmp_path_factory, sudoku_dir) -> tuple[Path, dict[str, torch.Tensor], list[str]]:
    """multi_node.sh on both hosts, rendezvous at host 1's address: 6 steps (checkpoints 2, 4, 6),
    then a resume to 8. Returns the run_dir, the parameters at step 6 (the uninterrupted run of
    the failure test) and the first launch's logs."""
    root = tmp_path_factory.mktemp("two_hosts")
    cfg = write_config(root / "cfg.yaml", root / "run", sudoku_dir, TRAIN)
    logs = _wait(_multi_node(network, cfg, root / "logs_first"))
    step_6 = _module(root / "run", 6)
    _wait(_multi_node(network, cfg, root / "logs_resume", "mode=resume", "train.max_steps=8"))
    return root / "run", step_6, logs


@pytest.mark.slow
def test_multi_node_two_hosts_train_checkpoint_resume(network, two_host_run, reference_run):
    run_dir, _, logs = two_host_run
    for log in logs:
        assert "--rdzv_endpoint=10.231.7.1:29500" in log, log[-2000:]
        assert "GLOO_SOCKET_IFNAME=trm0" in log, "the launcher picks the interface that reaches MASTER_ADDR"
    assert "--rdzv_conf=is_host=1" in logs[0] and "--rdzv_conf=is_host=0" in logs[1]
    assert "final evaluation" in logs[0]
    assert _train_steps(run_dir) == list(range(1, 9)), "the resume continues after step 6, no step twice"
    _assert_two_rank_checkpoint(run_dir, 6)
    _assert_two_rank_checkpoint(run_dir, 8)
    _assert_losses_follow(run_dir, reference_run, range(1, 9))
    assert _series(run_dir, "train/stream_position") == _series(reference_run, "train/stream_position")


@pytest.mark.slow
def test_deepspeed_hostfile_two_hosts(network, tmp_path, sudoku_dir, reference_run):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, {**TRAIN, "max_steps": 4})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host.hostname} slots=1\n" for host in network.hosts))
    launches = [Launch(host, ["bash", str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hostfile), str(cfg), "--no_ssh",
                              f"--node_rank={rank}", f"--master_addr={network.hosts[0].address}",
                              f"--master_port={PORT}", "device=cpu"], _env(), tmp_path / f"{host.hostname}.log")
                for rank, host in enumerate(network.hosts)]
    logs = _wait(launches)
    assert "GLOO_SOCKET_IFNAME=trm0" in logs[1] and "final evaluation" in logs[0]
    assert _train_steps(run_dir) == [1, 2, 3, 4]
    _assert_two_rank_checkpoint(run_dir, 4)
    _assert_losses_follow(run_dir, reference_run, range(1, 5))


FAKE_SRUN = """#!/usr/bin/env bash
# srun without a controller: one task per host of SLURM_JOB_NODELIST, each in its host's namespace
# with the variables slurmstepd sets for a task. Exits with the first failing task's status.
set -u
while [[ "$1" == -* ]]; do shift; done
hosts=({hosts})
namespaces=({namespaces})
pids=()
for i in "${{!hosts[@]}}"; do
  ip netns exec "${{namespaces[$i]}}" unshare --uts -- sh -c 'hostname "$0" && exec "$@"' "${{hosts[$i]}}" \\
    env SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=${{#hosts[@]}} SLURMD_NODENAME="${{hosts[$i]}}" \\
    SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_STEP_NUM_NODES=${{#hosts[@]}} SLURM_STEP_NUM_TASKS=${{#hosts[@]}} \\
    SLURM_STEP_ID=0 SLURM_TASK_PID=$$ "$@" &
  pids+=($!)
done
status=0
for pid in "${{pids[@]}}"; do
  wait "$pid"
  rc=$?
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
exit $status
"""


@pytest.mark.slow
def test_slurm_allocation_two_hosts(network, tmp_path, sudoku_dir, reference_run):
    """sbatch's view of a 2-node job: slurm.sbatch on the first host, srun (a stand-in that needs no
    controller) starts launch/multi_node.sh once per host with the task variables. The rendezvous
    host, port and node ranks come from SLURM_JOB_NODELIST / SLURM_JOB_ID / SLURM_NODEID alone.
    GLOO_SOCKET_IFNAME is exported as a cluster's job script does: here each host's own name
    resolves to 127.0.1.1, so node 0 cannot find its interface from MASTER_ADDR=trm-h1."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, {**TRAIN, "max_steps": 4})
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "srun").write_text(FAKE_SRUN.format(hosts=" ".join(h.hostname for h in network.hosts),
                                                 namespaces=" ".join(h.namespace for h in network.hosts)))
    (tools / "srun").chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_JOB_NAME": "trm", "SLURM_NNODES": "2",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "trm-h[1-2]", "SLURM_NODELIST": "trm-h[1-2]",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_CPUS_PER_TASK": "1",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_SUBMIT_HOST": network.hosts[0].hostname,
           "SLURM_CLUSTER_NAME": "netns", "GLOO_SOCKET_IFNAME": netns.INTERFACE}
    batch = Launch(network.hosts[0], ["bash", str(LAUNCH / "slurm.sbatch"), str(cfg), "device=cpu"],
                   _env(PATH=f"{tools}:{os.environ['PATH']}", **job), tmp_path / "batch.log")
    (log,) = _wait([batch])
    assert "--rdzv_endpoint=trm-h1:19242" in log, log[-2000:]  # 15000 + 4242 % 20000
    assert "--rdzv_conf=is_host=1" in log and "--rdzv_conf=is_host=0" in log
    assert "final evaluation" in log
    assert _train_steps(run_dir) == [1, 2, 3, 4]
    _assert_two_rank_checkpoint(run_dir, 4)
    _assert_losses_follow(run_dir, reference_run, range(1, 5))


def _wait_until(predicate, launches: list[Launch], what: str, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(launch.proc.poll() is not None for launch in launches) or time.monotonic() > deadline:
            _wait(launches, timeout=0)  # fails with the logs
            raise AssertionError(f"the job ended before {what}")
        time.sleep(0.01)


@pytest.mark.slow
def test_second_host_dies_and_comes_back(network, tmp_path, sudoku_dir, two_host_run):
    """Host 2's processes are killed right after the checkpoint of step 2; host 1's torchrun
    (MAX_RESTARTS=2) restarts its worker and waits in the rendezvous until host 2 runs its launch
    again. Both resume (mode=auto) from the latest complete checkpoint and end with the parameters
    of the uninterrupted two-host run."""
    _, uninterrupted_step_6, _ = two_host_run
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, TRAIN)
    first = _multi_node(network, cfg, tmp_path / "logs", "mode=auto", MAX_RESTARTS="2")
    _wait_until(lambda: ckpt.is_complete(ckpt.step_dir(run_dir, 2)), first, "the checkpoint of step 2")
    killed = network.hosts[1].kill_all()
    assert killed, "host 2 had no processes to kill"
    first[1].proc.wait(timeout=30)
    assert not ckpt.is_complete(ckpt.step_dir(run_dir, 6)), "the run ended before the kill; nothing was tested"
    latest_at_kill = ckpt.find_latest_checkpoint(run_dir).name
    back = Launch(network.hosts[1], first[1].argv, first[1].env, tmp_path / "logs" / "trm-h2.back.log")
    logs = _wait([first[0], back])
    assert "final evaluation" in logs[0]
    final = _module(run_dir, 6)
    assert final.keys() == uninterrupted_step_6.keys()
    for key, value in uninterrupted_step_6.items():
        assert torch.equal(final[key], value), f"{key} differs from the uninterrupted run"
    assert sorted(_train_steps(run_dir)) == list(range(1, 7)), "after the restart the metrics read as one run"
    assert latest_at_kill in ("step_2", "step_4")


@pytest.mark.slow
def test_run_dir_not_shared_is_a_clear_error(network, tmp_path, sudoku_dir):
    """Host 2 sees an empty directory of its own at run_dir (a node-local disk): the job stops at
    the start with one error naming the host, and no checkpoint is written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, TRAIN)
    launches = _multi_node(network, cfg, tmp_path / "logs", private_on_second=(run_dir,))
    logs = _wait(launches, timeout=LAUNCH_TIMEOUT, expect_success=False)
    assert all(launch.proc.returncode != 0 for launch in launches), [launch.proc.returncode for launch in launches]
    assert f"run_dir {run_dir} is not shared between the nodes: rank 1 on trm-h2 cannot see" in logs[0], logs[0][-3000:]
    assert "mounts at the same path" in logs[0]
    assert not ckpt.list_checkpoints(run_dir, complete_only=False), "no checkpoint may be started"
