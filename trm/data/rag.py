"""Retrieval-augmented examples: each query is preceded by its k most similar TRAINING examples,
with their answers, and only the query is supervised.

Sequence of a sample (each part ``S`` = the dataset's seq_len tokens)::

    inputs = [ctx_1 input, ctx_1 answer, ..., ctx_k input, ctx_k answer, query input]   (2k + 1) S
    labels = [ignore ..................................................., query answer]

Similarity of two examples = the number of positions where their INPUT tokens agree (the dot
product of their one-hot encodings, i.e. seq_len minus the Hamming distance). Neighbours are
ranked by (similarity desc, training index asc), so the table is deterministic.

No leakage: a candidate is never in the query's own group (an original puzzle and its stored
augmentations), never has the query's puzzle identifier (unless that is the blank identifier),
and is always a training example. Evaluation queries retrieve from the training split too.

Search: ``exact`` (default) scores every pair with chunked one-hot matmuls and keeps a running
top-k on an integer key; ``faiss`` (``pip install faiss-cpu``, extra ``trm[rag]``) puts the one-hot
vectors (or a seeded random projection of them, ``faiss_dim``) into a flat or IVF index, then
re-ranks the candidates exactly; it asks for more candidates while the k-th one ties with the
last returned, so a flat index (and an IVF index probed exhaustively) gives the exact table.

The tables (training queries, evaluation queries) are computed once and cached as
``<cache>/rag_<split>_<hash>.npy``, the hash covering the data and the search parameters;
``cache`` is ``data.rag.cache_dir``, else ``<data.path>/rag_cache``, else ``<run_dir>/rag_cache``.
With several processes rank 0 computes and writes, the others wait and read.

Training samples are augmented as the base dataset does, the context parts with the query's
transform (so a Sudoku digit permutation maps context and query alike).

Test: ``pytest tests/test_rag.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trm.data.format import DatasetError, SplitData
from trm.data.puzzle_dataset import PuzzleDataset
from trm.ops.reference import IGNORE_LABEL_ID

TABLE_VERSION = 1
"""Bump when the retrieval rule changes, so old cached tables are not reused."""


class FaissMissingError(DatasetError):
    """data.rag.index=faiss but faiss cannot be imported."""


def import_faiss():
    """The faiss module, or FaissMissingError saying how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise FaissMissingError(
            f"data.rag.index=faiss needs the faiss package, which cannot be imported ({err}). Install it with "
            f"`pip install faiss-cpu` (or `pip install trm[rag]`), or use data.rag.index=exact."
        ) from None
    return faiss


# ------------------------------------------------------------------------------------- search
def _one_hot(tokens: np.ndarray, vocab_size: int) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    return torch.nn.functional.one_hot(t, vocab_size).reshape(len(t), -1).to(torch.float32)


def _excluded(q_group: np.ndarray, q_ident: np.ndarray, c_group: np.ndarray, c_ident: np.ndarray, blank_id: int) -> np.ndarray:
    """[Q, C] True where candidate c may not serve query q (same group, or same non-blank identifier).
    Candidates are one list for all queries ([C]) or one per query ([Q, C])."""
    c_group, c_ident = np.atleast_2d(c_group), np.atleast_2d(c_ident)
    same_group = q_group[:, None] == c_group
    same_ident = (q_ident[:, None] == c_ident) & (q_ident[:, None] != blank_id)
    return same_group | same_ident


def _rank_keys(scores: np.ndarray | torch.Tensor, candidates: np.ndarray | torch.Tensor, n: int):
    """Integer keys ordering (score desc, index asc): score * (n + 1) + (n - 1 - index)."""
    return scores * (n + 1) + (n - 1 - candidates)


def _decode(keys: torch.Tensor | np.ndarray, n: int):
    return n - 1 - keys % (n + 1)


def _check_enough(keys: np.ndarray, k: int, what: str, hint: str = "") -> None:
    short = np.flatnonzero((keys < 0).any(-1))
    if len(short):
        raise DatasetError(
            f"data.rag.k={k}, but {what} query {short[0]} has fewer than {k} training examples outside its "
            f"group/puzzle to retrieve{hint}. Lower data.rag.k or use a dataset with more groups."
        )


