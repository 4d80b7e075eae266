"""Early-exit evaluation and ``python -m trm.evaluate``: the numbers equal what the trainer logged
(1 and 2 processes, our checkpoints and reference-format state dicts), clear errors otherwise."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_train, subprocess_env, write_config
from trm.evaluate import main as evaluate_main

TRAIN = {"max_steps": 6, "eval_interval": 3, "checkpoint_interval": 3, "eval_batch_size": 4}


pytestmark = pytest.mark.usefixtures("restore_rank_variables")  # in-process trainers set RANK etc.


def _logged_evals(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows if "eval/count" in r}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, sudoku_dir) -> Path:
    """6 steps, EMA on, evaluated and checkpointed at steps 3 and 6."""
    root = tmp_path_factory.mktemp("evaluate")
    run_train(str(write_config(root / "cfg.yaml", root / "run", sudoku_dir, TRAIN)))
    return root / "run"


def test_early_exit_metrics_follow_each_sample_first_halt(tmp_path, sudoku_dir):
    """Both policies of one evaluation pass against a per-sample replay: run all steps, or stop at
    the first q_halt > 0 (padded last batch included)."""
    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    train = {"eval_batch_size": 3, "eval_halt_max_steps": 5}
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, train), ["data.eval_max_examples=11"])
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    model = build_model_for(cfg, dataset.model_dims, world)
    with torch.no_grad():  # a halting head that says "stop" for some samples at some steps
        model.inner.q_head.weight.normal_(0.0, 0.3)
        model.inner.q_head.bias.fill_(-0.3)
    trainer = build_trainer(cfg, world, model, dataset)
    got = trainer.evaluate()

    max_steps, exact_at, token_at, halt_at = 5, [], [], []
    model.eval()
    with torch.no_grad():
        for first in range(0, 11, 3):
            rows = np.array([i if i < 11 else 0 for i in range(first, first + 3)])
            batch = dataset.eval_examples(rows)
            carry = model.initial_carry(batch)
            per_step = []
            for _ in range(max_steps):
                carry, out = model(carry, batch)
                carry.halted = torch.zeros_like(carry.halted)
                mask = batch["labels"] != -100
                correct = (out["logits"].argmax(-1) == batch["labels"]) & mask
                per_step.append((correct.sum(-1) == mask.sum(-1), correct.sum(-1) / mask.sum(-1), out["q_halt_logits"] > 0))
            for j, row in enumerate(rows):
                if first + j < 11:
                    exact_at.append([bool(s[0][j]) for s in per_step])
                    token_at.append([float(s[1][j]) for s in per_step])
                    halt_at.append([bool(s[2][j]) for s in per_step])
    stop = [next((t for t in range(max_steps) if halts[t]), max_steps - 1) for halts in halt_at]
    want = {
        "eval/exact_accuracy": np.mean([e[-1] for e in exact_at]),
        "eval/token_accuracy": np.mean([t[-1] for t in token_at]),
        "eval/early_exit/exact_accuracy": np.mean([e[s] for e, s in zip(exact_at, stop)]),
        "eval/early_exit/token_accuracy": np.mean([t[s] for t, s in zip(token_at, stop)]),
        "eval/early_exit/steps": np.mean(stop) + 1,
    }
    assert 1.0 < want["eval/early_exit/steps"] < max_steps, "the replay must exercise early exit"
    assert got["eval/count"] == 11 and got["eval/steps"] == max_steps
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_evaluate_reproduces_the_logged_metrics(tiny_run, tmp_path):
    logged = _logged_evals(tiny_run)
    proc = subprocess.run([sys.executable, "-m", "trm.evaluate", str(tiny_run)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tiny_run / "eval" / "step_6.json").read_text())
    assert result["step"] == 6 and result["checkpoint"].endswith("step_6")
    assert result["metrics"] == logged[6]
    assert result["metrics"]["eval/token_accuracy"] > 0

    assert evaluate_main([str(tiny_run / "checkpoints" / "step_3"), f"out={tmp_path / 'three.json'}"]) == 0
    assert json.loads((tmp_path / "three.json").read_text())["metrics"] == logged[3]
    assert logged[3] != logged[6]


def test_reference_state_dict_evaluates_like_its_checkpoint(tiny_run, tmp_path):
    """The EMA weights + buffers of step 6, saved under the reference's key names, give the same numbers."""
    ckpt_dir = tiny_run / "checkpoints" / "step_6"
    module = torch.load(ckpt_dir / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    ema = torch.load(ckpt_dir / "trainer_state.pt", map_location="cpu", weights_only=True)["ema"]
    reference = {f"_orig_mod.model.{name}": ema.get(name, tensor) for name, tensor in module.items()}
    torch.save(reference, tmp_path / "reference.pt")
    out = tmp_path / "ref.json"
    assert evaluate_main([str(tmp_path / "reference.pt"), f"config={tiny_run / 'config.yaml'}", f"out={out}"]) == 0
    assert json.loads(out.read_text())["metrics"] == _logged_evals(tiny_run)[6]


@pytest.mark.slow
def test_two_processes_give_the_same_numbers(tiny_run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
                           f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "trm.evaluate", str(tiny_run), f"out={out}"],
                          cwd=REPO, env=subprocess_env("1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["metrics"] == _logged_evals(tiny_run)[6]


def test_bad_requests_are_one_paragraph_errors(tiny_run, tmp_path, capsys):
    incomplete = tmp_path / "run" / "checkpoints" / "step_9"
    shutil.copytree(tiny_run / "checkpoints" / "step_6", incomplete)
    (incomplete / "COMPLETE").unlink()
    (tmp_path / "empty").mkdir()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "alien.pt")
    cases = [
        ([str(tmp_path / "nowhere")], "does not exist"),
        ([str(incomplete)], "is incomplete (no COMPLETE marker"),
        ([str(tmp_path / "empty")], "has no complete checkpoint"),
        ([str(tiny_run), "step=4"], "no complete checkpoint at step 4; it has steps [3, 6]"),
        ([str(tiny_run), "model.hidden_size=64"], "Override 'model.hidden_size' would change the model"),
        ([str(tiny_run), "data.eval_split=validation"], "no 'validation' split"),
        ([str(tmp_path / "alien.pt")], "data.path"),
        ([str(tmp_path / "alien.pt"), f"config={tiny_run / 'config.yaml'}"], "does not fit the configured model"),
    ]
    for argv, expected in cases:
        assert evaluate_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("trm.evaluate: error: ") and expected in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
