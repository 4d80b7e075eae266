"""The row-sharded puzzle table: ~1/W of the rows per rank, lookups and sign-SGD updates equal
to the replicated table (two gloo processes on this CPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trm.model.layers import SparsePuzzleEmbedding
from trm.train.distributed import World
from trm.train.optim import PuzzleEmbeddingSignSGD
from trm.train.puzzle_table import ShardedPuzzleTable, shard_range

NUM_ROWS, DIM, LOCAL_BATCH, STEPS = 37, 6, 5, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _draws(step: int, world_size: int):
    """The global batch of ids (with repeats) and upstream gradients of one step."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, NUM_ROWS, (world_size * LOCAL_BATCH,), generator=g)
    ids[1] = ids[0]  # a repeated id within a rank
    ids[-1] = ids[0]  # and across ranks
    upstream = torch.randn(world_size * LOCAL_BATCH, DIM, generator=g)
    return ids, upstream


def _train(module, optimizer, world_size: int, rank: int | None) -> list[torch.Tensor]:
    """STEPS lookups + backward + sign-SGD; rank None = one process taking the whole global batch."""
    lookups = []
    for step in range(STEPS):
        ids, upstream = _draws(step, world_size)
        mine = slice(None) if rank is None else slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        module.train()
        rows = module(ids[mine])
        lookups.append(rows.detach().clone())
        (rows * upstream[mine]).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return lookups


def _replicated(world_size: int):
    torch.manual_seed(0)
    module = SparsePuzzleEmbedding(NUM_ROWS, DIM, torch.float32)
    module.weights.normal_()
    optimizer = PuzzleEmbeddingSignSGD(module, lr=0.05, weight_decay=0.3)
    # One process sees the whole global batch: the replicated reference.
    return _train(module, optimizer, world_size, None), module.weights


def _worker(rank: int, world_size: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        module = SparsePuzzleEmbedding(NUM_ROWS, DIM, torch.float32)
        module.weights.normal_()
        table = ShardedPuzzleTable(module, World(rank, rank, world_size, torch.device("cpu")))
        optimizer = PuzzleEmbeddingSignSGD(module, lr=0.05, weight_decay=0.3, table=table.shard, row_offset=table.lo)
        lookups = _train(module, optimizer, world_size, rank)
        out[rank] = {"lookups": lookups, "state": table.state_dict(), "placeholder_rows": module.weights.shape[0]}
    finally:
        dist.destroy_process_group()


def test_shard_ranges_partition_the_rows():
    for n, w in [(37, 2), (37, 4), (5, 8), (1_000_000, 8)]:
        ranges = [shard_range(n, r, w) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(hi - lo for lo, hi in ranges) == -(-n // w)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_table_matches_replicated(world_size):
    want_lookups, want_table = _replicated(world_size)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world_size, _free_port(), out), nprocs=world_size, join=True)
        results = dict(out)
    table = torch.zeros(NUM_ROWS, DIM)
    for rank in range(world_size):
        state = results[rank]["state"]
        assert results[rank]["placeholder_rows"] == 0, "the module must not keep the full table"
        assert state["shard"].shape[0] == state["hi"] - state["lo"] <= -(-NUM_ROWS // world_size)
        table[state["lo"]:state["hi"]] = state["shard"]
        for step in range(STEPS):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            assert torch.equal(results[rank]["lookups"][step], want_lookups[step][rows]), f"lookup, step {step}"
    assert torch.equal(table, want_table), "sharded sign-SGD must equal the replicated update row for row"


def test_load_shards_reslices_to_another_world_size():
    module = SparsePuzzleEmbedding(NUM_ROWS, DIM, torch.float32)
    full = torch.randn(NUM_ROWS, DIM)
    saved = [{"num_rows": NUM_ROWS, "lo": lo, "hi": hi, "shard": full[lo:hi]}
             for lo, hi in (shard_range(NUM_ROWS, r, 3) for r in range(3))]
    table = ShardedPuzzleTable(module, World(1, 1, 2, torch.device("cpu")))
    table.load_shards(saved)
    assert torch.equal(table.shard, full[table.lo:table.hi])
    with pytest.raises(ValueError, match="cover"):
        table.load_shards(saved[:1])
