"""Training options checked by what they do, in process on the CPU: the sharded puzzle table
(save, resume, export), best-checkpoint tracking and ``evaluate step=best``, the time limit,
gradient clipping, ``kernels=cpu|auto`` from the config, and that a tiny model learns."""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_config
from trm.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("restore_rank_variables")  # in-process trainers set RANK etc.

PUZZLE_TABLE_KEY = "inner.puzzle_emb.weights"


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: these models are tiny, and on a busy machine two OpenMP threads per op
    made these tests 10-20x slower (measured: 32 s vs 1.4 s for the overfit test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    with _one_thread():
        yield


def _trainer(run_root: Path, data_dir: Path, train: dict, resume_from: Path | None = None,
             model: dict | None = None, data: dict | None = None):
    import yaml

    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    run_root.mkdir(parents=True, exist_ok=True)
    path = write_config(run_root / "cfg.yaml", run_root / "run", data_dir, {"plots": False, **train}, model)
    if data:
        doc = yaml.safe_load(path.read_text())
        doc["data"].update(data)
        path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, dataset.model_dims, world)
    torch.manual_seed(cfg.seed * 1_000_003 + 1)
    return build_trainer(cfg, world, model, dataset, resume_from)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _module(step_dir: Path) -> dict[str, torch.Tensor]:
    return _load(step_dir / "deepspeed" / "mp_rank_00_model_states.pt")["module"]


# ------------------------------------------------------------------ the sharded puzzle table

TABLE_ROWS = 7


def _with_puzzle_identifiers(src: Path, dst: Path, rows: int) -> Path:
    """A copy of the Sudoku dataset ``src`` whose puzzles use ``rows`` identifiers (cyclically), so
    the puzzle table has several rows (Sudoku's own builds use the one blank identifier)."""
    import shutil

    shutil.copytree(src, dst)
    for split in ("train", "test"):
        ids = dst / split / "all__puzzle_identifiers.npy"
        ids_array = np.load(ids)
        np.save(ids, (np.arange(len(ids_array)) % rows).astype(ids_array.dtype))
        meta_path = dst / split / "dataset.json"
        meta = json.loads(meta_path.read_text())
        meta["num_puzzle_identifiers"] = rows
        meta_path.write_text(json.dumps(meta))
    return dst


def test_sharded_puzzle_table_trains_resumes_and_exports_like_the_replicated_one(tmp_path, sudoku_dir):
    """One process with ``train.shard_puzzle_table``: the same trajectory as the replicated table
    (the table lives in rank_0.pt, not in the module states), a resume from step 2 ends bit-identical
    to the straight run, and the export holds the whole table, equal to the replicated run's."""
    from trm import export

    sudoku_dir = _with_puzzle_identifiers(sudoku_dir, tmp_path / "data", TABLE_ROWS)
    train = {"max_steps": 4, "eval_interval": 0, "checkpoint_interval": 2}
    replicated = _trainer(tmp_path / "replicated", sudoku_dir, train)
    replicated.fit()
    sharded = _trainer(tmp_path / "sharded", sudoku_dir, {**train, "shard_puzzle_table": True})
    assert sharded.puzzle_table is not None and sharded.model.puzzle_emb.weights.numel() == 0
    sharded.fit()
    rep4 = ckpt.step_dir(tmp_path / "replicated" / "run", 4)
    sh2, sh4 = (ckpt.step_dir(tmp_path / "sharded" / "run", s) for s in (2, 4))

    table = _load(sh4 / "rank_0.pt")["puzzle_table"]
    assert (table["lo"], table["hi"]) == (0, table["num_rows"]) and table["num_rows"] == TABLE_ROWS
    assert (table["shard"] != 0).any(dim=1).sum() >= 2, "training must have moved several rows of the table"
    want = _module(rep4)
    assert torch.equal(table["shard"], want[PUZZLE_TABLE_KEY]), "the sharded table must follow the replicated one"
    got = _module(sh4)
    assert got[PUZZLE_TABLE_KEY].numel() == 0, "the module states must not hold the sharded table"
    for name, value in want.items():
        if name != PUZZLE_TABLE_KEY:
            assert torch.equal(got[name], value), f"{name} differs between sharded and replicated"

    resumed = _trainer(tmp_path / "resumed", sudoku_dir, {**train, "shard_puzzle_table": True}, resume_from=sh2)
    resumed.fit()
    res4 = ckpt.step_dir(tmp_path / "resumed" / "run", 4)
    assert torch.equal(_load(res4 / "rank_0.pt")["puzzle_table"]["shard"], table["shard"])
    for name, value in got.items():
        assert torch.equal(_module(res4)[name], value), f"{name} differs after resuming the sharded run"

    with pytest.raises(ckpt.CheckpointError, match="shard_puzzle_table=True; resume with the same setting"):
        _trainer(tmp_path / "mismatch", sudoku_dir, train, resume_from=sh2).fit()

    from safetensors.torch import load_file

    exported = export.export_checkpoint(sh4, tmp_path / "export_sharded")
    weights_sharded = load_file(str(exported / export.WEIGHTS_FILE))
    weights_replicated = load_file(str(export.export_checkpoint(rep4, tmp_path / "export_replicated") / export.WEIGHTS_FILE))
    info = json.loads((exported / export.INFO_FILE).read_text())
    assert info["puzzle_embedding_rows"] == table["num_rows"]
    assert torch.equal(weights_sharded[PUZZLE_TABLE_KEY], table["shard"]), "the export must hold the whole table"
    assert weights_sharded.keys() == weights_replicated.keys()
    for name, value in weights_replicated.items():
        assert torch.equal(weights_sharded[name], value), f"export: {name} differs"