def exact_neighbors(queries: np.ndarray, q_group: np.ndarray, q_ident: np.ndarray, keys: np.ndarray,
                    k_group: np.ndarray, k_ident: np.ndarray, k: int, vocab_size: int, blank_id: int,
                    chunk_size: int = 1024, key_chunk: int = 4096, what: str = "a") -> np.ndarray:
    """[Q, k] indices into ``keys``: the k most similar allowed rows for each query (exact search,
    ``chunk_size`` queries x ``key_chunk`` keys per matmul)."""
    n = len(keys)
    out = np.empty((len(queries), k), dtype=np.int64)
    for q0 in range(0, len(queries), chunk_size):
        qs = slice(q0, q0 + chunk_size)
        q_oh = _one_hot(queries[qs], vocab_size)
        best = torch.full((q_oh.shape[0], k), -1, dtype=torch.int64)
        for c0 in range(0, n, key_chunk):
            cs = slice(c0, min(c0 + key_chunk, n))
            scores = (q_oh @ _one_hot(keys[cs], vocab_size).T).round().to(torch.int64)
            cand = torch.arange(cs.start, cs.stop, dtype=torch.int64)
            block = _rank_keys(scores, cand[None, :], n)
            block[torch.from_numpy(_excluded(q_group[qs], q_ident[qs], k_group[cs], k_ident[cs], blank_id))] = -1
            best = torch.topk(torch.cat([best, block], dim=1), k, dim=1).values
        chosen = best.numpy()
        _check_enough(chosen, k, what)
        out[qs] = _decode(chosen, n)
    return out


def _embed(tokens: np.ndarray, vocab_size: int, dim: int, seed: int = 0) -> np.ndarray:
    """float32 vectors for faiss: the one-hot encoding (dim 0) or a seeded Gaussian projection of it."""
    if dim == 0:
        return _one_hot(tokens, vocab_size).numpy()
    seq_len = tokens.shape[1]
    proj = np.random.default_rng(np.random.SeedSequence([seed, seq_len, vocab_size, dim])).standard_normal(
        (seq_len, vocab_size, dim), dtype=np.float32) / np.sqrt(seq_len)
    out = np.zeros((len(tokens), dim), dtype=np.float32)
    for pos in range(seq_len):
        out += proj[pos, np.asarray(tokens[:, pos], dtype=np.int64)]
    return out


def faiss_neighbors(queries: np.ndarray, q_group: np.ndarray, q_ident: np.ndarray, keys: np.ndarray,
                    k_group: np.ndarray, k_ident: np.ndarray, k: int, vocab_size: int, blank_id: int,
                    nlist: int = 0, nprobe: int = 8, dim: int = 0, chunk_size: int = 1024, what: str = "a") -> np.ndarray:
    """Like :func:`exact_neighbors`, through a faiss index (flat if ``nlist`` is 0, else IVF)."""
    faiss = import_faiss()
    n = len(keys)
    key_vectors = np.ascontiguousarray(_embed(keys, vocab_size, dim))
    d = key_vectors.shape[1]
    if nlist:
        if nlist > n:
            raise DatasetError(f"data.rag.faiss_nlist={nlist} is larger than the {n} training examples; lower it.")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234
        index.train(key_vectors)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(key_vectors)
    keys_arr = np.asarray(keys)
    out = np.empty((len(queries), k), dtype=np.int64)
    for q0 in range(0, len(queries), chunk_size):
        rows = np.arange(q0, min(q0 + chunk_size, len(queries)))
        q_vectors = np.ascontiguousarray(_embed(queries[rows], vocab_size, dim))
        want = min(n, 2 * k + 8)
        pending = np.arange(len(rows))
        while len(pending):
            scores_f, cand = index.search(q_vectors[pending], want)
            r = rows[pending]
            valid = cand >= 0
            safe = np.where(valid, cand, 0)
            exact = (np.asarray(queries[r])[:, None, :] == keys_arr[safe]).sum(-1)
            allowed = valid & ~_excluded(q_group[r], q_ident[r], k_group[safe], k_ident[safe], blank_id)
            rank = np.where(allowed, _rank_keys(exact, safe, n), -1)
            order = np.argsort(-rank, axis=1, kind="stable")[:, :k]
            chosen = np.take_along_axis(rank, order, 1)
            returned = valid.sum(1)
            last_score = np.take_along_axis(scores_f, np.maximum(returned - 1, 0)[:, None], 1)[:, 0]
            kth_score = np.take_along_axis(scores_f, order[:, -1:], 1)[:, 0]
            exhausted = (returned < want) | (want >= n)
            done = exhausted | ((chosen >= 0).all(1) & (kth_score > last_score))
            finished = pending[done]
            _check_enough(chosen[done], k, what, " among the candidates faiss returned (raise data.rag.faiss_nprobe)" if nlist else "")
            out[rows[finished]] = _decode(chosen[done], n)
            pending = pending[~done]
            want = min(n, 2 * want)
    return out


