"""The command lines' shared error format (``trm.cli``) and ``trm.export``'s refusal to touch what it
did not write, through the real entry points: ``python -m trm.X ARGS`` re-run as ``__main__`` by
``runpy`` in ONE subprocess for many invocations (one interpreter start instead of twenty)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env, write_config
from test_serve import copy_run, tiny_run  # noqa: F401  (the shared 6-step run)
from trm import cli

DRIVER = r"""
import contextlib, io, json, runpy, sys
results = []
for module, argv in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [module, *argv]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    results.append([code, out.getvalue(), err.getvalue()])
print("RESULTS " + json.dumps(results))
"""


def run_clis(cases: list[tuple[str, list[str]]]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of ``python -m MODULE ARGV`` for each case, all in one subprocess."""
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return [tuple(r) for r in json.loads(line[len("RESULTS "):])]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_error(result: tuple[int, str, str], prog: str, *says: str) -> None:
    """Exit 2, no traceback, exactly one ``<prog>: error:`` paragraph, containing every ``says``."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), err
    for text in says:
        assert text in errors[0], (text, errors[0])


def test_every_cli_turns_expected_failures_into_one_error_paragraph(tmp_path, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run", steps=(3, 6))
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "fresh_run", tmp_path / "no_data")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run_dir: runs/x\nmodel:\n  hidden_size: [32\ntrain: {max_steps: 3}\n")
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("my notes\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    exp = tmp_path / "exports" / "tiny"
    no_cuda = not torch.cuda.is_available()
    before = tree_digest(run)

    cases = {
        "train /proc/x": ("trm.train", [str(cfg), "run_dir=/proc/x"]),
        "train below a file": ("trm.train", [str(cfg), f"run_dir={a_file}/run"]),
        "train unwritable": ("trm.train", [str(cfg), "run_dir=/sys"]),
        "train yaml": ("trm.train", [str(bad_yaml)]),
        "train help": ("trm.train", ["--help"]),
        "train print-config": ("trm.train", [str(cfg), "model.hidden_size=48", "--print-config"]),
        "train version": ("trm.train", ["--version"]),
        "data /proc/x": ("trm.data", ["build", "sudoku", "--out", "/proc/x", "--train-puzzles", "2", "--aug", "0",
                                      "--test-puzzles", "1"]),
        "data typo": ("trm.data", ["build", "sudoku", "--out", str(tmp_path / "d"), "--train-puzzles", "2", "--aug", "0",
                                   "--test-puzzles", "1", "--sed", "3"]),
        "export into the run": ("trm.export", [str(run / "checkpoints" / "step_6"), "--out", str(run)]),
        "export to a file": ("trm.export", [str(run), "--out", str(run / "config.yaml")]),
        "export into a user's folder": ("trm.export", [str(run), "--out", str(user_dir), "--force"]),
        "export a run": ("trm.export", [str(run), "--out", str(exp)]),
        "export again": ("trm.export", [str(run), "--out", str(exp)]),
        "export --force": ("trm.export", [str(run), "--step", "latest", "--out", str(exp), "--force"]),
        "evaluate typo": ("trm.evaluate", [str(run), "data.eval_max_exmples=10"]),
        "plot no run": ("trm.plot", [str(empty)]),
        "serve typo": ("trm.serve", [str(run), "--prot", "8000"]),
        "serve version": ("trm.serve", ["--version"]),
    }
    if no_cuda:
        cases["train cuda"] = ("trm.train", [str(cfg), "device=cuda"])
        cases["evaluate cuda"] = ("trm.evaluate", [str(run), "device=cuda"])
    results = dict(zip(cases, run_clis(list(cases.values()))))

    assert_one_error(results["train /proc/x"], "trm.train", "run_dir /proc/x cannot be created", "Pick another run_dir")
    assert_one_error(results["train below a file"], "trm.train", f"({a_file} is a file)")
    assert_one_error(results["train unwritable"], "trm.train", "run_dir /sys cannot be written")
    assert_one_error(results["train yaml"], "trm.train", f"{bad_yaml} is not valid YAML: line 4, column 6",
                     "starts at line 3, column 16")
    code, out, _ = results["train help"]
    assert code == 0 and "model.hidden_size: int, default 512" in out and "Width D of every token state" in out
    from trm.config import Config, _schema_keys
    listed = {line.split(":")[0] for line in out.splitlines() if line and not line.startswith(" ")}
    for key in _schema_keys(Config):  # every key, list entries as key[i].field
        assert key.replace("curriculum.stages.", "curriculum.stages[i].") in listed, key
    code, out, _ = results["train print-config"]
    assert code == 0 and "  hidden_size: 48\n" in out and "  rope_theta: 10000.0\n" in out, out
    for name in ("train version", "serve version"):
        code, out, _ = results[name]
        assert code == 0 and out.startswith(f"{cases[name][0]} (trm ") and "torch" in out, out
    assert_one_error(results["data /proc/x"], "trm.data", "--out /proc/x cannot be created")
    assert_one_error(results["data typo"], "trm.data", "did you mean --seed?")
    assert not (tmp_path / "d").exists()

    # trm.export never deletes what it did not write
    assert_one_error(results["export into the run"], "trm.export", f"--out {run} is not empty and is not an export",
                     "metrics.jsonl")
    assert_one_error(results["export to a file"], "trm.export", "is a file, not a folder")
    assert_one_error(results["export into a user's folder"], "trm.export", "not even with --force")
    assert tree_digest(run) == before, "the run folder changed"
    assert (user_dir / "notes.txt").read_text() == "my notes\n" and len(list(user_dir.iterdir())) == 1
    code, out, err = results["export a run"]
    assert code == 0, err
    assert "the best checkpoint (eval/exact_accuracy = " in out and "exported step" in out
    assert_one_error(results["export again"], "trm.export", "already holds an export; pass --force")
    code, out, err = results["export --force"]
    assert code == 0 and "exported step 6" in out, err
    assert json.loads((exp / "export.json").read_text())["step"] == 6
    assert sorted(p.name for p in exp.parent.iterdir()) == ["tiny"], "a temporary folder was left behind"
    assert sorted(p.name for p in exp.iterdir()) == ["config.yaml", "export.json", "model.safetensors"]

    assert_one_error(results["evaluate typo"], "trm.evaluate", "Did you mean 'data.eval_max_examples'?")
    assert_one_error(results["plot no run"], "trm.plot", "metrics.jsonl is missing or empty")
    assert_one_error(results["serve typo"], "trm.serve", "did you mean --port?")
    if no_cuda:
        assert_one_error(results["train cuda"], "trm.train", "device=cuda was asked for, but no CUDA GPU is visible")
        assert_one_error(results["evaluate cuda"], "trm.evaluate", "no CUDA GPU is visible")
        assert not (tmp_path / "fresh_run").exists(), "a failed start must not create the run_dir"


def _run_captured(*args, **kwargs) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.run(*args, **kwargs)
    return code, err.getvalue()


def test_a_bug_gets_its_traceback_and_a_report_line_and_ctrl_c_says_how_to_continue():
    from trm.train.__main__ import _how_to_continue

    def buggy(argv):
        return {}["missing"]

    def interrupted(argv):
        raise KeyboardInterrupt

    def full_disk(argv):
        raise OSError(28, "No space left on device", "/data/x.npy")

    code, err = _run_captured("trm.plot", buggy, [])
    assert code == 1 and "Traceback" in err and "KeyError: 'missing'" in err
    assert "trm.plot: this is a bug in trm" in err and "issue tracker" in err and "trm 0." in err
    code, err = _run_captured("trm.train", interrupted, ["configs/tiny.yaml", "mode=new", "train.lr=1e-3"],
                              interrupted=_how_to_continue)
    assert code == 130 and "Traceback" not in err
    assert "trm.train: interrupted (Ctrl+C)" in err
    assert "python -m trm.train configs/tiny.yaml train.lr=1e-3 mode=resume" in err and "mode=auto" in err
    code, err = _run_captured("trm.data", full_disk, [])
    assert err == ("trm.data: error: /data/x.npy: No space left on device; the disk is full: "
                   "free some space or write elsewhere.\n") and code == 2
    from tqdm import tqdm

    with tqdm(total=3, file=io.StringIO()) as bar:  # an open progress bar: the error starts a new line
        bar.update(1)
        _, err = _run_captured("trm.data", full_disk, [])
    assert err.startswith("\ntrm.data: error: /data/x.npy")


def test_config_errors_name_line_column_and_the_closest_key(tmp_path):
    from trm.config import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: r\ntrain:\n  max_steps: 3\n   lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"line 4, column 6: mapping values are not allowed in this context.*'lr: 0.1'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"Did you mean 'data.eval_max_examples'\?.*python -m trm.train --help"):
        load_config(None, ["run_dir=r", "train.max_steps=1", "data.path=d", "data.eval_max_exmples=3"])


def test_launchers_report_their_own_checks_in_the_same_format(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("run_dir: runs/x\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python")}
    missing_python = subprocess.run(["bash", str(REPO / "launch" / "single_node.sh"), str(cfg)], env=env,
                                     capture_output=True, text=True, timeout=60)
    no_rendezvous = subprocess.run(["bash", str(REPO / "launch" / "multi_node.sh"), str(cfg)], env=env,
                                   capture_output=True, text=True, timeout=60)
    assert missing_python.returncode == 2 and missing_python.stdout == ""
    assert missing_python.stderr.startswith("single_node.sh: error: ") and "set PYTHON" in missing_python.stderr
    assert no_rendezvous.returncode == 2 and no_rendezvous.stderr.count("error:") == 1
    assert no_rendezvous.stderr.startswith("multi_node.sh: error: ") and "NODE_RANK is not set" in no_rendezvous.stderr


def test_every_expected_error_class_exists_and_out_of_memory_says_what_to_lower():
    """A renamed or moved error class would silently turn its clear message into a "bug" traceback."""
    import importlib

    for name in cli.EXPECTED_ERRORS:
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name
    def out_of_memory(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    code, err = _run_captured("trm.train", out_of_memory, [])
    assert code == 2 and err.startswith("trm.train: error: the device ran out of memory") and "global_batch_size" in err
