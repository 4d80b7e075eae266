"""Export (safetensors, EMA weights, no unpickling in the service), TensorBoard scalars, W&B hook,
learning-curve PNGs and the FLOPs/MFU estimate. Shares the tiny run of test_serve.py."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, environ_without_ranks
from test_serve import LiveServer, copy_run, eval_grids, random_sudoku, seeded_rng, tiny_run  # noqa: F401  (shared fixtures)
from trm import export
from trm.config import load_config
from trm.model import act_loss, build_model
from trm.plot import main as plot_main
from trm.serve import build_service
from trm.serve.follow import ModelSlot
from trm.serve.solver import ServedModel
from trm.train.metrics import MetricsLog, Throughput, training_flops_per_step

RNG = np.random.default_rng(0)  # each test replaces it (own_seeded_rng)


@pytest.fixture(autouse=True)
def own_seeded_rng(test_seed, monkeypatch):
    """This file's draws come from the test's seed (named on failure)."""
    monkeypatch.setattr(sys.modules[__name__], "RNG", np.random.default_rng(test_seed + 1))


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_export_writes_the_ema_weights_and_buffers(tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt = tiny_run / "checkpoints" / "step_6"
    assert export.main([str(ckpt), "--out", str(tmp_path / "exp")]) == 0
    assert "exported step 6" in capsys.readouterr().out
    weights = load_file(str(tmp_path / "exp" / "model.safetensors"))
    ema = _load(ckpt / "trainer_state.pt")["ema"]
    module = _load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt")["module"]
    assert ema and set(ema) < set(weights)
    for name, value in ema.items():
        assert torch.equal(weights[name], value), name
    assert any(not torch.equal(weights[name], module[name]) for name in ema), "the export holds the raw weights"
    for name in set(weights) - set(ema):  # buffers: y0/z0 and the puzzle table
        assert torch.equal(weights[name], module[name]), name
    info = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert info["step"] == 6 and info["task"] == "sudoku" and info["ema"] is True
    assert info["model_dims"] == {"seq_len": 81, "vocab_size": 11, "num_puzzle_identifiers": 1}
    assert info["parameters"] == sum(v.numel() for v in ema.values())
    assert load_config(tmp_path / "exp" / "config.yaml").model.hidden_size == 32


def test_export_loads_in_the_service_and_predicts_like_the_checkpoint(tiny_run, tmp_path, sudoku_dir):
    """The export, served over HTTP, reproduces the trainer's own evaluation of checkpoint 6 (EMA
    weights, early exit), and answers random puzzles exactly like the checkpoint served directly."""
    export.export_checkpoint(tiny_run / "checkpoints" / "step_6", tmp_path / "exp")
    live = LiveServer(build_service(tmp_path / "exp", max_batch=16))
    try:
        grids, labels = eval_grids(sudoku_dir)
        puzzles = [random_sudoku() for _ in range(5)]
        with live.client() as c:
            body = c.post("/v1/solve", json={"task": "sudoku", "grids": grids}).json()
            from_export = c.post("/v1/solve", json={"task": "sudoku", "grids": puzzles}).json()["results"]
    finally:
        live.close()
    assert body["checkpoint_step"] == 6
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in logged if r["step"] == 6 and "eval/early_exit/token_accuracy" in r)
    predicted = np.array([np.array(r["grid"]).reshape(81) + 1 for r in body["results"]])
    token_acc = ((predicted == labels) & (labels != -100)).sum(-1) / (labels != -100).sum(-1)
    assert token_acc.mean() == pytest.approx(logged["eval/early_exit/token_accuracy"], abs=1e-6)

    checkpoint = copy_run(tiny_run, tmp_path / "run", steps=(6,)) / "checkpoints" / "step_6"
    live = LiveServer(build_service(checkpoint, max_batch=16))
    try:
        with live.client() as c:
            from_checkpoint = c.post("/v1/solve", json={"task": "sudoku", "grids": puzzles}).json()["results"]
    finally:
        live.close()
    assert [r["grid"] for r in from_checkpoint] == [r["grid"] for r in from_export]
    assert [r["supervision_steps"] for r in from_checkpoint] == [r["supervision_steps"] for r in from_export]


def test_the_service_process_never_unpickles(tiny_run, tmp_path, monkeypatch):
    """Serving a checkpoint exports it in a child process; this process only reads safetensors."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called inside the service process")

    checkpoint = copy_run(tiny_run, tmp_path / "run", steps=(3,)) / "checkpoints" / "step_3"
    monkeypatch.setattr(torch, "load", refuse)
    slot = ModelSlot(checkpoint, torch.device("cpu"))
    slot.load_initial()
    assert slot.current.step == 3 and (checkpoint / "export" / "model.safetensors").is_file()
    sol = slot.current.solve(RNG.integers(1, 11, size=(3, 81)).astype(np.int32), np.zeros(3, dtype=np.int32))
    assert sol.tokens.shape == (3, 81) and (sol.steps >= 1).all()