# ------------------------------------------------------------------ best checkpoint

SCRIPTED_EVALS = {2: (0.9, 0.20), 4: (0.1, 0.70), 6: (0.1, 0.50), 8: (0.1, 0.60)}  # step: (exact, token)


def test_best_metric_picks_the_checkpoint_that_is_kept_and_evaluated_with_step_best(tmp_path, sudoku_dir, monkeypatch, capsys):
    """``train.best_metric: eval/token_accuracy`` with scripted evaluations: step 4 is the best (an
    exact-accuracy choice would be step 2), survives ``keep_last: 1`` pruning, is recorded in every
    later checkpoint and is what ``python -m trm.evaluate RUN step=best`` evaluates."""
    from trm.evaluate import main as evaluate_main
    from trm.evaluate import resolve_checkpoint

    trainer = _trainer(tmp_path, sudoku_dir, {"max_steps": 8, "eval_interval": 2, "checkpoint_interval": 2,
                                              "keep_last": 1, "best_metric": "eval/token_accuracy"})

    def scripted_evaluate(submission_path=None):
        exact, token = SCRIPTED_EVALS[trainer.step]
        return {"eval/exact_accuracy": exact, "eval/token_accuracy": token,
                "eval/early_exit/exact_accuracy": exact, "eval/early_exit/steps": 1.0}

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    trainer.fit()
    run_dir = tmp_path / "run"
    assert (trainer.best_step, trainer.best_value) == (4, 0.70)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [4, 8], "prune must keep the best and the last"
    state = _load(ckpt.step_dir(run_dir, 8) / "trainer_state.pt")
    assert (state["best_step"], state["best_value"]) == (4, 0.70)
    assert resolve_checkpoint(run_dir, "best") == ckpt.step_dir(run_dir, 4)

    out = tmp_path / "best.json"
    assert evaluate_main([str(run_dir), "step=best", f"out={out}"]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["step"] == 4 and result["checkpoint"].endswith("step_4")


# ------------------------------------------------------------------ time limit

def test_time_limit_stops_the_run_with_an_evaluation_and_a_checkpoint(tmp_path, sudoku_dir, monkeypatch):
    """A clock that advances 25 s per training step (no real waiting): with a 1-minute limit the run
    stops after step 3 of 50 (75 s > 60 s), evaluates, checkpoints and logs that step."""
    import trm.train.trainer as trainer_module

    trainer = _trainer(tmp_path, sudoku_dir, {"max_steps": 50, "eval_interval": 0, "checkpoint_interval": 0,
                                              "time_limit_minutes": 1.0})
    clock = {"now": 1_000_000.0}
    real_step = trainer.train_step

    def step_that_takes_25_s():
        clock["now"] += 25.0
        return real_step()

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    monkeypatch.setattr(trainer, "train_step", step_that_takes_25_s)
    last_eval = trainer.fit()
    assert trainer.step == 3
    assert last_eval["eval/count"] == 8
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [3]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/lm_loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/exact_accuracy" in r] == [3]


# ------------------------------------------------------------------ gradient clipping

def _gradient_norms_at_optimizer_step(trainer, steps: int) -> tuple[list[float], list[float]]:
    """(norm of the gradients the optimizer stepped with, the logged pre-clip norm) per step."""
    optimizer = trainer.engine.optimizer
    real_step, seen = optimizer.step, []

    def recording_step(*args, **kwargs):
        grads = [p.grad.detach().double() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(*args, **kwargs)

    optimizer.step = recording_step
    logged = []
    for step in range(1, steps + 1):
        trainer.step = step
        logged.append(float(trainer.train_step()["grad_norm"]))
    return seen, logged


def test_gradient_clipping_bounds_the_gradient_the_optimizer_sees(tmp_path, sudoku_dir):
    """``deepspeed.gradient_clipping``: without it the optimizer steps with the raw gradient (its
    norm is the logged one, far above 1e-3); with 1e-3 it steps with a gradient of norm 1e-3."""
    from trm.config import load_config

    plain = _trainer(tmp_path / "plain", sudoku_dir, {"max_steps": 3, "eval_interval": 0, "checkpoint_interval": 0})
    seen, logged = _gradient_norms_at_optimizer_step(plain, 3)
    assert seen == pytest.approx(logged, rel=1e-5) and min(seen) > 1e-2

    cfg_path = write_config(tmp_path / "clip.yaml", tmp_path / "clip" / "run", sudoku_dir,
                            {"max_steps": 3, "eval_interval": 0, "checkpoint_interval": 0, "plots": False})
    with cfg_path.open("a") as f:
        f.write("deepspeed:\n  gradient_clipping: 0.001\n")
    assert load_config(cfg_path).deepspeed.gradient_clipping == 0.001
    clipped = _trainer_from_config(cfg_path, sudoku_dir)
    seen, logged = _gradient_norms_at_optimizer_step(clipped, 3)
    assert min(logged) > 1e-2, "the raw gradient must be large enough for the clip to act"
    assert seen == pytest.approx([1e-3] * 3, rel=1e-3), f"clipped norms {seen}, raw {logged}"


def _trainer_from_config(path: Path, data_dir: Path):
    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    cfg = load_config(path)
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    torch.manual_seed(cfg.seed)
    return build_trainer(cfg, world, build_model_for(cfg, dataset.model_dims, world), dataset)


# ------------------------------------------------------------------ kernels from the config

NATIVE_CPU_OPS = {"trm::rms_norm_fwd", "trm::stablemax_ce_fwd", "trm::swiglu_fwd"}  # what the baseline below backs


def _train_with_kernels(tmp_path: Path, sudoku_dir: Path, kernels: str | None) -> tuple[list[float], set[str]]:
    """``python -m trm.train CFG kernels=NAME`` (None: the default) in process under the profiler: the
    logged losses and the ``trm::`` ops that ran."""
    from torch.profiler import ProfilerActivity, profile

    from trm import ops
    from trm.train.__main__ import main

    run_dir = tmp_path / str(kernels)
    cfg = write_config(tmp_path / f"{kernels}.yaml", run_dir, sudoku_dir,
                       {"max_steps": 3, "eval_interval": 0, "checkpoint_interval": 0, "plots": False})
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            assert main([str(cfg)] + ([f"kernels={kernels}"] if kernels else [])) == 0
    finally:
        ops.set_backend("torch")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ran = {e.key for e in prof.key_averages() if e.key.startswith("trm::")}
    return [r["train/lm_loss"] for r in rows if "train/lm_loss" in r], ran


@pytest.fixture(scope="module")
def torch_kernels_losses(tmp_path_factory, sudoku_dir) -> list[float]:
    with _one_thread():
        losses, ran = _train_with_kernels(tmp_path_factory.mktemp("kernels"), sudoku_dir, "torch")
    assert ran == set(), f"kernels=torch ran native ops: {ran}"
    return losses


@pytest.mark.parametrize("kernels", ["cpu", "auto", None], ids=["cpu", "auto", "default"])
def test_kernels_from_the_config_run_the_native_kernels_and_train_like_torch(tmp_path, sudoku_dir, kernels,
                                                                             torch_kernels_losses, kernel_baselines):
    """``kernels: cpu | auto`` from the config, and the default (auto), reach the ops: with a baseline
    backing the C++ kernels they run (profiler events) and the losses follow ``kernels=torch`` to rounding."""
    kernel_baselines({("cpu", op): 2.0 for op in ("rms_norm", "stablemax_cross_entropy", "swiglu")})
    losses, ran = _train_with_kernels(tmp_path, sudoku_dir, kernels)
    assert NATIVE_CPU_OPS <= ran, f"kernels={kernels} did not run the C++ kernels; ran {sorted(ran)}"
    assert len(losses) == 3
    np.testing.assert_allclose(losses, torch_kernels_losses, rtol=1e-4)


# ------------------------------------------------------------------ it learns

def test_a_tiny_model_overfits_a_few_puzzles(tmp_path):
    """4 Sudoku puzzles, evaluated on those same puzzles: the loss falls and the accuracy rises."""
    from trm.data.sudoku import build_sudoku

    data = tmp_path / "four"
    build_sudoku(data, train_puzzles=4, test_puzzles=1, aug=0, seed=11, min_blanks=20, max_blanks=25, workers=1)
    trainer = _trainer(tmp_path, data, {"max_steps": OVERFIT_STEPS, "global_batch_size": 4, "lr": 3e-3,
                                        "lr_warmup_steps": 5, "weight_decay": 0.0, "puzzle_emb_lr": 3e-2,
                                        "puzzle_emb_weight_decay": 0.0, "eval_interval": OVERFIT_STEPS,
                                        "checkpoint_interval": 0, "ema": False},
                       model={"halt_max_steps": 2}, data={"augment": "none", "eval_split": "train"})
    before = trainer.evaluate()
    after = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/lm_loss"] for r in rows if "train/lm_loss" in r]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, f"training loss {first:.3f} -> {last:.3f}"
    assert before["eval/token_accuracy"] < 0.3 and before["eval/exact_accuracy"] == 0.0, before
    assert after["eval/token_accuracy"] > 0.9 and after["eval/exact_accuracy"] >= 0.5, after


OVERFIT_STEPS = 40  # at seed 7 the 4 puzzles are solved exactly by then (2026-12-01: token and exact accuracy 1.0)
