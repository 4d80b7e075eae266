"""The puzzle-embedding table sharded by rows across ranks.

ARC's table has ~1M rows (about 2 GB in fp32); the reference replicates it on every GPU. Here
rank r holds rows ``[r * P, min(N, (r + 1) * P))`` with ``P = ceil(N / W)``, so each rank
stores ~1/W of it. A lookup is collective (every rank calls it with the same local batch size):

    ids_G = all_gather(ids_B)                    # rank-major, G = W * B
    rows_GE[i] = shard[ids_G[i] - lo] if rank owns ids_G[i] else 0
    all_reduce(rows_GE, SUM)                     # each row has exactly one owner
    return rows_GE[rank * B : (rank + 1) * B]

The sign-SGD update (``PuzzleEmbeddingSignSGD`` with ``table=shard, row_offset=lo``) gathers
every rank's ids and gradients, sums equal ids, and each rank updates the rows it owns: the
same arithmetic as the replicated table, row for row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trm.train.distributed import World, all_gather_cat


def shard_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` owned by ``rank``."""
    per_rank = -(-num_rows // world_size)
    lo = min(num_rows, rank * per_rank)
    return lo, min(num_rows, lo + per_rank)


class ShardedPuzzleTable:
    """Takes over a ``SparsePuzzleEmbedding``'s table: keeps this rank's rows, frees the rest,
    and installs a collective ``lookup`` on the module."""

    def __init__(self, module: torch.nn.Module, world: World):
        full = module.weights
        self.num_rows, self.dim = full.shape
        self.world = world
        self.lo, self.hi = shard_range(self.num_rows, world.rank, world.size)
        self.shard = full[self.lo:self.hi].clone()
        module.weights = full.new_empty((0, self.dim))  # the module keeps an empty placeholder
        module.lookup = self.lookup

    def lookup(self, ids_B: torch.Tensor) -> torch.Tensor:
        batch = ids_B.shape[0]
        ids_G = all_gather_cat(ids_B.to(torch.int64))
        local = ids_G - self.lo
        owned = (local >= 0) & (local < self.shard.shape[0])
        rows_GE = torch.zeros(ids_G.shape[0], self.dim, dtype=self.shard.dtype, device=self.shard.device)
        rows_GE[owned] = self.shard[local[owned]]
        if dist.is_initialized() and self.world.size > 1:
            dist.all_reduce(rows_GE)
        start = self.world.rank * batch
        return rows_GE[start:start + batch]

    def state_dict(self) -> dict:
        return {"num_rows": self.num_rows, "lo": self.lo, "hi": self.hi, "shard": self.shard.detach().cpu()}

    def load_shards(self, shards: list[dict]) -> None:
        """Restore this rank's rows from saved shards (any world size; each shard covers ``[lo, hi)``)."""
        covered = 0
        for saved in shards:
            if saved["num_rows"] != self.num_rows:
                raise ValueError(f"the checkpoint's puzzle table has {saved['num_rows']} rows; this model has {self.num_rows}")
            lo, hi = max(self.lo, saved["lo"]), min(self.hi, saved["hi"])
            if lo < hi:
                self.shard[lo - self.lo:hi - self.lo] = saved["shard"][lo - saved["lo"]:hi - saved["lo"]].to(self.shard.device)
                covered += hi - lo
        if covered != self.hi - self.lo:
            raise ValueError(f"the checkpoint's shards cover {covered} of this rank's {self.hi - self.lo} rows")


GROWTH_INITS = ("zeros", "mean", "blank")
"""How :func:`grow_table` initialises new rows (``adapt.init``)."""


def grow_table(table: torch.Tensor, new_rows: int, init: str = "mean", blank_row: int = 0) -> torch.Tensor:
    """The table [N, E] with ``new_rows`` rows appended: [N + new_rows, E].

    Rows ``0..N-1`` are copied bit for bit (the trained rows); the new ones are ``zeros`` (the
    reference's initialisation of every row), the ``mean`` of the trained rows other than the
    blank one (the typical puzzle; zeros when there is no other row), or a copy of the ``blank``
    row (what an unknown puzzle is looked up as).
    """
    if init not in GROWTH_INITS:
        raise ValueError(f"unknown puzzle-row init {init!r}; choose one of {', '.join(GROWTH_INITS)}")
    if new_rows < 0:
        raise ValueError(f"new_rows must be >= 0, got {new_rows}")
    num_rows, dim = table.shape
    grown = table.new_zeros((num_rows + new_rows, dim))
    grown[:num_rows] = table
    if new_rows and init == "mean":
        trained = torch.cat([table[:blank_row], table[blank_row + 1:]])
        if len(trained):
            grown[num_rows:] = trained.mean(dim=0, dtype=torch.float64).to(table.dtype)
    elif new_rows and init == "blank":
        grown[num_rows:] = table[blank_row]
    return grown
