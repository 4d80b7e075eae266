"""Retrieval-augmented dataset: exact search = brute force, faiss agrees, no leakage, only the
query supervised, deterministic cached tables, and a tiny run + evaluation end to end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import run_train, write_config
from trm.data import rag as rag_module
from trm.data.format import DatasetError
from trm.data.rag import example_groups, exact_neighbors, faiss_neighbors
from trm.data.sudoku import augment_at
from trm.evaluate import main as evaluate_main


def _random_problem(rng, n_keys=37, n_queries=11, seq_len=13, vocab=4):
    keys = rng.integers(0, vocab, (n_keys, seq_len))
    queries = rng.integers(0, vocab, (n_queries, seq_len))
    queries[:3] = keys[[5, 5, 20]]  # exact duplicates of keys: must still skip the query's own group
    k_group = np.sort(rng.integers(0, 12, n_keys))
    k_ident = rng.integers(0, 4, n_keys)  # identifier 0 is the blank one (never excluded on its own)
    q_group = rng.integers(-1, 12, n_queries)
    q_ident = rng.integers(0, 4, n_queries)
    return queries, q_group, q_ident, keys, k_group, k_ident


def _brute_force(queries, q_group, q_ident, keys, k_group, k_ident, k, blank=0):
    out = []
    for q in range(len(queries)):
        ranked = []
        for j in range(len(keys)):
            if k_group[j] == q_group[q] or (k_ident[j] == q_ident[q] and q_ident[q] != blank):
                continue
            ranked.append((-int((queries[q] == keys[j]).sum()), j))
        out.append([j for _, j in sorted(ranked)[:k]])
    return np.array(out)


def test_exact_search_equals_brute_force_with_ties_and_chunks(rng):
    problem = _random_problem(rng)
    for k in (1, 4):
        want = _brute_force(*problem, k)
        got = exact_neighbors(*problem, k=k, vocab_size=4, blank_id=0, chunk_size=3, key_chunk=5)
        np.testing.assert_array_equal(got, want)


def test_exact_search_says_when_a_query_has_too_few_candidates():
    keys = np.zeros((4, 3), np.int64)
    with pytest.raises(DatasetError, match="fewer than 3 training examples outside its group"):
        exact_neighbors(keys[:1], np.array([0]), np.array([0]), keys, np.array([0, 0, 1, 1]), np.zeros(4, np.int64),
                        k=3, vocab_size=2, blank_id=0)


def test_faiss_search_agrees_with_exact_search(tmp_path, sudoku_dir, rng):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional extra trm[rag])")
    problem = _random_problem(rng, n_keys=120, n_queries=25, seq_len=9, vocab=3)  # many ties
    want = exact_neighbors(*problem, k=5, vocab_size=3, blank_id=0)
    flat = faiss_neighbors(*problem, k=5, vocab_size=3, blank_id=0, chunk_size=7)
    ivf = faiss_neighbors(*problem, k=5, vocab_size=3, blank_id=0, nlist=4, nprobe=4)
    np.testing.assert_array_equal(flat, want)
    np.testing.assert_array_equal(ivf, want)
    projected = faiss_neighbors(*problem, k=5, vocab_size=3, blank_id=0, nlist=4, nprobe=2, dim=16)
    queries, q_group, q_ident, keys, k_group, k_ident = problem
    assert projected.shape == (25, 5) and (projected >= 0).all() and (projected < 120).all()
    assert not (k_group[projected] == q_group[:, None]).any(), "approximate search leaked the query's group"
    for row in projected:
        assert len(set(row.tolist())) == 5

    exact_ds = _rag_dataset(tmp_path, sudoku_dir, k=3)
    faiss_ds = _rag_dataset(tmp_path, sudoku_dir, k=3, index="faiss", faiss_nlist=4, faiss_nprobe=4)
    np.testing.assert_array_equal(faiss_ds.train_neighbors, exact_ds.train_neighbors)
    np.testing.assert_array_equal(faiss_ds.eval_neighbors, exact_ds.eval_neighbors)
    assert len(list((tmp_path / "cache").iterdir())) == 4, "faiss and exact tables are cached under different keys"


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(rag_module.FaissMissingError, match="pip install faiss-cpu"):
        rag_module.import_faiss()


def _rag_dataset(tmp_path, sudoku_dir, k=2, **rag):
    from trm.config import load_config
    from trm.factories import build_dataset
    from trm.train.distributed import World

    cfg = load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir),
                      [f"data.rag.k={k}", f"data.rag.cache_dir={tmp_path / 'cache'}"] + [f"data.rag.{a}={b}" for a, b in rag.items()])
    return build_dataset(cfg, World(0, 0, 1, torch.device("cpu")))


def test_samples_have_context_from_other_groups_and_only_the_query_is_supervised(tmp_path, sudoku_dir, rng):
    ds = _rag_dataset(tmp_path, sudoku_dir, k=2)
    base, train, S = ds.base, ds.base.train, 81
    assert ds.model_dims["seq_len"] == 5 * S and ds.model_dims["vocab_size"] == base.model_dims["vocab_size"]

    groups = example_groups(train)
    assert ds.train_neighbors.shape == (train.num_examples, 2)
    assert not (groups[ds.train_neighbors] == groups[:, None]).any(), "a training query retrieved its own group"
    np.testing.assert_array_equal(ds.train_neighbors, exact_neighbors(
        np.asarray(train.inputs), groups, np.zeros(train.num_examples, np.int64), np.asarray(train.inputs), groups,
        np.zeros(train.num_examples, np.int64), 2, 11, 0))

    positions = rng.integers(0, 10_000, 7)
    sample = ds.train_examples(positions, step=1)
    plain = base.train_examples(positions)
    np.testing.assert_array_equal(sample["inputs"][:, 4 * S:].numpy(), plain["inputs"].numpy())
    np.testing.assert_array_equal(sample["labels"][:, 4 * S:].numpy(), plain["labels"].numpy())
    assert (sample["labels"][:, :4 * S] == -100).all(), "context positions must not be supervised"
    idx = base.train_indices(positions)
    for slot in range(2):
        nb = ds.train_neighbors[idx, slot]
        ctx_in, ctx_out = augment_at(np.array(train.inputs[nb]), np.array(train.labels[nb]), base.seed, positions)
        np.testing.assert_array_equal(sample["inputs"][:, 2 * slot * S:(2 * slot + 1) * S].numpy(), ctx_in)
        np.testing.assert_array_equal(sample["inputs"][:, (2 * slot + 1) * S:(2 * slot + 2) * S].numpy(), ctx_out)

    evaluation = ds.eval_examples(np.arange(base.num_eval_examples))
    test_inputs = {bytes(row) for row in np.asarray(base.eval.inputs)}
    np.testing.assert_array_equal(evaluation["inputs"][:, 4 * S:].numpy(), np.asarray(base.eval.inputs))
    assert (evaluation["labels"][:, :4 * S] == -100).all()
    for part in range(4):
        rows = evaluation["inputs"][:, part * S:(part + 1) * S].numpy().astype(np.uint8)
        assert not any(bytes(row) in test_inputs for row in rows), "a test example was used as context"
    np.testing.assert_array_equal(evaluation["inputs"][:, :S].numpy(), np.asarray(train.inputs)[ds.eval_neighbors[:, 0]])
    np.testing.assert_array_equal(evaluation["inputs"][:, S:2 * S].numpy(), np.asarray(train.labels)[ds.eval_neighbors[:, 0]])


def test_tables_are_cached_keyed_by_parameters_and_deterministic(tmp_path, sudoku_dir, monkeypatch):
    first = _rag_dataset(tmp_path, sudoku_dir, k=2)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].startswith("rag_test_") and files[1].startswith("rag_train_")

    def no_search(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(rag_module, "neighbor_table", no_search)
    again = _rag_dataset(tmp_path, sudoku_dir, k=2)
    np.testing.assert_array_equal(again.train_neighbors, first.train_neighbors)
    with pytest.raises(AssertionError, match="cached table"):
        _rag_dataset(tmp_path, sudoku_dir, k=1)  # another k is another table
    monkeypatch.undo()
    (tmp_path / "other").mkdir()
    fresh = _rag_dataset(tmp_path / "other", sudoku_dir, k=2)
    np.testing.assert_array_equal(fresh.train_neighbors, first.train_neighbors)
    np.testing.assert_array_equal(fresh.eval_neighbors, first.eval_neighbors)


def test_rag_run_trains_and_evaluates_end_to_end(tmp_path, sudoku_dir, restore_rank_variables):
    """k=1: sequences of 3 x 81 tokens; the evaluator reproduces the logged numbers."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, {"max_steps": 3, "eval_interval": 3})
    run_train(str(cfg), "data.rag.k=1", f"data.rag.cache_dir={tmp_path / 'cache'}")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/token_accuracy" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval/count"] == 8
    module = torch.load(run_dir / "checkpoints" / "step_3" / "deepspeed" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert any(v.ndim == 2 and 3 * 81 + 2 in v.shape for v in module.values()), \
        "the model was not built for the longer (2k + 1) x 81 sequence"

    assert evaluate_main([str(run_dir), f"out={tmp_path / 'eval.json'}"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["step"] == 3
    for key, value in result["metrics"].items():
        assert value == evals[0][key], key
