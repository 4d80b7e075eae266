"""Checkpoints that verify themselves, and runs that never lose or misread a user's work.

Issue 14, items 2-5, through the real CLI: ``mode=new`` refuses a run_dir with a previous run's
files; a corrupt checkpoint is named (file and why) by resume, evaluate and the service, and
``mode=auto`` falls back to the newest good one; a saved config with missing keys is an error;
resuming with settings the run cannot continue with fails before any step, in one line.
The corruption matrix ({truncate, delete, flip} x five files) resumes in process (``main``).
One training run (``trained_run``) makes every checkpoint the tests copy and damage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_train, subprocess_env, write_config
from trm.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("restore_rank_variables")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """In-process runs set train.num_threads; later tests get this process's own count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

TRAIN = {"max_steps": 6, "checkpoint_interval": 2, "eval_interval": 0, "keep_last": 5, "num_threads": 2,
         "plots": False}
EXTRA = "deepspeed:\n  zero_stage: 1\n"  # ZeRO-1: the optimizer has its own shard file
FILES = {
    "model shard": "deepspeed/mp_rank_00_model_states.pt",
    "optimizer shard": "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rank state": "rank_0.pt",
    "trainer state": "trainer_state.pt",
    "config": "config.yaml",
}


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _state(step_dir: Path) -> dict:
    ds = _load(step_dir / FILES["model shard"])
    optim = _load(step_dir / FILES["optimizer shard"])
    return {"module": ds["module"], "optimizer": optim["optimizer_state_dict"], "trainer": _load(step_dir / "trainer_state.pt"),
            "rank0": _load(step_dir / "rank_0.pt")}


def _assert_same(a, b, where: str = ""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), where
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    else:  # flip: same size, a few bytes in the middle inverted
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 4]) + data[mid + 4:])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sudoku_dir) -> Path:
    """A finished 6-step run (checkpoints 2, 4, 6; ZeRO-1) through the CLI; never modified."""
    root = tmp_path_factory.mktemp("trained")
    run_train(str(write_config(root / "cfg.yaml", root / "run", sudoku_dir, TRAIN, extra=EXTRA)))
    return root / "run"