# ------------------------------------------------------------------------------ the table
def example_groups(split: SplitData) -> np.ndarray:
    """Group index of every example of ``split``."""
    puzzles = split.example_puzzle(np.arange(split.num_examples))
    return np.searchsorted(split.group_indices, puzzles, side="right") - 1


def neighbor_table(base: PuzzleDataset, split: str, rag: Any) -> np.ndarray:
    """[num_examples of ``split``, k] training-example indices retrieved for each example of the
    base dataset's ``split`` ("train" or "eval"), under the search settings ``rag`` (RagConfig)."""
    train = base.train
    meta = train.metadata
    queries = base.train if split == "train" else base.eval
    q_group = example_groups(train) if split == "train" else np.full(queries.num_examples, -1, np.int64)
    q_ident = queries.example_puzzle_identifier(np.arange(queries.num_examples)).astype(np.int64)
    k_group = example_groups(train)
    k_ident = train.example_puzzle_identifier(np.arange(train.num_examples)).astype(np.int64)
    args = (np.asarray(queries.inputs), q_group, q_ident, np.asarray(train.inputs), k_group, k_ident,
            rag.k, meta.vocab_size, meta.blank_identifier_id)
    what = "a training" if split == "train" else "an evaluation"
    if rag.index == "faiss":
        return faiss_neighbors(*args, nlist=rag.faiss_nlist, nprobe=rag.faiss_nprobe, dim=rag.faiss_dim,
                               chunk_size=rag.chunk_size, what=what)
    return exact_neighbors(*args, chunk_size=rag.chunk_size, what=what)


def table_key(base: PuzzleDataset, split: str, rag: Any) -> str:
    """Hash of everything the table of ``split`` depends on: the data and the search settings."""
    h = hashlib.blake2b(digest_size=16)
    params = {"version": TABLE_VERSION, "split": split, "k": rag.k, "index": rag.index,
              "blank": base.train.metadata.blank_identifier_id}
    if rag.index == "faiss":
        params.update(nlist=rag.faiss_nlist, nprobe=rag.faiss_nprobe, dim=rag.faiss_dim)
    h.update(json.dumps(params, sort_keys=True).encode())
    splits = [base.train] if split == "train" else [base.train, base.eval]
    for data in splits:
        for array in (data.inputs, data.puzzle_identifiers, data.puzzle_indices, data.group_indices):
            array = np.asarray(array)
            h.update(f"{array.dtype}{array.shape}".encode())
            for start in range(0, len(array), 65536):
                h.update(np.ascontiguousarray(array[start:start + 65536]).tobytes())
    return h.hexdigest()


def _cache_dirs(cfg: Any) -> list[Path]:
    if cfg.data.rag.cache_dir:
        return [Path(cfg.data.rag.cache_dir)]
    return [Path(cfg.data.path) / "rag_cache", Path(cfg.run_dir) / "rag_cache"]


def cached_table(base: PuzzleDataset, split: str, cfg: Any, compute: bool) -> np.ndarray | None:
    """The cached table of ``split``; computed and written when ``compute`` and not cached yet
    (returns None when neither)."""
    rag = cfg.data.rag
    name = f"rag_{split if split == 'train' else cfg.data.eval_split}_{table_key(base, split, rag)}.npy"
    dirs = _cache_dirs(cfg)
    for directory in dirs:
        if (directory / name).is_file():
            return np.load(directory / name, allow_pickle=False)
    if not compute:
        return None
    table = neighbor_table(base, split, rag)
    errors = []
    for directory in dirs:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f"{name}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, table)
            os.replace(tmp, directory / name)
            return table
        except OSError as err:
            errors.append(f"{directory}: {err.strerror or err}")
    raise DatasetError(f"Cannot write the retrieval table anywhere ({'; '.join(errors)}); set data.rag.cache_dir to a writable directory.")


