"""Test-time adaptation (trm.adapt): table growth, frozen parts, exact resume, the submission,
unknown tasks in the service, and adaptation beating no adaptation on held-out synthetic tasks."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, subprocess_env
from trm.adapt import AdaptError, SourceModel, build_adaptation_data, check_adaptable, load_source, load_tasks, run_adaptation
from trm.config import load_config
from trm.data.arc_synth import HELDOUT_DIR, HELDOUT_SUBSET, build_arc_synth
from trm.data.format import load_identifiers, load_split
from trm.eval.arc_vote import validate_submission
from trm.export import PUZZLE_TABLE_KEY
from trm.train import checkpoint as ckpt
from trm.train.puzzle_table import grow_table

pytestmark = pytest.mark.usefixtures("restore_rank_variables")

SYNTH = dict(train_tasks=24, heldout_tasks=6, validation_tasks=2, aug=3, canvas=4, min_side=2, max_side=2, seed=0)
PRETRAIN_STEPS = 300
MODEL = {"hidden_size": 32, "num_heads": 2, "expansion": 2, "H_cycles": 1, "L_cycles": 2, "L_layers": 1,
         "halt_max_steps": 2, "mlp_t": False, "pos_encodings": "rope", "puzzle_emb_len": 1, "puzzle_emb_ndim": 32,
         "forward_dtype": "float32"}
QUIET = ["train.progress_bar=false", "train.plots=false"]


def _pretrain(root: Path) -> Path:
    build_arc_synth(root / "data", **SYNTH)
    cfg = {"run_dir": str(root / "pre"), "seed": 0, "device": "cpu", "model": MODEL, "data": {"path": str(root / "data")},
           "train": {"max_steps": PRETRAIN_STEPS, "global_batch_size": 32, "lr": 3e-3, "lr_warmup_steps": 10,
                     "weight_decay": 0.1, "puzzle_emb_lr": 3e-2, "puzzle_emb_weight_decay": 0.1, "ema": True,
                     "ema_rate": 0.95, "eval_interval": 0, "checkpoint_interval": 0, "log_interval": 50,
                     "progress_bar": False, "plots": False, "eval_halt_max_steps": 4}}
    (root / "pre.yaml").write_text(yaml.safe_dump(cfg))
    from trm.train.__main__ import main as train_main

    assert train_main([str(root / "pre.yaml")]) == 0
    return root / "pre"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny attention TRM pretrained on 24 synthetic tasks (4x4 canvas); the held-out tasks are in
    <root>/data/heldout."""
    return _pretrain(tmp_path_factory.mktemp("adapt"))


@pytest.fixture(scope="module")
def embeddings_run(pretrained, tmp_path_factory) -> tuple[Path, dict]:
    """4 steps of embeddings-only adaptation to the held-out tasks: (run dir, results)."""
    out = tmp_path_factory.mktemp("emb") / "run"
    return out, run_adaptation(pretrained, _heldout(pretrained), out, ["adapt.train=embeddings", "adapt.steps=4", *QUIET])


def _heldout(run: Path) -> Path:
    return run.parent / "data" / HELDOUT_DIR


def _module(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


# ------------------------------------------------------------------------------------------- unit
def test_grow_table_copies_trained_rows_bit_for_bit():
    torch.manual_seed(0)
    table = torch.randn(5, 3)
    for init in ("zeros", "mean", "blank"):
        grown = grow_table(table, 4, init)
        assert grown.shape == (9, 3) and torch.equal(grown[:5], table)
        expected = {"zeros": torch.zeros(3), "mean": table[1:].double().mean(0).float(), "blank": table[0]}[init]
        assert torch.equal(grown[5:], expected.expand(4, 3))
    with pytest.raises(ValueError, match="choose one of"):
        grow_table(table, 1, "random")


def test_task_sources(tmp_path):
    task = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "abc.json").write_text(json.dumps(task))
    (tmp_path / "one" / "def.json").write_text(json.dumps(task))
    tasks = load_tasks(tmp_path / "one")
    assert [t.task_id for t in tasks] == ["abc", "def"] and tasks[0].test[0][1] is None
    (tmp_path / "x_challenges.json").write_text(json.dumps({"t1": task}))
    (tmp_path / "x_solutions.json").write_text(json.dumps({"t1": [[[4]]]}))
    assert load_tasks(tmp_path / "x_challenges.json")[0].test[0][1].tolist() == [[4]]
    with pytest.raises(AdaptError, match="does not exist"):
        load_tasks(tmp_path / "missing")


