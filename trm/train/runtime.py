"""What a run says about itself: start-up noise of the libraries kept out, one line in our words
at the start, and where everything went at the end.

``quiet_startup()`` (called by ``trm.train`` and ``trm.evaluate`` before DeepSpeed is imported):

- without a visible CUDA GPU, ``DS_ACCELERATOR=cpu`` (unless set): DeepSpeed would otherwise warn
  "Setting accelerator to CPU. If you have GPU ... unable to detect it" on every start (twice
  under torchrun), which reads like a fault on a CPU machine;
- torch's "No CUDA runtime is found, using CUDA_HOME=..." is dropped: it only says that a CUDA
  toolkit is installed on a machine without a GPU (the device line below says what runs);
- DeepSpeed's CPU communication op (``deepspeed_shm_comm``, JIT-built with ninja once per
  machine and cached by torch) is loaded in a step that says so when it has to be built (about
  two minutes on 2 cores, which used to pass in silence), and its "built successfully" line,
  printed on every start whether anything was built or not, is not repeated. It is built into a
  folder of its own per Python environment (``<torch's cache>/venv-<hash of sys.prefix>``, unless
  ``TORCH_EXTENSIONS_DIR`` is set): the build embeds the environment's paths, so two virtualenvs
  sharing torch's one folder rebuilt it on every alternate start.

``describe_run(trainer)``: the one line the trainer prints at the start (new or resumed at which
step, device and threads, world size, which kernels run, data, MFU or why not). ``run_summary``:
the final lines (evaluation with 95% intervals, checkpoints, metrics file, TensorBoard, plot).

Test: ``pytest tests/test_run_output.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

QUIET_TORCH_MESSAGES = ("No CUDA runtime is found",)
"""Start of torch.utils.cpp_extension warnings that carry no news on a CPU-only machine."""


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def _is_local_main() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") in ("0", os.environ.get("LOCAL_RANK", "0"))


def quiet_startup() -> None:
    """See the module docstring. Idempotent; changes nothing when a GPU is visible except the
    comm-op step (which DeepSpeed uses only on CPU)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")
        if not any(isinstance(f, _DropMessages) for f in cpp_logger.filters):
            cpp_logger.addFilter(_DropMessages(QUIET_TORCH_MESSAGES))
    try:
        import importlib

        # by module name: the package attribute deepspeed.comm.torch is the torch package itself
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if getattr(ds_comm_torch, "build_shm_op", None) is not None and ds_comm_torch.build_shm_op is not _load_shm_op:
        ds_comm_torch.build_shm_op = _load_shm_op


def _extension_is_cached(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # a private torch helper: if it moved, say that a build may happen
        return False


@contextlib.contextmanager
def _per_environment_extension_dir(name: str) -> Iterator[None]:
    """``TORCH_EXTENSIONS_DIR`` pointed at a folder of this Python environment's own while DeepSpeed
    builds or loads its op (see the module docstring); a user's own setting is kept."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        yield
        return
    import zlib

    import torch.utils.cpp_extension as cpp

    try:
        default_root = Path(cpp._get_build_directory(name, verbose=False)).parent  # noqa: SLF001 (torch's own rule)
    except Exception:  # a private torch helper: if it moved, keep torch's folder
        yield
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(default_root / f"venv-{zlib.crc32(sys.prefix.encode()):08x}")
    try:
        yield
    finally:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)


def _load_shm_op():
    """DeepSpeed's ``build_shm_op``, with an explained step instead of a silent build."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    with _per_environment_extension_dir(builder.name):
        building = not _extension_is_cached(builder.name)
        if building and _is_local_main():
            print(f"trm: building DeepSpeed's CPU communication op ({builder.name}) with ninja: once per Python "
                  f"environment, about 2 minutes on 2 cores; later runs load it from torch's extension cache",
                  file=sys.stderr, flush=True)
        started = time.perf_counter()
        module = builder.load()
    if building and _is_local_main():
        print(f"trm: built {builder.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return module


def describe_run(trainer: Any) -> str:
    """``trm.train: new run | resumed from step N (CHECKPOINT) · ...`` (one line)."""
    import torch

    from trm import ops

    cfg, world = trainer.cfg, trainer.world
    if trainer.resume_from is not None:
        start = f"resumed from step {trainer.step} ({trainer.resume_from}, data position {trainer.stream_position})"
    else:
        start = f"new run in {cfg.run_dir}"
    device = world.device
    where = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    kernels = ops.summary(device)
    ds = trainer.dataset
    base = getattr(ds, "base", ds)  # a wrapper (the retrieval-augmented dataset) describes its base's data
    data = (f"data {cfg.data.path} ({base.train.num_examples} training / {ds.num_eval_examples} held-out examples, "
            f"seq_len {ds.model_dims['seq_len']})")
    peak = trainer.throughput.peak_tflops
    mfu = (f"MFU against {peak:g} TFLOP/s per device" if peak else
           "no MFU (no known peak for this device; set train.peak_tflops to one you measured)")
    return (f"trm.train: {start} · device {device} ({where}) · {world.size} process(es), ZeRO stage "
            f"{cfg.deepspeed.zero_stage} · kernels={cfg.kernels}: {kernels} · {data} · {mfu}")


def run_summary(cfg: Any, result: dict[str, float], step: int | None = None) -> str:
    """The final lines of a run: its last evaluation and where its outputs are."""
    from trm.eval.metrics import format_evaluation
    from trm.train import checkpoint as ckpt

    run_dir = Path(cfg.run_dir)
    lines = []
    if result:
        n = result.get("eval/count")
        lines.append(f"final evaluation{f' of step {step}' if step is not None else ''}"
                     f"{f' on {n:.0f} held-out examples' if n is not None else ''}:")
        lines.append(format_evaluation(result))
    kept = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if ckpt.is_complete(p)),
                  key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)
    if kept:
        lines.append(f"checkpoints: {run_dir / 'checkpoints'} ({', '.join(p.name for p in kept)}; "
                     f"continue with mode=resume)")
    outputs = [("metrics", run_dir / "metrics.jsonl"), ("TensorBoard", run_dir / "tensorboard"),
               ("learning curves", run_dir / "learning_curves.png")]
    lines.append(" · ".join(f"{what}: {path}" for what, path in outputs if path.exists()))
    return "\n".join(line for line in lines if line)
