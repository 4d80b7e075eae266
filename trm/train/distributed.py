"""Process-group setup shared by plain python, torchrun and the deepspeed launcher.

Ranks come from the environment (RANK, LOCAL_RANK, WORLD_SIZE; SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS when only SLURM's are set). A plain ``python -m trm.train`` is a world of one
on a free loopback port. CPU runs use gloo, GPU runs NCCL.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_LOCALID": "LOCAL_RANK", "SLURM_NTASKS": "WORLD_SIZE"}


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was requested but no CUDA device is visible; use device=cpu or device=auto.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


_CONTROL_GROUP = None


def init_world(requested_device: str, timeout_minutes: float = 30.0) -> World:
    """Fill missing rank variables, pick the device, and start the process group (idempotent)."""
    for slurm, torch_name in SLURM_TO_TORCH.items():
        if torch_name not in os.environ and slurm in os.environ:
            os.environ[torch_name] = os.environ[slurm]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with torchrun or deepspeed.")
        os.environ["MASTER_PORT"] = str(_free_port())
    rank, local_rank, size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        import deepspeed

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # After an elastic restart the agent's store still holds the dead workers' addresses
            # under the same keys; a per-attempt prefix keeps the new group from dialling them.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=size,
                                  is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"trm/attempt_{restart}", store),
                                    rank=rank, world_size=size, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    global _CONTROL_GROUP
    if size > 1 and _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return World(rank, local_rank, size, device)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0 (identity for one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum a dict of scalar tensors across ranks (one collective)."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    packed = torch.stack([values[k].detach().to(torch.float64).reshape(()) for k in keys])
    dist.all_reduce(packed)
    return dict(zip(keys, packed.unbind()))


def barrier(timeout_s: float | None = None, what: str = "") -> None:
    """Wait for every rank. With ``timeout_s``, a rank that does not arrive in time raises
    TimeoutError naming it (gloo's monitored barrier on a control group, also under NCCL)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if timeout_s is None or _CONTROL_GROUP is None:
        dist.barrier()
        return
    try:
        dist.monitored_barrier(group=_CONTROL_GROUP, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as err:
        raise TimeoutError(f"not every rank reached {what or 'the barrier'} within {timeout_s:.0f} s: "
                           f"{str(err).splitlines()[0]}") from None