def test_reference_layout_dataset_gets_rows_after_the_trained_ones(tmp_path, sudoku_dir):
    """A Sudoku/Maze-style dataset with puzzle identifiers: its ids move past the trained rows."""
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.path={tmp_path / 'nowhere'}", "train.max_steps=1"])
    source = SourceModel(tmp_path, cfg, {}, {"seq_len": 81, "vocab_size": 11, "num_puzzle_identifiers": 7}, 0)
    new_rows = build_adaptation_data(tmp_path / "adapted", sudoku_dir, source, aug=0, seed=0)
    original = load_split(sudoku_dir, "train")
    adapted = load_split(tmp_path / "adapted", "train")
    assert new_rows == original.metadata.num_puzzle_identifiers - 1
    assert np.array_equal(adapted.puzzle_identifiers, np.where(original.puzzle_identifiers > 0, original.puzzle_identifiers + 6, 0))
    assert adapted.metadata.num_puzzle_identifiers == 7 + new_rows
    assert len(load_identifiers(tmp_path / "adapted")) == 7 + new_rows
    assert np.array_equal(adapted.inputs, original.inputs)
    source.model_dims["vocab_size"] = 12
    with pytest.raises(AdaptError, match="trained on 81 / 12"):
        build_adaptation_data(tmp_path / "again", sudoku_dir, source, aug=0, seed=0)


