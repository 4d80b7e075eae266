"""The trainer end to end: outputs, checkpoints, modes, exact resume after kill -9, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import kill_at_checkpoint, run_train, write_config
from trm.train import find_latest_checkpoint
from trm.train import checkpoint as ckpt

VOLATILE = {"time", "train/examples_per_s"}        # plus every "perf/*" key (machine load)


def _load_any(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _flat(tree, prefix=""):
    """Flatten nested dicts/lists of tensors and scalars into {dotted_key: value}."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = tree
    return out


def _assert_identical(a, b, what: str):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), f"{what}: different keys {set(fa) ^ set(fb)}"
    for key in fa:
        va, vb = fa[key], fb[key]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), f"{what}: tensor {key} differs"
        else:
            assert va == vb, f"{what}: {key} differs ({va!r} vs {vb!r})"


def _checkpoint_state(path: Path) -> dict:
    """Everything a checkpoint holds: DeepSpeed module + optimizer, our trainer state, rank state."""
    ds = _load_any(path / "deepspeed" / "mp_rank_00_model_states.pt")
    return {
        "module": ds["module"],
        "optimizer": ds["optimizer"]["state"] if ds.get("optimizer") else None,
        "trainer": _load_any(path / "trainer_state.pt"),
        "rank0": _load_any(path / "rank_0.pt"),
    }


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in VOLATILE and not k.startswith("perf/")} for row in rows]


def test_tiny_run_writes_metrics_checkpoints_and_config(tmp_path, sudoku_dir):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir)
    proc = run_train(str(cfg))
    assert "final evaluation" in proc.stdout

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/lm_loss" in r]
    eval_rows = [r for r in rows if "eval/exact_accuracy" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    for r in eval_rows:
        assert 0.0 <= r["eval/exact_accuracy"] <= 1.0 and 0.0 <= r["eval/token_accuracy"] <= 1.0
        assert r["eval/count"] == 8
        assert 1.0 <= r["eval/early_exit/steps"] <= 4.0
    assert all(r["train/lm_loss"] > 0 for r in train_rows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"

    resolved = (run_dir / "config.yaml").read_text()
    assert "max_steps: 6" in resolved and "zero_stage: 0" in resolved  # defaults filled in
    latest = find_latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step_6" and ckpt.is_complete(latest)
    assert (latest / "deepspeed").is_dir() and (latest / "config.yaml").is_file()
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3, 6]


def _check_resume_after_kill(tmp_path, sudoku_dir, train: dict, last_step: int, kill_step: int) -> None:
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    run_train(str(write_config(tmp_path / "a.yaml", straight_dir, sudoku_dir, train)))

    cfg_b = write_config(tmp_path / "b.yaml", killed_dir, sudoku_dir, train)
    kill_at_checkpoint(cfg_b, killed_dir, kill_step)
    latest = find_latest_checkpoint(killed_dir)
    assert latest is not None and latest.name != f"step_{last_step}", "the kill came too late to test anything"

    run_train(str(cfg_b), "mode=resume")
    a, b = ckpt.step_dir(straight_dir, last_step), ckpt.step_dir(killed_dir, last_step)
    _assert_identical(_checkpoint_state(a), _checkpoint_state(b), "final checkpoint")
    assert _metrics(straight_dir) == _metrics(killed_dir)


def test_resume_after_kill_is_bit_identical(tmp_path, sudoku_dir):
    """3N steps straight == N steps, kill -9, resume to 3N: params, optimizer, EMA, carry, metrics."""
    _check_resume_after_kill(tmp_path, sudoku_dir, {"max_steps": 12, "checkpoint_interval": 4, "eval_interval": 4},
                             last_step=12, kill_step=4)


def test_resume_after_kill_is_bit_identical_with_muon(tmp_path, sudoku_dir):
    """The same with train.optimizer=muon: its momentum buffers and lr ratio come back exactly."""
    train = {"max_steps": 8, "checkpoint_interval": 4, "eval_interval": 0, "optimizer": "muon", "muon_lr": 3e-3}
    _check_resume_after_kill(tmp_path, sudoku_dir, train, last_step=8, kill_step=4)


def test_mode_new_refuses_existing_checkpoints_and_auto_resumes(tmp_path, sudoku_dir):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, {"max_steps": 3})
    run_train(str(cfg))
    again = run_train(str(cfg), check=False)
    assert again.returncode == 2
    assert "already holds a previous run's files" in again.stderr and "Traceback" not in again.stderr

    longer = run_train(str(cfg), "mode=auto", "train.max_steps=5")
    assert "final evaluation" in longer.stdout
    assert find_latest_checkpoint(run_dir).name == "step_5"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/lm_loss" in line]
    assert steps == [1, 2, 3, 4, 5]  # resumed at 3, nothing repeated


