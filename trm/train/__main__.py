"""Train a TRM.

    python -m trm.train configs/tiny.yaml                       # one process (CPU or one GPU)
    python -m trm.train --config configs/tiny.yaml train.max_steps=50 run_dir=runs/x
    torchrun --nproc_per_node=8 -m trm.train configs/large.yaml
    deepspeed --hostfile hosts -m trm.train configs/large.yaml

Modes: ``mode=new`` (default; refuses a run_dir that has checkpoints), ``mode=resume``
(latest complete checkpoint, or ``resume_from=PATH``), ``mode=auto`` (resume if possible),
``mode=service`` (serve the run's newest checkpoint over HTTP and follow new ones; see ``trm.serve``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from trm import ops
from trm.config import Config, ConfigError, load_config
from trm.data.format import DatasetError
from trm.factories import build_dataset, build_model_for, build_trainer
from trm.train.checkpoint import CheckpointError, find_latest_checkpoint, is_complete
from trm.train.distributed import init_world
from trm.train.shared_storage import check_shared_run_dir
from trm.train.trainer import NonFiniteLossError

USAGE = "usage: python -m trm.train CONFIG.yaml [key=value ...]   (or --config CONFIG.yaml)"


class RunError(ValueError):
    """The run cannot start as asked (mode vs. existing checkpoints, ...)."""


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """CONFIG (positional or --config) and key=value overrides; an injected --local_rank is ignored."""
    config, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
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
        elif "=" not in arg and config is None:
            config = arg
        else:
            overrides.append(arg)
        i += 1
    if config is None:
        raise ConfigError(f"No config file given. {USAGE}")
    return config, overrides


def resolve_resume(cfg: Config) -> Path | None:
    """Which checkpoint to start from, per ``mode`` (None: a fresh run)."""
    latest = find_latest_checkpoint(cfg.run_dir)
    if cfg.mode == "new":
        if latest is not None:
            raise RunError(
                f"run_dir {cfg.run_dir} already has checkpoints (latest: {latest.name}); mode=new refuses to "
                f"overwrite them. Use mode=resume or mode=auto to continue, or pick another run_dir."
            )
        return None
    chosen = Path(cfg.resume_from) if cfg.resume_from else latest
    if chosen is None:
        if cfg.mode == "auto":
            return None
        raise RunError(f"mode=resume but run_dir {cfg.run_dir} has no complete checkpoint to resume from.")
    if not is_complete(chosen):
        raise RunError(f"resume_from={chosen} is not a complete checkpoint (no COMPLETE marker).")
    return chosen


@record
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides)
        if cfg.mode == "service":  # serve the run's newest checkpoint and follow new ones (trm.serve)
            from trm.serve import serve_config

            return serve_config(cfg)
        try:
            ops.set_backend(cfg.kernels)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"kernels={cfg.kernels}: {err}") from None
        world = init_world(cfg.device, cfg.train.collective_timeout_minutes)
        check_shared_run_dir(cfg.run_dir, world)  # before any rank reads checkpoints: all ranks see one run_dir
        resume_from = resolve_resume(cfg)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        dataset = build_dataset(cfg, world)
        torch.manual_seed(cfg.seed)
        model = build_model_for(cfg, dataset.model_dims, world)
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank + 1)
        trainer = build_trainer(cfg, world, model, dataset, resume_from)
        result = trainer.fit()
    except (ConfigError, DatasetError, CheckpointError, RunError, NonFiniteLossError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"trm.train: error: {err}", file=sys.stderr)
        return 2
    if result and world.is_main:
        print("final evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
