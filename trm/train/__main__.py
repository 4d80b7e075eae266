"""Train a TRM.

    python -m trm.train configs/tiny.yaml                       # one process (CPU or one GPU)
    python -m trm.train --config configs/tiny.yaml train.max_steps=50 run_dir=runs/x
    torchrun --nproc_per_node=8 -m trm.train configs/large.yaml
    deepspeed --hostfile hosts -m trm.train configs/large.yaml

Modes: ``mode=new`` (default; refuses a run_dir holding a previous run's files unless
``overwrite=true``), ``mode=resume`` (newest checkpoint that verifies, or ``resume_from=PATH``),
``mode=auto`` (resume if possible, falling back past corrupt checkpoints), ``mode=service`` (serve the
run's newest checkpoint over HTTP and follow new ones; see ``trm.serve``).

SIGTERM / SIGUSR1 (preemption) and Ctrl+C finish the current step, save a checkpoint and exit with
128 + the signal's number (143, 138, 130) after printing the command that resumes; a second Ctrl+C
aborts at once (exit 130).

``--print-config`` prints the resolved config (schema defaults < CONFIG < overrides) and exits;
``--version`` prints the versions of trm, torch and Python. Every key is listed below.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from trm import cli, ops
from trm.config import Config, ConfigError, describe_keys, load_config, to_yaml
from trm.factories import build_dataset, build_model_for, build_trainer
from trm.train import checkpoint as ckpt
from trm.train.distributed import init_world
from trm.train.shared_storage import check_shared_run_dir

USAGE = "usage: python -m trm.train CONFIG.yaml [key=value ...]   (or --config CONFIG.yaml)"


class RunError(ValueError):
    """The run cannot start as asked (mode vs. existing checkpoints, ...)."""


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """CONFIG (positional or --config) and key=value overrides; an injected --local_rank is ignored."""
    config, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__ + "\nConfig keys (set in the YAML or as key=value):\n\n" + describe_keys())
            raise SystemExit(0)
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            i += 1 if "=" in arg else 2
            continue
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError(f"--config needs a file name. {USAGE}")
            config, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"Unknown option {arg!r}: the options are --config, --print-config, --help and --version; "
                              f"config keys are set as key=value. {USAGE}")
        elif "=" not in arg and config is None:
            config = arg
        else:
            overrides.append(arg)
        i += 1
    if config is None:
        raise ConfigError(f"No config file given. {USAGE}")
    return config, overrides


PREVIOUS_RUN_FILES = ("metrics.jsonl", "config.yaml", "tensorboard", "checkpoints", "eval", "learning_curves.png")
"""What a run writes at the top of its run_dir: mode=new refuses a run_dir holding any of them."""


def _previous_run_files(run_dir: Path) -> list[str]:
    return [name for name in PREVIOUS_RUN_FILES if (run_dir / name).exists()]


def _set_previous_run_aside(run_dir: Path, names: list[str]) -> Path:
    """overwrite=true: move the previous run's files into run_dir/previous_<UTC time>/ (never deleted)."""
    stamp = time.strftime("previous_%Y%m%d-%H%M%S", time.gmtime())
    target, k = run_dir / stamp, 1
    while target.exists():
        k += 1
        target = run_dir / f"{stamp}.{k}"
    target.mkdir()
    for name in names:
        os.replace(run_dir / name, target / name)
    return target


def _report_skipped(path: Path, reason: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"trm.train: WARNING: skipping checkpoint {path.name}: {reason}", file=sys.stderr, flush=True)