def test_mode_resume_without_checkpoint_is_a_clear_error(tmp_path, sudoku_dir):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "empty_run", sudoku_dir)
    proc = run_train(str(cfg), "mode=resume", check=False)
    assert proc.returncode == 2
    assert "no complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("train.max_stpes=5", "Did you mean 'train.max_steps'"),
    ("train.max_steps=many", "train.max_steps"),
    ("model.forward_dtype=float8", "model.forward_dtype"),
    pytest.param("kernels=cuda", "kernel backend 'cuda' was requested but cannot run here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")),
])
def test_bad_config_gives_one_paragraph_error(tmp_path, sudoku_dir, override, expected):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir)
    proc = run_train(str(cfg), override, check=False)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists(), "a bad config must fail before anything is written"


def test_unknown_key_in_yaml_names_key_and_file(tmp_path, sudoku_dir):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, extra="optimiser: adam\n")
    proc = run_train(str(cfg), check=False)
    assert proc.returncode == 2
    assert "optimiser" in proc.stderr and str(cfg) in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_directory_is_a_clear_error(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", tmp_path / "nowhere")
    proc = run_train(str(cfg), check=False)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "python -m trm.data build sudoku" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_dataset_file_is_a_clear_error(tmp_path, sudoku_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sudoku_dir, data)
    target = data / "train" / "all__inputs.npy"
    target.write_bytes(target.read_bytes()[:100])
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data)
    proc = run_train(str(cfg), check=False)
    assert proc.returncode == 2
    assert "all__inputs.npy" in proc.stderr and "Traceback" not in proc.stderr


def test_find_latest_checkpoint_ignores_incomplete_and_prune_keeps_best(tmp_path):
    for step in (2, 4, 6, 8):
        path = ckpt.step_dir(tmp_path, step)
        path.mkdir(parents=True)
        if step != 8:
            ckpt.commit(path, step)
    (tmp_path / "checkpoints" / "not_a_step").mkdir()
    assert find_latest_checkpoint(tmp_path).name == "step_6"
    assert find_latest_checkpoint(tmp_path / "missing") is None

    ckpt.commit(ckpt.step_dir(tmp_path, 8), 8)
    deleted = ckpt.prune(tmp_path, keep_last=1, best_step=2, newest_step=8)
    assert sorted(p.name for p in deleted) == ["step_4", "step_6"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 8]


def _in_process_trainer(tmp_path, sudoku_dir, **train):
    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    cfg = load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, train))
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    torch.manual_seed(0)
    return build_trainer(cfg, world, build_model_for(cfg, dataset.model_dims, world), dataset)


def test_nonfinite_loss_is_skipped_counted_and_then_fatal(tmp_path, sudoku_dir, monkeypatch):
    import trm.train.trainer as trainer_module

    trainer = _in_process_trainer(tmp_path, sudoku_dir, max_steps=20, max_consecutive_nonfinite=2,
                                  eval_interval=0, checkpoint_interval=0)
    poisoned_steps = {2, 4, 5, 6}
    real_loss = trainer_module.act_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * float("nan") if trainer.step in poisoned_steps else loss), metrics

    monkeypatch.setattr(trainer_module, "act_loss", poisoned)
    params = lambda: [p.detach().clone() for p in trainer.model.parameters()]
    for step in (1, 2, 3):
        before = params()
        trainer.step = step
        trainer.train_step()
        changed = any(not torch.equal(a, b) for a, b in zip(before, params()))
        assert changed == (step not in poisoned_steps), f"step {step}: update applied={changed}"
    assert trainer.nonfinite_steps == 1 and trainer.consecutive_nonfinite == 0

    trainer.step = 4
    trainer.train_step()
    trainer.step = 5
    trainer.train_step()
    trainer.step = 6
    with pytest.raises(trainer_module.NonFiniteLossError, match="NaN/inf at step 6 .3 step.s. in a row"):
        trainer.train_step()


def test_failed_save_keeps_earlier_checkpoints_and_says_why(tmp_path, sudoku_dir, monkeypatch):
    import errno

    trainer = _in_process_trainer(tmp_path, sudoku_dir, max_steps=4, eval_interval=0, checkpoint_interval=0)
    trainer.step = 1
    trainer.train_step()
    first = trainer.save_checkpoint()
    assert ckpt.is_complete(first)

    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save_torch", disk_full)
    trainer.step = 2
    trainer.train_step()
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*earlier checkpoints are untouched"):
        trainer.save_checkpoint()
    assert find_latest_checkpoint(tmp_path / "run") == first
    assert not ckpt.is_complete(ckpt.step_dir(tmp_path / "run", 2))
    assert _load_any(first / "trainer_state.pt")["step"] == 1


