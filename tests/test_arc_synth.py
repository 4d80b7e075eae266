"""The synthetic ARC-like task generator: primitives, task shapes, held-out novelty, the builder."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from trm.data import arc_synth
from trm.data.__main__ import main as data_main
from trm.data.arc import decode_grid, load_kaggle_dir
from trm.data.format import load_identifiers, load_split


def test_primitives_on_hand_made_grids():
    grid = np.array([[1, 0, 2], [0, 3, 0]], np.uint8)
    assert arc_synth.apply_step(grid, ("gravity", 0)).tolist() == [[0, 0, 0], [1, 3, 2]]
    assert arc_synth.apply_step(grid, ("gravity", 2)).tolist() == [[1, 2, 0], [3, 0, 0]]
    assert arc_synth.apply_step(grid, ("gravity", 3)).tolist() == [[0, 1, 2], [0, 0, 3]]
    assert arc_synth.apply_step(grid, ("recolour", 2, 7)).tolist() == [[1, 0, 7], [0, 3, 0]]
    assert arc_synth.apply_step(grid, ("cycle", 8)).tolist() == [[9, 0, 1], [0, 2, 0]]
    assert arc_synth.apply_step(grid, ("background", 5)).tolist() == [[1, 5, 2], [5, 3, 5]]
    assert arc_synth.apply_step(grid, ("tile", 1, 2)).tolist() == [[1, 0, 2, 1, 0, 2], [0, 3, 0, 0, 3, 0]]
    blobs = np.array([[1, 1, 0], [0, 0, 4], [0, 4, 4]], np.uint8)
    assert arc_synth.apply_step(blobs, ("largest", 9)).tolist() == [[1, 1, 0], [0, 0, 9], [0, 9, 9]]
    assert arc_synth.run_program(grid, [("dihedral", 2), ("recolour", 1, 6)]).tolist() == [[0, 3, 0], [2, 0, 6]]


def _independent_fingerprint(program, grids) -> bytes:
    digest = hashlib.sha256()
    for g in grids:
        out = arc_synth.run_program(g, program)
        digest.update(bytes(out.shape) + out.tobytes())
    return digest.digest()


def test_tasks_are_well_formed_and_heldout_programs_are_new():
    tasks = arc_synth.generate_tasks(60, 12, 4, seed=5, canvas=8, min_side=2, max_side=4)
    roles = [t.role for t in tasks]
    assert roles.count("train") == 60 and roles.count("heldout") == 12 and roles.count("validation") == 4
    for t in tasks:
        assert 3 <= len(t.task.train) <= 5 and 1 <= len(t.task.test) <= 2
        for inp, out in t.task.train + t.task.test:
            assert np.array_equal(arc_synth.run_program(inp, t.program), out)
            assert not np.array_equal(inp, out)
            assert max(out.shape) <= 8 and 2 <= min(inp.shape) and max(inp.shape) <= 4
    train = [t.program for t in tasks if t.role != "heldout"]
    heldout = [t.program for t in tasks if t.role == "heldout"]
    # By composition: every held-out program is a held-out kind pair, no training program is.
    assert all(len(p) == 2 and (p[0][0], p[1][0]) in arc_synth.HELDOUT_KIND_PAIRS for p in heldout)
    assert not any(len(p) == 2 and (p[0][0], p[1][0]) in arc_synth.HELDOUT_KIND_PAIRS for p in train)
    # By behaviour, on probe grids the generator never saw: no held-out program computes what a
    # training program (or another held-out one) computes.
    rng = np.random.default_rng(99)
    probes = [(rng.integers(1, 10, size=rng.integers(2, 5, size=2)) * (rng.random(1) < 2)).astype(np.uint8) for _ in range(40)]
    probes = [np.where(rng.random(p.shape) < 0.5, p, 0).astype(np.uint8) for p in probes]
    train_prints = {_independent_fingerprint(p, probes) for p in train}
    held_prints = [_independent_fingerprint(p, probes) for p in heldout]
    assert not train_prints & set(held_prints)
    assert len(set(held_prints)) == len(held_prints)
    # Deterministic: same arguments, same tasks.
    again = arc_synth.generate_tasks(60, 12, 4, seed=5, canvas=8, min_side=2, max_side=4)
    assert [t.program for t in again] == [t.program for t in tasks]
    assert all(np.array_equal(a.task.train[0][0], b.task.train[0][0]) for a, b in zip(again, tasks))


def test_builder_cli_writes_an_arc_dataset_on_a_small_canvas_and_kaggle_heldout(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["build", "arc-synth", "--out", str(out), "--train-tasks", "10", "--heldout-tasks", "3",
            "--validation-tasks", "2", "--aug", "2", "--canvas", "6", "--max-side", "3", "--seed", "1"]
    assert data_main(args) == 0
    assert "heldout" in capsys.readouterr().out
    train, test = load_split(out, "train"), load_split(out, "test")
    assert train.metadata.seq_len == 36 and train.metadata.vocab_size == 12
    assert train.num_groups == 12 and test.num_groups == 2          # training + validation tasks; validation tests
    names = load_identifiers(out)
    assert names[0] == "<blank>" and len(names) == train.metadata.num_puzzle_identifiers
    programs = json.loads((out / arc_synth.PROGRAMS_FILE).read_text())
    assert sorted(v["role"] for v in programs.values()).count("heldout") == 3
    heldout = load_kaggle_dir(out / arc_synth.HELDOUT_DIR)[arc_synth.HELDOUT_SUBSET]
    assert len(heldout) == 3 and all(o is not None for t in heldout for _, o in t.test)
    assert not {t.task_id for t in heldout} & set(names)            # held-out tasks are not in the dataset
    # The first training example decodes back to its task's first demonstration input.
    first = next(tid for tid, v in programs.items() if v["role"] == "train")
    assert names[1] == first
    assert decode_grid(train.inputs[0]).shape[0] >= 2
    # Byte-identical rebuild; a non-empty --out without --overwrite is refused.
    again = tmp_path / "again"
    assert data_main([*args[:3], str(again), *args[4:]]) == 0
    for f in sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    assert data_main(args) == 2
    assert "not empty" in capsys.readouterr().err


def test_impossible_requests_fail_clearly(monkeypatch):
    with pytest.raises(arc_synth.SynthError, match="min_side"):
        arc_synth.generate_tasks(1, 1, canvas=3, min_side=2, max_side=4)
    monkeypatch.setattr(arc_synth, "MAX_DRAWS", 3)  # give up after 3 draws in a row without a new program
    with pytest.raises(arc_synth.SynthError, match="distinct heldout programs"):
        arc_synth.generate_tasks(1, 100000, canvas=4, min_side=2, max_side=2)


def test_another_heldout_family_is_kept_out_of_training():
    """heldout_kind_pairs (here the colour-map compositions of the tests' CI-sized proof): held-out
    programs use only those pairs, training programs never, and behaviour is still checked."""
    pairs = arc_synth.COLOUR_KIND_PAIRS
    tasks = arc_synth.generate_tasks(40, 6, 2, seed=3, canvas=4, min_side=2, max_side=2, heldout_kind_pairs=pairs)
    heldout = [t.program for t in tasks if t.role == "heldout"]
    train = [t.program for t in tasks if t.role != "heldout"]
    assert len(heldout) == 6 and all(len(p) == 2 and (p[0][0], p[1][0]) in pairs for p in heldout)
    assert not any(len(p) == 2 and (p[0][0], p[1][0]) in pairs for p in train)
    probes = arc_synth._probe_grids(2)
    assert not {arc_synth.fingerprint(p, probes) for p in train} & {arc_synth.fingerprint(p, probes) for p in heldout}
    for bad in ([("cycle", "cycle")], [("spin", "cycle")], []):
        with pytest.raises(arc_synth.SynthError, match="heldout_kind_pairs"):
            arc_synth.generate_tasks(1, 1, heldout_kind_pairs=bad)
