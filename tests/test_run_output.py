"""What a run prints (trm.train.runtime): no library start-up noise, one line in our words, the
final lines naming its outputs, a resume naming its step, an error on its own line."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from conftest import run_train, write_config

NOISE = ("Setting accelerator to CPU", "No CUDA runtime is found", "built successfully", "unable to detect")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, sudoku_dir):
    root = tmp_path_factory.mktemp("output")
    cfg = write_config(root / "cfg.yaml", root / "run", sudoku_dir,
                       train={"max_steps": 3, "progress_bar": True, "eval_interval": 0, "checkpoint_interval": 3,
                              "eval_batch_size": 4})
    return root, run_train(str(cfg))


def test_a_run_says_once_what_runs_and_where_its_outputs_went(first_run, sudoku_dir):
    root, proc = first_run
    both = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in both, f"{noise!r} printed:\n{both[-3000:]}"
    starts = [line for line in proc.stdout.splitlines() if line.startswith("trm.train: ")]
    assert len(starts) == 1, proc.stdout
    start = starts[0]
    for part in (f"new run in {root / 'run'}", "device cpu", "1 process(es)",
                 f"data {sudoku_dir} (80 training / 12 held-out examples, seq_len 81)", "no MFU"):
        assert part in start, (part, start)
    # the default kernels=auto, in a few words: the kernels its baselines back, else why none
    assert re.search(r" · kernels=auto: (cpu: [a-z_, ]+; the rest the reference"
                     r"|the reference \(no baseline for cpu-[a-z0-9-]+ in [^;]+; trm\.ops\.describe\(\) says more\)) · ",
                     start), start
    assert "evaluate" in proc.stderr  # the final evaluation's progress bar (2 batches of 4)
    tail = proc.stdout.splitlines()[-12:]
    assert any(line.startswith("final evaluation of step 3 on 8 held-out examples") for line in tail), tail
    assert any(re.match(r"\s+eval/exact_accuracy: \d\.\d{4} \(95% CI \d\.\d{4}-\d\.\d{4}, n=8\)", line) for line in tail)
    assert f"checkpoints: {root / 'run' / 'checkpoints'} (step_3;" in proc.stdout
    assert (f"metrics: {root / 'run' / 'metrics.jsonl'}" in proc.stdout
            and f"learning curves: {root / 'run' / 'learning_curves.png'}" in proc.stdout)


def test_resume_names_its_step_and_an_error_starts_its_own_line(first_run, restore_rank_variables):
    """Resumed in this process with a learning rate that makes the loss blow up: the start line names
    the step it resumed from; the NaN error is not glued onto the progress bar's line."""
    from trm.train.__main__ import main

    root, _ = first_run
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(root / "cfg.yaml"), "mode=resume", "train.max_steps=9", "train.lr=1e30",
                     "train.lr_warmup_steps=0", "train.skip_nonfinite=false", "train.checkpoint_interval=0"])
    assert code == 2, err.getvalue()
    assert f"trm.train: resumed from step 3 ({root / 'run' / 'checkpoints' / 'step_3'}" in out.getvalue()
    lines = re.split(r"[\r\n]", err.getvalue())
    error = [line for line in lines if "trm.train: error:" in line]
    assert error and all(line.startswith("trm.train: error: The loss was NaN/inf") for line in error), err.getvalue()
