"""A save never waits forever for a slow rank: the barrier times out with an error naming it."""

from __future__ import annotations

import os
import re
import socket

import torch.multiprocessing as mp

SLOW_RANK_DEADLINE_S = 120  # the slow rank waits this long at most for rank 0 to give up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict, rank0_gave_up):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from trm.train.distributed import barrier, init_world

    # generous deadlines everywhere except the barrier under test: on a loaded machine the two
    # ranks may reach the warm-up seconds (tens of seconds) apart
    init_world("cpu", timeout_minutes=SLOW_RANK_DEADLINE_S / 60)
    barrier(SLOW_RANK_DEADLINE_S, "warm-up")
    if rank == 1:
        # The slow rank: it does not reach the barrier until rank 0 has given up on it, so rank 0
        # can only get past its barrier by timing out (no fixed sleep decides the outcome).
        out[rank] = "rank 0 gave up" if rank0_gave_up.wait(SLOW_RANK_DEADLINE_S) else "rank 0 never gave up"
        return
    try:
        barrier(2, "the end of saving step_7")
        out[rank] = "no error"
    except TimeoutError as err:
        out[rank] = str(err)
    finally:
        rank0_gave_up.set()


def test_barrier_times_out_and_names_the_slow_rank():
    with mp.Manager() as manager:
        out, rank0_gave_up = manager.dict(), manager.Event()
        mp.spawn(_worker, args=(_free_port(), out, rank0_gave_up), nprocs=2, join=True)
        result, slow = out[0], out[1]
    assert slow == "rank 0 gave up", "the barrier must give up after its timeout, not wait for the slow rank"
    assert result != "no error", "the barrier passed although rank 1 never arrived"
    assert "the end of saving step_7" in result and "within 2 s" in result, result
    detail = result.split("within 2 s: ", 1)[1]
    assert re.search(r"\bRanks? 1 failed", detail), f"gloo must name rank 1 as the one that did not arrive: {result}"