def _copy(trained_run: Path, tmp_path: Path, sudoku_dir: Path) -> tuple[Path, Path]:
    """A copy of the trained run (run_dir, config pointing at it)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    return run_dir, write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, TRAIN, extra=EXTRA)


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trm.evaluate", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- manifest (no training)
def _fake_checkpoint(root: Path, step: int) -> Path:
    path = ckpt.step_dir(root, step)
    (path / "deepspeed").mkdir(parents=True)
    (path / "deepspeed" / "shard.pt").write_bytes(bytes(range(256)) * 8)
    (path / "rank_0.pt").write_bytes(b"rank state" * 10)
    ckpt.commit(path, step)
    return path


@pytest.mark.parametrize("how, says", [("truncate", "has 1024 bytes"), ("delete", "is missing"), ("flip", "changed")])
def test_marker_manifest_names_the_bad_file_and_latest_falls_back(tmp_path, how, says, capsys):
    old, new = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    marker = json.loads((new / ckpt.COMMIT_MARKER).read_text())
    assert set(marker["files"]) == {"deepspeed/shard.pt", "rank_0.pt"} and marker["files"]["rank_0.pt"]["size"] == 100
    ckpt.verify_checkpoint(new)
    (new / "export").mkdir()
    (new / "export" / "model.safetensors").write_bytes(b"added later by a reader")
    ckpt.verify_checkpoint(new)  # readers' sub-folders are outside the manifest

    corrupt(new / "deepspeed" / "shard.pt", how)
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"deepspeed/shard.pt {says}" if how != "flip" else "contents of deepspeed/shard.pt changed"):
        ckpt.verify_checkpoint(new)
    assert ckpt.find_latest_checkpoint(tmp_path) == old
    err = capsys.readouterr().err
    assert f"skipping checkpoint {new}" in err and "shard.pt" in err
    skipped = []
    assert ckpt.find_latest_checkpoint(tmp_path, on_skip=lambda p, why: skipped.append((p, why))) == old
    assert skipped and skipped[0][0] == new and "shard.pt" in skipped[0][1]
    assert ckpt.find_latest_checkpoint(tmp_path, newer_than=2, on_skip=None) is None


def test_marker_without_manifest_is_accepted_with_a_warning(tmp_path, capsys):
    path = _fake_checkpoint(tmp_path, 2)
    (path / ckpt.COMMIT_MARKER).write_text(json.dumps({"step": 2}) + "\n")  # what trm wrote before manifests
    (path / "rank_0.pt").write_bytes(b"x")
    assert ckpt.find_latest_checkpoint(tmp_path) == path
    assert "without verifying" in capsys.readouterr().err


def test_no_checkpoint_verifies_auto_and_resume_refuse_instead_of_starting_over(tmp_path, sudoku_dir):
    from trm.config import load_config
    from trm.train.__main__ import RunError, resolve_resume

    corrupt(_fake_checkpoint(tmp_path / "run", 2) / "rank_0.pt", "flip")
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", sudoku_dir, TRAIN)
    for mode in ("auto", "resume"):
        with pytest.raises(RunError, match="rank_0.pt.*mode=new overwrite=true"):
            resolve_resume(load_config(cfg, [f"mode={mode}"]))
    assert (ckpt.step_dir(tmp_path / "run", 2) / "rank_0.pt").is_file()


# --------------------------------------------------------------------------- item 2
def test_mode_new_refuses_a_run_dir_with_a_previous_runs_files(tmp_path, sudoku_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/lm_loss": 2.0}\n')
    (run_dir / "config.yaml").write_text("run_dir: elsewhere\n")
    (run_dir / "notes.txt").write_text("mine")
    cfg = write_config(tmp_path / "cfg.yaml", run_dir, sudoku_dir, TRAIN)
    proc = run_train(str(cfg), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for words in ("metrics.jsonl", "config.yaml", "mode=resume", "mode=auto", "another run_dir", "overwrite=true"):
        assert words in proc.stderr, words
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "train/lm_loss": 2.0}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl", "notes.txt"]

    # overwrite=true moves them aside (in process: nothing is trained here)
    from trm.config import load_config
    from trm.train.__main__ import resolve_resume

    assert resolve_resume(load_config(cfg, ["overwrite=true"])) is None
    aside = [p for p in run_dir.iterdir() if p.name.startswith("previous_")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text().startswith('{"step": 1')
    assert (aside[0] / "config.yaml").read_text() == "run_dir: elsewhere\n" and (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / "metrics.jsonl").exists()


def test_atomic_write_replaces_whole_files_only(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old\n")
    ckpt.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# --------------------------------------------------------------------------- item 3
def test_corrupt_latest_checkpoint_resume_and_evaluate_name_it(tmp_path, sudoku_dir, trained_run):
    run_dir, cfg = _copy(trained_run, tmp_path, sudoku_dir)
    corrupt(ckpt.step_dir(run_dir, 6) / "rank_0.pt", "truncate")

    refused = run_train(str(cfg), "mode=resume", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "rank_0.pt" in refused.stderr and f"resume_from={ckpt.step_dir(run_dir, 4)}" in refused.stderr

    evaluated = _evaluate(str(ckpt.step_dir(run_dir, 6)))
    assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr
    assert "corrupt" in evaluated.stderr and "rank_0.pt" in evaluated.stderr and "does not fit" not in evaluated.stderr

    # mode=auto (the fallback, its warnings and the bit-identical end) is the matrix below, in process


def test_service_serves_the_older_good_checkpoint(tmp_path, sudoku_dir, trained_run, capsys):
    from trm.serve.follow import ModelSlot

    run_dir, _ = _copy(trained_run, tmp_path, sudoku_dir)
    corrupt(ckpt.step_dir(run_dir, 6) / FILES["model shard"], "truncate")
    slot = ModelSlot(run_dir, torch.device("cpu"))
    slot.load_initial()
    assert slot.current is not None and slot.current.step == 4
    err = capsys.readouterr().err
    assert "skipping" in err and "mp_rank_00_model_states.pt" in err
    assert slot.poll_once() is False and "skipping" not in capsys.readouterr().err, "reported once, not every poll"


# --------------------------------------------------------------------------- item 4
def test_saved_config_cut_short_is_an_error_not_defaults(tmp_path, sudoku_dir, trained_run):
    run_dir, _ = _copy(trained_run, tmp_path, sudoku_dir)
    step = ckpt.step_dir(run_dir, 6)
    lines = (step / "config.yaml").read_text().splitlines(keepends=True)
    (step / "config.yaml").write_text("".join(lines[: len(lines) // 2]))  # still valid YAML
    ckpt.commit(step, 6)  # sealed again: the file verifies, its content is incomplete
    proc = _evaluate(str(step))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first_dropped = lines[len(lines) // 2].split(":")[0].strip()
    assert "is incomplete: it lacks" in proc.stderr and first_dropped in proc.stderr, proc.stderr

    from trm.config import ConfigError, load_saved_config

    (tmp_path / "extra.yaml").write_text((ckpt.step_dir(trained_run, 6) / "config.yaml").read_text() + "surprise: 1\n")
    with pytest.raises(ConfigError, match="surprise"):
        load_saved_config(tmp_path / "extra.yaml")
    saved = (ckpt.step_dir(trained_run, 6) / "config.yaml").read_text()
    assert load_saved_config(ckpt.step_dir(trained_run, 6) / "config.yaml").train.max_steps == 6
    (tmp_path / "older.yaml").write_text("".join(l for l in saved.splitlines(keepends=True) if not l.startswith("overwrite:")))
    assert load_saved_config(tmp_path / "older.yaml").overwrite is False, "a key newer than the saved config"


# --------------------------------------------------------------------------- item 5
def test_resume_with_settings_that_cannot_continue_fails_before_any_step(tmp_path, sudoku_dir, trained_run):
    run_dir, cfg = _copy(trained_run, tmp_path, sudoku_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_train(str(cfg), "mode=resume", "model.hidden_size=64", "train.global_batch_size=16",
                     "train.max_steps=8", "train.lr=0.002", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1, proc.stderr
    assert "model.hidden_size (checkpoint: 32, now: 64)" in error[0]
    assert "train.global_batch_size (checkpoint: 8, now: 16)" in error[0]
    assert "max_steps" not in error[0] and "train.lr" not in error[0], "those may change on resume"
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_dataset_of_another_shape_is_named_on_load(tmp_path, sudoku_dir, trained_run):
    from trm.config import load_config
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.train.distributed import init_world

    run_dir, cfg_path = _copy(trained_run, tmp_path, sudoku_dir)
    state_path = ckpt.step_dir(run_dir, 6) / "trainer_state.pt"
    state = _load(state_path)
    state["model_dims"] = {**state["model_dims"], "seq_len": state["model_dims"]["seq_len"] + 1}
    torch.save(state, state_path)
    ckpt.commit(state_path.parent, 6)
    cfg = load_config(cfg_path, ["mode=resume"])
    world = init_world("cpu")
    dataset = build_dataset(cfg, world)
    trainer = build_trainer(cfg, world, build_model_for(cfg, dataset.model_dims, world), dataset)
    with pytest.raises(ckpt.CheckpointError, match=r"seq_len: checkpoint \d+, now \d+"):
        trainer.load_checkpoint(state_path.parent)


# --------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_corruption_matrix_auto_resumes_from_the_newest_good_checkpoint(tmp_path, sudoku_dir, trained_run, how, capfd):
    """Each of the five files of step_6, damaged three ways: mode=auto (in process) resumes from
    step_4 and ends with the uninterrupted run's state, bit for bit; nothing else is removed."""
    from trm.train.__main__ import main

    want = _state(ckpt.step_dir(trained_run, 6))
    for what, rel in FILES.items():
        case = tmp_path / what.replace(" ", "_")
        run_dir, cfg = _copy(trained_run, case, sudoku_dir)
        (run_dir / "mine.txt").write_text("a user's file")
        user_files = {p.relative_to(run_dir) for p in run_dir.rglob("*") if "checkpoints" not in p.parts}
        corrupt(ckpt.step_dir(run_dir, 6) / rel, how)
        assert main([str(cfg), "mode=auto"]) == 0, f"{how} {what}"
        err = capfd.readouterr().err
        assert "skipping checkpoint step_6" in err and rel in err and "resuming from step_4" in err, err[-2000:]
        _assert_same(want, _state(ckpt.step_dir(run_dir, 6)), f"{how} {what}")
        assert user_files <= {p.relative_to(run_dir) for p in run_dir.rglob("*")}, f"{how} {what}: a file was removed"
        assert (run_dir / "checkpoints" / "step_6.corrupt").is_dir(), "the corrupt one is set aside, not deleted"
        assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4, 6]