# ---------------------------------------------------------------------------- the dataset
class RetrievalDataset:
    """A :class:`PuzzleDataset` whose samples carry k retrieved training examples as context."""

    def __init__(self, base: PuzzleDataset, k: int, train_neighbors: np.ndarray, eval_neighbors: np.ndarray):
        if train_neighbors.shape != (base.train.num_examples, k) or eval_neighbors.shape != (base.eval.num_examples, k):
            raise DatasetError(
                f"Retrieval tables of shape {train_neighbors.shape} / {eval_neighbors.shape} do not fit the dataset "
                f"({base.train.num_examples} / {base.eval.num_examples} examples, k={k}); delete the rag_cache and retry."
            )
        self.base, self.k = base, k
        self.train_neighbors, self.eval_neighbors = train_neighbors, eval_neighbors
        self.part_len = base.train.metadata.seq_len
        self.query_slice = slice(2 * k * self.part_len, (2 * k + 1) * self.part_len)
        """Positions of the query inside a sequence (predictions of the answer are read there)."""

    @property
    def model_dims(self) -> dict[str, int]:
        return {**self.base.model_dims, "seq_len": (2 * self.k + 1) * self.part_len}

    @property
    def num_eval_examples(self) -> int:
        return self.base.num_eval_examples

    def _assemble(self, split: SplitData, idx: np.ndarray, neighbors: np.ndarray, positions: np.ndarray | None) -> dict[str, torch.Tensor]:
        train = self.base.train
        ctx = neighbors[idx]                                            # [B, k]
        ctx_in = np.asarray(train.inputs[ctx.reshape(-1)]).reshape(len(idx), self.k, -1)
        ctx_out = np.asarray(train.labels[ctx.reshape(-1)]).reshape(len(idx), self.k, -1)
        q_in, q_out = np.array(split.inputs[idx]), np.array(split.labels[idx])
        if positions is not None:
            parts_in = np.concatenate([ctx_in, q_in[:, None]], 1).reshape(-1, self.part_len)
            parts_out = np.concatenate([ctx_out, q_out[:, None]], 1).reshape(-1, self.part_len)
            parts_in, parts_out = self.base.augment_train(parts_in, parts_out, np.repeat(positions, self.k + 1))
            parts_in = parts_in.reshape(len(idx), self.k + 1, -1)
            parts_out = parts_out.reshape(len(idx), self.k + 1, -1)
            ctx_in, ctx_out, q_in, q_out = parts_in[:, :-1], parts_out[:, :-1], parts_in[:, -1], parts_out[:, -1]
        context = np.stack([ctx_in, ctx_out], 2).reshape(len(idx), -1)   # ctx_1 in, ctx_1 out, ctx_2 in, ...
        labels = q_out.astype(np.int64)
        if split.metadata.ignore_label_id is not None:
            labels[labels == split.metadata.ignore_label_id] = IGNORE_LABEL_ID
        labels = np.concatenate([np.full(context.shape, IGNORE_LABEL_ID, np.int64), labels], 1)
        return {
            "inputs": torch.from_numpy(np.concatenate([context, q_in], 1).astype(np.int32)),
            "labels": torch.from_numpy(labels),
            "puzzle_identifiers": torch.from_numpy(split.example_puzzle_identifier(idx).astype(np.int32)),
        }

    def train_examples(self, global_positions: np.ndarray, step: int | None = None) -> dict[str, torch.Tensor]:
        """Training samples (context + query) at global stream positions, drawn at ``step``."""
        positions = np.asarray(global_positions, dtype=np.int64)
        idx = self.base.train_indices(positions, step)
        return self._assemble(self.base.train, idx, self.train_neighbors, positions)

    def eval_examples(self, example_idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Evaluation samples (context from the training split + query), never augmented."""
        return self._assemble(self.base.eval, np.asarray(example_idx, dtype=np.int64), self.eval_neighbors, None)


def build_retrieval_dataset(base: PuzzleDataset, cfg: Any, is_main: bool, wait) -> RetrievalDataset:
    """Wrap ``base`` per ``cfg.data.rag``: rank 0 loads or computes the tables, ``wait()`` (a
    barrier) lets the others read them."""
    tables = {}
    for split in ("train", "eval"):
        tables[split] = cached_table(base, split, cfg, compute=is_main)
    wait()
    for split in ("train", "eval"):
        if tables[split] is None:
            tables[split] = cached_table(base, split, cfg, compute=True)
    return RetrievalDataset(base, cfg.data.rag.k, tables["train"], tables["eval"])
