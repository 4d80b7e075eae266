"""Is the run directory one directory for every rank? (Several nodes must share it.)

Every rank writes its part of each checkpoint (``rank_<r>.pt``, its DeepSpeed shards) under
``run_dir`` and reads them back on resume, so on several machines ``run_dir`` has to be on storage
that all of them mount at the same path (NFS, Lustre, GPFS, ...). A node-local disk there gives
checkpoints that look complete on node 0 but lack the other nodes' files, and resumes in which
the nodes disagree on the step. ``check_shared_run_dir`` catches that before the first save or
load; ``missing_rank_files`` is the last guard before a checkpoint is committed.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from trm.train.checkpoint import CheckpointError
from trm.train.distributed import World

PROBE = ".trm_shared_probe"
SETTLE_S = 5.0  # a rank that does not see rank 0's probe yet looks again for this long (NFS caches)

HOW_TO_FIX = ("run_dir must be a directory on storage that every node mounts at the same path (NFS, Lustre, "
              "GPFS, ...): every rank writes its part of each checkpoint there and reads it back on resume. "
              "Set run_dir=<such a path>.")


def _sees(probe: Path, token: str, settle_s: float) -> bool:
    deadline = time.monotonic() + settle_s
    while True:
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_shared_run_dir(run_dir: str | Path, world: World, settle_s: float = SETTLE_S) -> None:
    """Raise CheckpointError on every rank unless every rank sees the file rank 0 writes into
    ``run_dir`` (a no-op for one process)."""
    if world.size == 1 or not dist.is_initialized():
        return
    run_dir = Path(run_dir)
    probe = run_dir / PROBE
    token = [None]
    if world.is_main:
        token[0] = f"{socket.gethostname()} {os.getpid()} {time.time_ns()}"
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = probe.with_name(PROBE + ".tmp")
        tmp.write_text(token[0])
        os.replace(tmp, probe)
    dist.broadcast_object_list(token, src=0)
    seen = world.is_main or _sees(probe, token[0], settle_s)
    views: list = [None] * world.size
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if world.is_main:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        ranks = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        raise CheckpointError(
            f"run_dir {run_dir} is not shared between the nodes: {ranks} cannot see the file {PROBE} that rank 0 "
            f"(on {views[0][1]}) wrote there. {HOW_TO_FIX}"
        )


def missing_rank_files(path: Path, world_size: int) -> list[str]:
    """The ``rank_<r>.pt`` files of a checkpoint folder that are not (visible) there."""
    return [f"rank_{r}.pt" for r in range(world_size) if not (path / f"rank_{r}.pt").is_file()]
