"""Shared fixtures: a small generated Sudoku dataset and a tiny run config."""

from __future__ import annotations

import os
import shutil

# The Triton kernels run in the CPU interpreter when no NVIDIA GPU is visible; triton reads this
# when a kernel is defined, so it is set before anything imports triton (checked without torch).
# On a GPU machine the interpreter stays off and the Triton kernels run compiled, on CUDA tensors:
# the gpu-marked tests, and the Triton cases of test_ops_dispatch.py / test_ops_verify.py (which
# pick the device Triton takes, ``kernel_device``); test_ops_triton.py's interpreter tests skip there.
# The interpreter's tl.dot is a numpy matmul of small blocks: multi-threaded OpenBLAS makes each
# ~100x slower on this shared 2-core machine, so numpy (not yet imported) gets one BLAS thread.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {
    "hidden_size": 32, "num_heads": 2, "expansion": 2, "H_cycles": 2, "L_cycles": 2, "L_layers": 1,
    "halt_max_steps": 4, "mlp_t": True, "pos_encodings": "none", "puzzle_emb_len": 2,
    "puzzle_emb_ndim": 32, "forward_dtype": "float32",
}


# ---------------------------------------------------------------------------------------------
# One seeded RNG per test, the seed printed on failure
# ---------------------------------------------------------------------------------------------

SEED_VARIABLE = "TRM_TEST_SEED"
_SEEDS = pytest.StashKey[dict]()


def seed_for(name: str) -> int:
    """The seed of test (or fixture) ``name``: a stable hash of the name, so every run draws the same
    inputs; ``TRM_TEST_SEED=N`` replaces it (to reproduce a failure), ``TRM_TEST_SEED=random``
    draws a fresh one (to explore). Failures print the seeds they used."""
    import random
    import zlib

    chosen = os.environ.get(SEED_VARIABLE, "")
    if chosen == "random":
        return random.SystemRandom().randrange(2**31)
    if chosen:
        return int(chosen)
    return zlib.crc32(name.encode()) % 2**31


def record_seed(node, label: str, value: int) -> None:
    """Note a seed that ``node`` (a test, or the module of a module-scoped fixture) used."""
    node.stash.setdefault(_SEEDS, {})[label] = value


