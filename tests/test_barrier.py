"""A save never waits forever for a slow rank: the barrier times out with an error naming it."""

from __future__ import annotations

import os
import socket
import time

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from trm.train.distributed import barrier, init_world

    init_world("cpu", timeout_minutes=1)
    barrier(30, "warm-up")
    if rank == 1:
        time.sleep(6)  # the slow rank
        out[rank] = "slept"
        return
    started = time.time()
    try:
        barrier(2, "the end of saving step_7")
        out[rank] = "no error"
    except TimeoutError as err:
        out[rank] = (str(err), time.time() - started)


def test_barrier_times_out_and_names_the_slow_rank():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        result = out[0]
    assert result != "no error"
    message, waited = result
    assert "the end of saving step_7" in message and "2 s" in message
    assert "1" in message.split(":", 1)[1], message  # gloo names the rank that did not arrive
    assert waited < 5.5, "the barrier must give up after its timeout, not wait for the slow rank"