def test_a_model_without_puzzle_embeddings_has_nothing_to_adapt(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.path=x", "train.max_steps=1", "model.puzzle_emb_ndim=0"])
    with pytest.raises(AdaptError, match="nothing to adapt.*python -m trm.evaluate"):
        check_adaptable(SourceModel(tmp_path, cfg, {}, {}, 0))


# ---------------------------------------------------------------------------------- adaptation
def test_embeddings_adaptation_freezes_the_network_and_the_trained_rows(pretrained, embeddings_run):
    source = load_source(pretrained)
    trained = source.model_dims["num_puzzle_identifiers"]
    out, results = embeddings_run
    final = _module(ckpt.find_latest_checkpoint(out))
    table = final[PUZZLE_TABLE_KEY]
    assert table.shape[0] == trained + results["new_rows"]
    assert torch.equal(table[:trained], source.weights[PUZZLE_TABLE_KEY])          # trained rows: bit-identical
    start = grow_table(source.weights[PUZZLE_TABLE_KEY], results["new_rows"], "mean")
    assert not torch.equal(table[trained:], start[trained:])                        # the new rows learned
    for name, value in source.weights.items():                                      # the network: bit-identical
        if name != PUZZLE_TABLE_KEY:
            assert torch.equal(final[name], value), name
    # Every identifier of the adaptation data is a new row.
    for split in ("train", "test"):
        ids = load_split(out / "data", split).puzzle_identifiers
        assert ids.min() >= trained
    with pytest.raises(AdaptError, match="another source / task set / setting"):
        run_adaptation(pretrained, _heldout(pretrained), out, ["adapt.train=full", "adapt.steps=4", *QUIET])


def _adapt_cmd(source: Path, tasks: Path, out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "trm.adapt", str(source), "--tasks", str(tasks), "--out", str(out), *overrides]


def test_full_adaptation_kill_and_resume_is_bit_identical(pretrained, tmp_path):
    overrides = ["adapt.train=full", "adapt.steps=4", "adapt.checkpoint_interval=2", "adapt.lr=1e-3", *QUIET]
    whole = tmp_path / "whole"
    run_adaptation(pretrained, _heldout(pretrained), whole, overrides)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_adapt_cmd(pretrained, _heldout(pretrained), killed, overrides), cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not ckpt.is_complete(ckpt.step_dir(killed, 2)):
            assert proc.poll() is None, f"the adaptation ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint within the deadline"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not ckpt.is_complete(ckpt.step_dir(killed, 4)), "the kill came after the end"
    run_adaptation(pretrained, _heldout(pretrained), killed, overrides)               # the same command resumes
    a, b = ckpt.step_dir(whole, 4), ckpt.step_dir(killed, 4)
    sa, sb = (torch.load(p / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False) for p in (a, b))
    for name in sa["module"]:
        assert torch.equal(sa["module"][name], sb["module"][name]), name
    for key, state in sa["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["optimizer"]["state"][key][field])), (key, field)
    ta, tb = (torch.load(p / "trainer_state.pt", map_location="cpu", weights_only=False) for p in (a, b))
    assert ta["stream_position"] == tb["stream_position"] and ta["step"] == tb["step"] == 4
    assert all(torch.equal(ta["ema"][k], tb["ema"][k]) for k in ta["ema"])
    assert (whole / "submission.json").read_bytes() == (killed / "submission.json").read_bytes()
    # full adaptation trains the network, and still never the trained rows
    source = load_source(pretrained)
    trained = source.model_dims["num_puzzle_identifiers"]
    assert torch.equal(sa["module"][PUZZLE_TABLE_KEY][:trained], source.weights[PUZZLE_TABLE_KEY])
    assert any(not torch.equal(sa["module"][k], v) for k, v in source.weights.items() if k != PUZZLE_TABLE_KEY)


def test_submission_is_complete_for_tasks_without_known_outputs(pretrained, tmp_path, capsys):
    tasks = tmp_path / "hidden"
    tasks.mkdir()
    shutil.copy(_heldout(pretrained) / f"{HELDOUT_SUBSET}_challenges.json", tasks / "hidden_challenges.json")  # no solutions
    out = tmp_path / "sub"
    from trm.adapt.__main__ import main as adapt_main

    assert adapt_main([str(pretrained), "--tasks", str(tasks), "--out", str(out), "adapt.steps=1", *QUIET]) == 0
    challenges = json.loads((tasks / "hidden_challenges.json").read_text())
    validate_submission(out / "submission.json", {tid: len(t["test"]) for tid, t in challenges.items()}, attempts=2)
    results = json.loads((out / "adapt_results.json").read_text())
    assert results["after"]["arc/tasks_scored"] == 0 and results["steps"] == 1
    assert "submission:" in capsys.readouterr().out


def test_the_service_names_unknown_tasks_and_serves_adapted_ones(pretrained, embeddings_run):
    import httpx

    from test_serve import LiveServer
    from trm.serve import build_service

    out, _ = embeddings_run
    challenges = json.loads((_heldout(pretrained) / f"{HELDOUT_SUBSET}_challenges.json").read_text())
    task_id = sorted(challenges)[0]
    grid = challenges[task_id]["test"][0]["input"]
    live = {}
    for name, run in (("source", pretrained), ("adapted", out)):
        live[name] = LiveServer(build_service(run, device="cpu", poll_seconds=60))
    try:
        with httpx.Client(base_url=live["source"].url, timeout=60) as client:
            reply = client.post("/v1/solve", json={"task": "arc", "task_id": task_id, "grid": grid})
            assert reply.status_code == 404 and "python -m trm.adapt" in reply.json()["error"]["message"]
            reply = client.post("/v1/solve", json={"task": "arc", "grid": grid})
            assert reply.status_code == 422 and "task_id" in reply.json()["error"]["message"]
        with httpx.Client(base_url=live["adapted"].url, timeout=60) as client:
            reply = client.post("/v1/solve", json={"task": "arc", "task_id": task_id, "grid": grid})
            assert reply.status_code == 200, reply.text
            assert np.asarray(reply.json()["grid"]).ndim == 2
    finally:
        for server in live.values():
            server.close()


def test_adaptation_beats_no_adaptation_on_heldout_tasks(pretrained, tmp_path):
    """Held-out programs (compositions never trained), mean row (no adaptation) against 80 steps of
    full adaptation on their demonstrations: the answers' cells get clearly better (a CI-sized model;
    the README's proof, a larger one, shows pass@2)."""
    full = run_adaptation(pretrained, _heldout(pretrained), tmp_path / "full",
                          ["adapt.train=full", "adapt.steps=80", "adapt.lr=3e-3", "adapt.puzzle_emb_lr=3e-2",
                           "adapt.checkpoint_interval=0", *QUIET])
    before, after = full["before"], full["after"]  # before: the same rows and network, 0 steps (no adaptation)
    assert before["arc/tasks_scored"] == after["arc/tasks_scored"] == SYNTH["heldout_tasks"]
    summary = {k: (round(before[k], 3), round(after[k], 3)) for k in ("arc/pass@2", "exact_accuracy", "token_accuracy")}
    assert after["token_accuracy"] >= before["token_accuracy"] + 0.1, summary
    assert after["exact_accuracy"] >= before["exact_accuracy"], summary