@pytest.mark.parametrize("build,augment", [
    ({"kind": "maze", "train_puzzles": 6, "test_puzzles": 3, "min_path_length": 40, "aug": 0}, "maze"),
    ({"kind": "arc1", "aug": 1, "max_tasks": 2}, "none"),
], ids=["maze", "arc1"])
def test_maze_and_arc_datasets_build_from_config_and_train(tmp_path, build, augment):
    """``data.build.kind: maze | arc1`` builds the dataset on first use, then a short run trains on it."""
    import yaml

    data_dir = tmp_path / "data"
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data_dir,
                       train={"max_steps": 2, "eval_interval": 2, "checkpoint_interval": 2, "global_batch_size": 4},
                       model={"hidden_size": 16, "L_cycles": 1, "H_cycles": 1, "halt_max_steps": 2})
    doc = yaml.safe_load(cfg.read_text())
    doc["data"].update({"augment": augment, "build": build, "eval_max_examples": 4})
    cfg.write_text(yaml.safe_dump(doc))
    run_train(str(cfg))
    meta = json.loads((data_dir / "train" / "dataset.json").read_text())
    assert meta["seq_len"] == 900 and meta["vocab_size"] in (6, 12), meta
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/exact_accuracy" in r for r in rows) and any(r.get("step") == 2 for r in rows)


def test_train_compile_matches_eager_and_keeps_parameter_names(tmp_path, sudoku_dir):
    """train.compile=true compiles the recursion in place: same losses and updates as eager (to
    rounding), a real compiled graph, and unchanged parameter names (checkpoints stay portable)."""
    import torch._dynamo

    def run(compile_: bool, sub: str):
        (tmp_path / sub).mkdir()
        trainer = _in_process_trainer(tmp_path / sub, sudoku_dir, max_steps=3, eval_interval=0,
                                      checkpoint_interval=0, compile=compile_)
        losses = []
        for step in (1, 2, 3):
            trainer.step = step
            losses.append(float(trainer.train_step()["lm_loss"]))
        return trainer, losses

    eager, eager_losses = run(False, "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_losses = run(True, "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    assert not any("_orig_mod" in k for k in compiled.model.state_dict())
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()


def test_compile_with_zero3_is_a_clear_config_error(tmp_path, sudoku_dir):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, {"compile": True})
    proc = run_train(str(cfg), "deepspeed.zero_stage=3", check=False)
    assert proc.returncode == 2
    assert "train.compile=true cannot be combined with deepspeed.zero_stage=3" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_built_dataset_records_its_build_and_refuses_a_different_one(tmp_path):
    """A dataset built from ``data.build`` records that section; a later config whose build
    section differs fails before training (the data would not be what the config says) and the
    existing data is kept."""
    import yaml

    data_dir = tmp_path / "data"
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data_dir,
                       train={"max_steps": 1, "eval_interval": 0, "checkpoint_interval": 0})
    doc = yaml.safe_load(cfg.read_text())
    doc["data"]["build"] = {"kind": "sudoku", "train_puzzles": 8, "test_puzzles": 2, "min_blanks": 30, "max_blanks": 34}
    cfg.write_text(yaml.safe_dump(doc))
    run_train(str(cfg))
    record = json.loads((data_dir / "trm_build.json").read_text())
    assert record["min_blanks"] == 30 and record["max_blanks"] == 34 and record["train_puzzles"] == 8
    inputs_before = (data_dir / "train" / "all__inputs.npy").read_bytes()

    proc = run_train(str(cfg), f"run_dir={tmp_path / 'other'}", "data.build.min_blanks=32", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "min_blanks: built 30, config 32" in proc.stderr and f"Delete {data_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (data_dir / "train" / "all__inputs.npy").read_bytes() == inputs_before

    # the same check in process (the trainer above ran it): same section -> reused as is
    from trm.config import ConfigError, load_config
    from trm.factories import build_dataset_dir
    from trm.train.distributed import World

    world = World(0, 0, 1, torch.device("cpu"))
    build_dataset_dir(load_config(cfg), world)
    assert (data_dir / "train" / "all__inputs.npy").read_bytes() == inputs_before
    # a record written before a schema key existed lacks it: the default is what that build used
    del record["min_path_length"]
    (data_dir / "trm_build.json").write_text(json.dumps(record))
    build_dataset_dir(load_config(cfg), world)
    with pytest.raises(ConfigError, match="min_path_length: built 110, config 120"):
        build_dataset_dir(load_config(cfg, ["data.build.min_path_length=120"]), world)
    assert (data_dir / "train" / "all__inputs.npy").read_bytes() == inputs_before