def resolve_resume(cfg: Config) -> Path | None:
    """Which checkpoint to start from, per ``mode`` (None: a fresh run). Every checkpoint is
    verified against its manifest; mode=auto falls back past corrupt ones (saying so), mode=resume
    refuses and names the newest good one. A checkpoint's config must be complete and compatible
    with ``cfg`` (``ckpt.check_resume_config``)."""
    run_dir = Path(cfg.run_dir)
    if cfg.mode == "new":
        previous = _previous_run_files(run_dir)
        if previous and not cfg.overwrite:
            raise RunError(
                f"run_dir {run_dir} already holds a previous run's files ({', '.join(previous)}); mode=new does not "
                f"overwrite them. Continue that run with mode=resume or mode=auto, pick another run_dir, or pass "
                f"overwrite=true to start afresh (the old files are moved to {run_dir}/previous_<time>/, not deleted)."
            )
        if previous and int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            aside = _set_previous_run_aside(run_dir, previous)
            print(f"trm.train: overwrite=true: moved the previous run's {', '.join(previous)} to {aside}",
                  file=sys.stderr, flush=True)
        return None
    if cfg.resume_from:
        chosen = Path(cfg.resume_from)
        if not ckpt.is_complete(chosen):
            raise RunError(f"resume_from={chosen} is not a complete checkpoint (no {ckpt.COMMIT_MARKER} marker).")
        problem = ckpt.checkpoint_problem(chosen)
        if problem:
            raise RunError(f"resume_from={chosen}: {problem} Pick another checkpoint of the run "
                           f"(ls {chosen.parent}).")
    else:
        committed = ckpt.list_checkpoints(run_dir)
        skipped: list[tuple[Path, str]] = []
        chosen = ckpt.find_latest_checkpoint(run_dir, on_skip=lambda path, why: skipped.append((path, why)))
        if skipped and cfg.mode == "resume":
            fix = (f"resume from the newest good one with resume_from={chosen} (or use mode=auto, which falls back "
                   f"to it by itself)" if chosen is not None
                   else "no older checkpoint verifies either; start afresh with mode=new overwrite=true")
            raise RunError(f"mode=resume: the newest checkpoint of {run_dir} is unusable: {skipped[0][1]} "
                           f"To continue, {fix}.")
        if skipped and chosen is None:  # mode=auto: starting afresh would discard the run's files
            raise RunError(f"mode=auto: none of the {len(committed)} checkpoints of {run_dir} verifies (newest: "
                           f"{skipped[0][1]}) To start afresh, pass mode=new overwrite=true (the old files are moved "
                           f"aside, not deleted).")
        for path, why in skipped:
            _report_skipped(path, why)
        if skipped:
            _report_skipped_summary(chosen)
        if chosen is None:
            if cfg.mode == "auto":
                return None
            raise RunError(f"mode=resume but run_dir {run_dir} has no complete checkpoint to resume from.")
    ckpt.check_resume_config(cfg, chosen)
    return chosen


def _report_skipped_summary(chosen: Path | None) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"trm.train: WARNING: mode=auto is resuming from {chosen.name}, the newest checkpoint that verifies; "
              f"the steps after it are trained again.", file=sys.stderr, flush=True)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run (the same arguments with mode=resume)."""
    args = [a for a in argv if not a.startswith(("mode=", "resume_from=", "overwrite=", "--local_rank", "--local-rank"))]
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        launcher = "python -m trm.train"
    elif "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        launcher = f"torchrun --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']} -m trm.train"
    else:
        launcher = "<the same launcher> -m trm.train"
    return f"{launcher} {shlex.join(args + ['mode=resume'])}"


def _how_to_continue(argv: list[str]) -> str:
    """After a second Ctrl+C (nothing saved since the last checkpoint): the command that continues."""
    return (f"nothing was saved since the last checkpoint. Continue from it with: {resume_command(argv)} "
            f"(or mode=auto, which also starts afresh when there is no checkpoint yet)")


def _train(argv: list[str]) -> int:
    config_path, overrides = parse_args([a for a in argv if a != "--print-config"])
    cfg = load_config(config_path, overrides)
    if "--print-config" in argv:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.mode == "service":  # serve the run's newest checkpoint and follow new ones (trm.serve)
        from trm.serve import serve_config

        return serve_config(cfg)
    cli.check_device(cfg.device)
    try:
        ops.set_backend(cfg.kernels)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"kernels={cfg.kernels}: {err}") from None
    cli.ensure_writable_dir(cfg.run_dir, "run_dir")
    world = init_world(cfg.device, cfg.train.collective_timeout_minutes)
    check_shared_run_dir(cfg.run_dir, world)  # before any rank reads checkpoints: all ranks see one run_dir
    resume_from = resolve_resume(cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    dataset = build_dataset(cfg, world)
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, dataset.model_dims, world)
    torch.manual_seed(cfg.seed * 1_000_003 + world.rank + 1)
    trainer = build_trainer(cfg, world, model, dataset, resume_from)
    result = trainer.fit()
    if getattr(trainer, "stopped_by", None) is not None:
        if world.is_main:
            print(f"trm.train: stopped by {signal.Signals(trainer.stopped_by).name} at step {trainer.step}; checkpoint "
                  f"{trainer.last_checkpoint} is complete. Resume with: {resume_command(argv)}", file=sys.stderr, flush=True)
        return 128 + trainer.stopped_by
    if result and world.is_main:
        print("final evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return 0


@record
def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: an error explained on stderr, 130: interrupted)."""
    return cli.run("trm.train", _train, argv, interrupted=_how_to_continue)


if __name__ == "__main__":
    sys.exit(main())