@pytest.fixture(autouse=True)
def test_seed(request) -> int:
    """Seeds torch's, numpy's and Python's global generators for this test (so a test's every draw
    comes from one seed) and returns the seed; a failing test's report names it."""
    import random

    import numpy as np

    seed = seed_for(request.node.nodeid)
    record_seed(request.node, "test", seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def rng(test_seed):
    """A numpy Generator seeded with this test's seed."""
    import numpy as np

    return np.random.default_rng(test_seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        module = item.getparent(pytest.Module)
        seeds = {**(module.stash.get(_SEEDS, {}) if module else {}), **item.stash.get(_SEEDS, {})}
        if seeds:
            used = ", ".join(f"{label} {value}" for label, value in seeds.items())
            report.sections.append(("seeds", f"seeds used: {used}; rerun with {SEED_VARIABLE}=<seed> "
                                             f"to draw the same inputs"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sudoku_dir(tmp_path_factory) -> Path:
    """40 train puzzles (+1 stored augmentation each) and 12 test puzzles, 30-45 blanks."""
    from trm.data.sudoku import build_sudoku

    out = tmp_path_factory.mktemp("data") / "sudoku"
    build_sudoku(out, train_puzzles=40, test_puzzles=12, aug=1, seed=3, min_blanks=30, max_blanks=45, workers=1)
    return out


def write_config(path: Path, run_dir: Path, data_dir: Path, train: dict | None = None, model: dict | None = None, extra: str = "") -> Path:
    """A tiny run config (YAML) for fast CPU tests."""
    import yaml

    train_cfg = {
        "max_steps": 6, "global_batch_size": 8, "lr": 1e-3, "lr_warmup_steps": 2, "weight_decay": 0.1,
        "puzzle_emb_lr": 1e-2, "eval_interval": 3, "checkpoint_interval": 3, "log_interval": 1,
        "progress_bar": False, "ema_rate": 0.9, "keep_last": 2,
    }
    train_cfg.update(train or {})
    cfg = {
        "run_dir": str(run_dir), "seed": 7, "device": "cpu",
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"path": str(data_dir), "augment": "sudoku", "eval_max_examples": 8},
        "train": train_cfg,
    }
    path.write_text(yaml.safe_dump(cfg) + extra)
    return path


@pytest.fixture
def kernel_baselines(tmp_path, monkeypatch):
    """A temporary baselines directory for ``kernels=auto`` (``TRM_KERNEL_BASELINES``; the committed
    ones are never edited by a test): ``write({(backend, op): speedup}, device)`` records one for
    ``device`` (key ``trm.ops.baselines.device_key``) with a fwd+bwd entry per (backend, op);
    ``write(BACKED, device)`` backs every candidate of ``AUTO_ORDER`` there."""
    from trm.ops import baselines

    folder = tmp_path / "kernel-baselines"
    folder.mkdir()
    monkeypatch.setenv(baselines.ENV_DIR, str(folder))
    baselines.forget()

    def write(speedups, device="cpu", key=None):
        path = write_kernel_baseline(folder, speedups, device, key)
        baselines.forget()
        return path

    write.folder = folder
    yield write
    baselines.forget()


BACKED = object()   # kernel_baselines(BACKED): a baseline backing every auto candidate


def write_kernel_baseline(folder: Path, speedups, device="cpu", key=None) -> Path:
    """Write ``folder/<key>.json`` (key: ``trm.ops.baselines.device_key(device)`` unless given) with a
    fwd+bwd entry per (backend, op) of ``speedups``; ``BACKED`` backs every candidate of
    ``AUTO_ORDER`` on that device type at 2.0x. For tests that must not depend on which CPU model
    runs them (the committed baselines cover the machines they were measured on only)."""
    import json

    from trm.ops import baselines, dispatch

    if speedups is BACKED:
        dev = torch.device(device).type
        speedups = {(b, op): 2.0 for op, order in dispatch.AUTO_ORDER.items() for b in order.get(dev, ())}
    entries = {f"{op}/fwd+bwd/{backend}/float32/test": {"speedup": s} for (backend, op), s in speedups.items()}
    path = Path(folder) / f"{key or baselines.device_key(device)}.json"
    path.write_text(json.dumps({"device": path.stem, "benchmarks": entries}))
    return path


def proves_kernels_ran(backend, op: str, file: str, *kernels: str):
    """Decorator of a kernel check helper: the check must launch every one of ``kernels`` (of the
    kernel file ``csrc/.../<file>``) and must not hand any call of ``backend``'s ``op`` to the
    reference (``trm.ops.counters``), so a check never passes by comparing the reference with itself.
    ``backend``: a name, or a function of the helper's arguments that returns it (its device)."""
    import functools

    def decorate(check):
        @functools.wraps(check)
        def checked(*args, **kwargs):
            from trm.ops import counters

            name = backend(*args, **kwargs) if callable(backend) else backend
            with counters.record() as seen:
                result = check(*args, **kwargs)
            missing = [k for k in kernels if not seen.ran(name, file, k)]
            assert not missing, f"{check.__name__}: the {name} kernel(s) {missing} of {file} did not run ({seen})"
            fell = seen.fell_back(name, op)
            assert not fell, f"{check.__name__}: {name} {op} handed {fell} to the reference"
            return result
        return checked
    return decorate


RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def environ_without_ranks() -> dict[str, str]:
    """This process's environment without the rank variables (RANK, MASTER_PORT, ...) that an
    in-process trainer may have set: the base of every subprocess's environment."""
    return {k: v for k, v in os.environ.items() if k not in RANK_VARS}


def subprocess_env(threads: str = "2") -> dict[str, str]:
    """The environment of a single-process ``trm`` subprocess: this one without the rank variables
    an in-process trainer may have set, ``threads`` OpenMP threads, the repository importable."""
    env = environ_without_ranks()
    env.update(OMP_NUM_THREADS=threads, PYTHONPATH=str(REPO))
    return env


@pytest.fixture(autouse=True)
def restore_rank_variables():
    """In-process trainers and evaluations set RANK/MASTER_PORT/...; put them back after every test
    so that later subprocesses (in any test file) do not inherit a port this process already holds.
    (Module- or session-scoped fixtures that train in process set them before any test starts: a
    test that starts subprocesses builds their environment without RANK_VARS, as subprocess_env.)"""
    saved = {name: os.environ.get(name) for name in RANK_VARS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def restore_kernel_backend():
    """In-process trainers set the global op backend (``kernels``, default auto), also from
    module-scoped fixtures; after every test the library's default (torch, no per-op overrides)
    is back, so that no test inherits the kernels of an earlier one."""
    from trm.ops import dispatch

    yield
    dispatch._restore("torch", {})


def run_train(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m trm.train ARGS`` in a subprocess (one process, CPU, two threads)."""
    proc = subprocess.run([sys.executable, "-m", "trm.train", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trm.train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def kill_at_checkpoint(cfg: Path, run_dir: Path, step: int, deadline_s: float = 240) -> None:
    """Start ``python -m trm.train cfg``, SIGKILL it as soon as the checkpoint of ``step`` is
    complete (a crash mid-run). The caller checks that the kill came before the run's end."""
    import signal
    import time

    from trm.train import checkpoint as ckpt

    proc = subprocess.Popen([sys.executable, "-m", "trm.train", str(cfg)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + deadline_s
    try:
        while not ckpt.is_complete(ckpt.step_dir(run_dir, step)):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(0.02)  # the run has several steps left after it: polling leaves it the CPU
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