def test_export_refuses_an_incomplete_checkpoint(tiny_run, tmp_path, capsys):
    partial = tmp_path / "step_3"
    shutil.copytree(tiny_run / "checkpoints" / "step_3", partial, ignore=shutil.ignore_patterns("export", "COMPLETE"))
    assert export.main([str(partial), "--out", str(tmp_path / "out")]) == 2
    assert "COMPLETE" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert export.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(export.ExportError, match="not an export folder"):
        ServedModel(tmp_path, torch.device("cpu"))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tiny_run_writes_tensorboard_scalars(tiny_run):
    scalars = _scalars(tiny_run / "tensorboard")
    wanted = ["train/lm_loss", "train/q_halt_loss", "train/token_accuracy", "train/exact_accuracy",
              "train/q_halt_accuracy", "train/steps", "train/lr", "train/grad_norm", "train/examples_per_s",
              "perf/tokens_per_s", "perf/tflops_per_s", "perf/max_rss_gib",
              "eval/exact_accuracy", "eval/token_accuracy", "eval/early_exit/steps"]
    missing = [tag for tag in wanted if tag not in scalars]
    assert not missing, f"missing TensorBoard scalars {missing}; have {sorted(scalars)}"
    rows = {r["step"]: r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines())
            if "train/lm_loss" in r}
    assert [s for s, _ in scalars["train/lm_loss"]] == sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert "perf/mfu" not in scalars  # a CPU has no known peak: no MFU rather than a guessed one
    for tag in wanted[:11]:
        for step, value in scalars[tag]:
            assert value == pytest.approx(rows[step][tag], rel=1e-6), (tag, step)
    for step, row in rows.items():
        assert row["perf/tokens_per_s"] == pytest.approx(row["train/examples_per_s"] * 81, rel=1e-9)
        assert row["train/grad_norm"] > 0 and "perf/mfu" not in row and 0.05 < row["perf/max_rss_gib"] < 64
    assert [s for s, _ in scalars["eval/exact_accuracy"]] == [3, 6]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_learning_curves_png_at_the_end_of_the_run_and_from_the_cli(tiny_run, tmp_path, capsys):
    width, height = _png_size(tiny_run / "learning_curves.png")
    assert width >= 800 and height >= 300
    out = tmp_path / "curves.png"
    assert plot_main([str(tiny_run), "--out", str(out)]) == 0
    assert _png_size(out) == (width, height) and out.stat().st_size > 20_000
    assert plot_main([str(tmp_path / "empty")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def _synthetic_rows(mfu: bool) -> list[dict]:
    rows = []
    for step in range(1, 41):
        row = {"step": step, "train/lm_loss": 2.0 / step, "train/q_halt_loss": 0.5 / step, "train/exact_accuracy": step / 80,
               "train/token_accuracy": 0.5 + step / 100, "train/steps": 2.0, "train/halted": 8, "train/lr": 1e-3,
               "train/grad_norm": 1.0 + step, "train/examples_per_s": 900.0 + RNG.normal(0, 20)}
        if mfu:
            row["perf/mfu"] = 0.3
        rows.append(row)
        if step % 10 == 0:
            acc = step / 50
            rows.append({"step": step, "eval/exact_accuracy": acc, "eval/exact_accuracy/ci95_low": acc - 0.05,
                         "eval/exact_accuracy/ci95_high": acc + 0.05, "eval/token_accuracy": 0.9,
                         "eval/early_exit/exact_accuracy": acc, "eval/early_exit/token_accuracy": 0.9,
                         "eval/early_exit/steps": 3.0, "eval/count": 200})
    return rows


@pytest.mark.parametrize("mfu", [False, True])
def test_plot_has_one_quantity_per_axis_and_examples_per_s_on_its_own(mfu):
    from trm.plot import draw

    fig = draw(_synthetic_rows(mfu), "synthetic")
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert len(axes) == len(fig.axes), "no twin axes: one quantity per axis"
    expected = {"loss", "exact accuracy", "token accuracy", "mean supervision steps", "learning rate", "gradient norm",
                "throughput (examples/s)"} | ({"MFU (% of peak)"} if mfu else set())
    assert set(axes) == expected
    throughput = axes["throughput (examples/s)"].get_lines()
    assert len(throughput) == 1 and min(throughput[0].get_ydata()) > 800  # examples/s, not a fraction
    if mfu:
        assert list(axes["MFU (% of peak)"].get_lines()[0].get_ydata()) == [30.0] * 40
    exact = axes["exact accuracy"]
    labels = [t.get_text() for t in exact.get_legend().get_texts()]
    assert labels == ["train (halted slots)", "eval, all steps", "eval, all steps: 95% CI", "eval, early exit"]
    assert all(t.get_fontsize() >= 8 for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())


def test_plot_and_run_metrics_import_in_one_direction_only():
    import trm.plot
    import trm.train.metrics

    code = "import sys, trm.plot; bad = [m for m in sys.modules if m.startswith('trm.train')]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**environ_without_ranks(), "PYTHONPATH": str(REPO)})
    assert trm.train.metrics.plot_run is trm.plot.plot_run


def _explicit_attention(q, k, v, is_causal=False):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("variant", [{"mlp_t": True, "pos_encodings": "none"},
                                     {"mlp_t": False, "pos_encodings": "rope"},
                                     {"mlp_t": False, "pos_encodings": "learned", "no_ACT_continue": False}])
def test_flops_estimate_matches_torch_flop_counter(variant, monkeypatch):
    """The documented FLOPs formula against PyTorch's FLOP counter on one real training step (attention
    written as matmuls so the counter sees it), odd shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(F, "scaled_dot_product_attention", _explicit_attention)
    B, S, V = int(RNG.integers(2, 6)), int(RNG.integers(11, 30)), 9
    model = build_model(dict(name="trm", hidden_size=24, num_heads=3, expansion=2, H_cycles=int(RNG.integers(1, 3)),
                             L_cycles=int(RNG.integers(1, 3)), L_layers=2, halt_max_steps=4, puzzle_emb_ndim=24,
                             puzzle_emb_len=2, forward_dtype="float32", seq_len=S, vocab_size=V,
                             num_puzzle_identifiers=5, batch_size=B, **variant)).train()
    batch = {"inputs": torch.randint(0, V, (B, S), dtype=torch.int32), "labels": torch.randint(0, V, (B, S)),
             "puzzle_identifiers": torch.randint(0, 5, (B,), dtype=torch.int32)}
    with FlopCounterMode(display=False) as counter:
        carry, out = model(model.initial_carry(batch), batch)
        loss, _ = act_loss(out, carry.current_data["labels"], carry.halted, carry.steps)
        loss.backward()
    estimate = training_flops_per_step(model, B)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=2e-3)
    perf = Throughput(model, B, devices=2, device=torch.device("cpu"), peak_tflops=0.5).summary(steps=3, seconds=1.5)
    assert perf["perf/tflops_per_s"] == pytest.approx(estimate * 3 / 1.5 / 1e12)
    assert perf["perf/mfu"] == pytest.approx(perf["perf/tflops_per_s"] / (0.5 * 2))

    # a curriculum stage runs shallower: steps are counted at the depth they ran at
    throughput = Throughput(model, B, devices=1, device=torch.device("cpu"), peak_tflops=0.5)
    full_H = model.config.H_cycles
    model.config.H_cycles = full_H + 1
    deeper = training_flops_per_step(model, B)
    throughput.count_step()
    model.config.H_cycles = full_H
    throughput.count_step()
    perf = throughput.summary(steps=2, seconds=1.0)
    assert deeper > estimate and perf["perf/tflops_per_s"] == pytest.approx((deeper + estimate) / 1e12)
    assert throughput.summary(steps=1, seconds=1.0)["perf/tflops_per_s"] == pytest.approx(estimate / 1e12)


def _config(tmp_path: Path, **train):
    return types.SimpleNamespace(train=types.SimpleNamespace(plots=False, wandb=True, wandb_project="p", **train))


def test_wandb_is_optional_and_gets_the_scalars(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    log = MetricsLog(tmp_path / "a", config=_config(tmp_path), tensorboard=False)
    log.log(1, {"train/lm_loss": 1.5})
    log.close()
    assert "wandb package is not installed" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text())["train/lm_loss"] == 1.5

    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs["project"]) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("trm.config.to_dict", lambda cfg: {})
    log = MetricsLog(tmp_path / "b", config=_config(tmp_path), tensorboard=False)
    log.log(4, {"train/lm_loss": 0.25, "note": "text", "eval/x": float("nan")})
    log.close()
    assert calls == ["p", (4, {"train/lm_loss": 0.25}), "finish"]


def test_resume_purges_later_tensorboard_events(tmp_path):
    first = MetricsLog(tmp_path)
    for step in range(1, 6):
        first.log(step, {"train/x": float(step)})
    first.close()
    resumed = MetricsLog(tmp_path)
    resumed.truncate_after(3)
    for step in (4, 5):
        resumed.log(step, {"train/x": 10.0 * step})
    resumed.close()
    assert _scalars(tmp_path / "tensorboard")["train/x"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [json.loads(line)["train/x"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [1.0, 2.0, 3.0, 40.0, 50.0]
