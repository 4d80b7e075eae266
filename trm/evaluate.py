"""Evaluate a checkpoint on its dataset's evaluation split and write the results as JSON.

    python -m trm.evaluate runs/tiny                               # latest complete checkpoint of a run
    python -m trm.evaluate runs/tiny step=500                      # a given step (or step=best)
    python -m trm.evaluate runs/tiny/checkpoints/step_1000 data.eval_max_examples=null out=res.json
    python -m trm.evaluate reference.pt config=configs/sudoku_mlp.yaml data.path=data/sudoku-extreme
    python -m trm.evaluate exports/tiny                            # a folder written by trm.export
    torchrun --nproc_per_node=2 -m trm.evaluate runs/tiny          # N processes: same numbers

Our checkpoints are loaded exactly as a resumed run loads them (DeepSpeed files at any world
size, EMA shadow, puzzle table) and evaluated by the trainer's own ``evaluate``: with the EMA
weights when the run keeps an EMA, all ``eval_halt_max_steps`` supervision steps, and the
early-exit policy (stop a sample at its first q_halt > 0) in the same pass. So the numbers equal
what the trainer logged in metrics.jsonl for that step (same eval batch size and example count).

The config is the checkpoint's own ``config.yaml``; overrides may change only how evaluation
runs (EVAL_OVERRIDES: split, example count, batch size, steps, depth, device), never the model.
An export folder (``python -m trm.export``: model.safetensors + config.yaml + export.json) is
evaluated with its own config.yaml and the same overrides; its weights (the EMA's when the run
kept one) are read from safetensors only, nothing is unpickled, and the numbers equal those of
the checkpoint it was exported from.
A reference state dict (a ``.pt`` of the reference implementation's weights) needs a config:
``config=PATH`` and/or key=value overrides (at least data.path and the model keys it was trained
with). Results go to ``out=PATH`` (default ``<run_dir>/eval/step_N.json``,
``<dir>/eval/<name>.json`` next to a state dict, ``<parent>/eval/<export>_step_N.json`` next to
an export folder), written by rank 0. On an ARC dataset the results include the voting metrics
(``eval/arc/pass@k``) and rank 0 writes the ARC Prize submission next to them
(``submission_step_N.json``; ``submission_<name>.json`` for a state dict or an export).

A checkpoint is verified against the manifest of its COMPLETE marker first: a corrupt one is
named as such (with the bad file, and for a run directory the ``step=`` of the newest good one),
and its config.yaml must name every key (``load_saved_config``).

Errors (missing, incomplete or corrupt checkpoint, forbidden override, weights that do not fit
the config) exit with status 2 and one paragraph on stderr.

Test: ``pytest tests/test_evaluate.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from trm import cli
from trm.config import ConfigError, did_you_mean, is_schema_key, load_config, load_saved_config, to_dict
from trm.train import checkpoint as ckpt

USAGE = "usage: python -m trm.evaluate <run_dir|checkpoint_dir|state_dict.pt> [config=PATH] [step=N|best] [out=PATH] [key=value ...]"

EVAL_OVERRIDES = (
    "device", "kernels", "data.path", "data.eval_split", "data.eval_max_examples", "data.rag.cache_dir",
    "train.eval_batch_size", "train.eval_halt_max_steps", "train.num_threads", "train.collective_timeout_minutes",
    "train.arc_pass_ks",
    "model.halt_max_steps", "model.H_cycles", "model.L_cycles", "model.forward_dtype",
)
"""Keys an evaluation of one of our checkpoints may override: none of them changes the weights."""


class EvaluateError(ValueError):
    """The evaluation cannot run as asked; the message says why and what to do."""


@dataclasses.dataclass
class Request:
    target: Path
    config: str | None
    step: str | None
    out: str | None
    overrides: list[str]


def parse_args(argv: list[str]) -> Request:
    target, config, step, out, overrides = None, None, None, None, []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            continue
        if arg.startswith("-"):
            raise EvaluateError(f"Unknown option {arg!r}: the options are --help and --version; everything else is "
                                f"config=, step=, out= or key=value. {USAGE}")
        name, eq, value = arg.partition("=")
        if not eq:
            if target is not None:
                raise EvaluateError(f"Two things to evaluate given ({target} and {arg}). {USAGE}")
            target = Path(arg)
        elif name == "config":
            config = value
        elif name == "step":
            step = value
        elif name == "out":
            out = value
        else:
            overrides.append(arg)
    if target is None:
        raise EvaluateError(f"Nothing to evaluate: give a run directory, a checkpoint directory or a state dict. {USAGE}")
    return Request(target, config, step, out, overrides)


def resolve_checkpoint(target: Path, step: str | None) -> Path:
    """The complete checkpoint directory that ``target`` (a run dir or a checkpoint dir) names."""
    if not target.exists():
        raise EvaluateError(f"{target} does not exist. Give a run directory, a checkpoint directory "
                            f"(<run_dir>/checkpoints/step_N) or a reference state dict (.pt).")
    if (target / "trainer_state.pt").exists() or ckpt.STEP_DIR.match(target.name):
        if step is not None:
            raise EvaluateError(f"step={step} only applies to a run directory; {target} is already a checkpoint.")
        if not ckpt.is_complete(target):
            raise EvaluateError(
                f"Checkpoint {target} is incomplete (no {ckpt.COMMIT_MARKER} marker: its save did not finish). "
                f"Evaluate a complete one, e.g. the run directory (its latest complete checkpoint)."
            )
        ckpt.verify_checkpoint(target)
        return target
    found = ckpt.list_checkpoints(target)
    if not found:
        raise EvaluateError(f"{target} has no complete checkpoint (looked for {ckpt.checkpoint_root(target)}/step_N "
                            f"with a {ckpt.COMMIT_MARKER} marker).")
    if step is None or step == "latest":
        newest = found[-1][1]
        problem = ckpt.checkpoint_problem(newest)
        if problem:
            good = ckpt.find_latest_checkpoint(target, on_skip=None)
            raise EvaluateError(f"{problem} " + (f"The newest good checkpoint is {good.name}: evaluate it with step="
                                                 f"{good.name.split('_')[-1]}." if good else "No checkpoint of the run verifies."))
        return newest
    if step == "best":
        state = ckpt.load_torch(found[-1][1] / "trainer_state.pt")
        best = state.get("best_step") if isinstance(state, dict) else None
        if best is None:
            raise EvaluateError(f"{target} has no best checkpoint recorded yet (no evaluation happened); use step=N.")
        step = str(best)
    if not step.isdigit():
        raise EvaluateError(f"step={step} must be a step number, 'latest' or 'best'.")
    by_step = dict(found)
    if int(step) not in by_step:
        raise EvaluateError(f"{target} has no complete checkpoint at step {step}; it has steps {sorted(by_step)}.")
    ckpt.verify_checkpoint(by_step[int(step)])
    return by_step[int(step)]


def _check_overrides(overrides: list[str], checkpoint: Path) -> None:
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if not is_schema_key(key):
            close = difflib.get_close_matches(key, [*EVAL_OVERRIDES, "config", "step", "out"], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else did_you_mean(key)
            raise EvaluateError(f"Unknown key '{key}' on the command line.{hint} Keys an evaluation may set: "
                                f"config=, step=, out= and {', '.join(EVAL_OVERRIDES)}.")
        if key not in EVAL_OVERRIDES:
            raise EvaluateError(
                f"Override '{key}' would change the model or the training setup that checkpoint {checkpoint} was "
                f"saved with, so it cannot be evaluated that way. Overrides allowed here: {', '.join(EVAL_OVERRIDES)}. "
                f"(To evaluate weights under another architecture, export them and evaluate the state dict with config=PATH.)"
            )


def _state_dict_config(request: Request):
    """Config for a reference state dict: the given YAML (if any) + overrides; run_dir and
    train.max_steps (unused here) get placeholders when nothing sets them."""
    from omegaconf import OmegaConf

    given: set[str] = {o.split("=", 1)[0].strip() for o in request.overrides}
    if request.config is not None and Path(request.config).is_file():
        loaded = OmegaConf.load(request.config)
        given |= {k for k in ("run_dir", "train.max_steps") if OmegaConf.select(loaded, k, default=None) is not None}
    defaults = [f"run_dir={request.target.parent}"] if "run_dir" not in given else []
    defaults += ["train.max_steps=1"] if "train.max_steps" not in given else []
    return load_config(request.config, defaults + request.overrides)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EvaluateError(f"{path} cannot be read as a PyTorch state dict ({type(err).__name__}: {err}).") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaluateError(f"{path} is not a state dict (a mapping of parameter names to tensors).")
    return state


def _export_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, export.json) of an export folder, from safetensors and JSON only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from trm.export import EXPORT_FORMAT, INFO_FILE, WEIGHTS_FILE

    try:
        info = json.loads((path / INFO_FILE).read_text())
        weights = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (OSError, ValueError, SafetensorError) as err:
        raise EvaluateError(f"Export folder {path} cannot be read ({err}); re-export it with "
                            f"`python -m trm.export CHECKPOINT --out {path}`.") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or not isinstance(info.get("step"), int):
        raise EvaluateError(f"{path / INFO_FILE} is not an export of format {EXPORT_FORMAT}; re-export the checkpoint "
                            f"with `python -m trm.export CHECKPOINT --out {path}`.")
    return weights, info


def default_out(target: Path, checkpoint: Path | None, step: int | None, export: bool = False) -> Path:
    if export:
        return target.parent / "eval" / f"{target.name}_step_{step}.json"
    if checkpoint is None:
        return target.parent / "eval" / f"{target.stem}.json"
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    return run_dir / "eval" / f"step_{step}.json"


def evaluate(request: Request) -> dict[str, Any]:
    """Run the evaluation described by ``request`` (in this process's world); rank 0 writes the JSON."""
    from trm import ops
    from trm.factories import build_dataset, build_model_for, build_trainer
    from trm.model import load_reference_state_dict
    from trm.train.distributed import init_world

    from trm.export import is_export_dir

    target = request.target
    state_dict = None
    export_info = None
    if target.is_dir() and is_export_dir(target):
        if request.step is not None:
            raise EvaluateError(f"step={request.step} only applies to a run directory; {target} is an export of one step.")
        if request.config is not None:
            raise EvaluateError(f"config= applies to a state dict only; export {target} is evaluated with its own "
                                f"config.yaml (change evaluation keys with key=value).")
        checkpoint = None
        _check_overrides(request.overrides, target)
        state_dict, export_info = _export_weights(target)
        cfg = load_saved_config(target / "config.yaml", request.overrides)
        # The exported weights ARE the EMA weights when the run kept an EMA: evaluate them as they are.
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema=False))
    elif target.is_file():
        if request.step is not None:
            raise EvaluateError(f"step={request.step} only applies to a run directory, not to the state dict {target}.")
        checkpoint = None
        state_dict = _load_state_dict(target)
        cfg = _state_dict_config(request)
    else:
        if request.config is not None:
            raise EvaluateError(f"config= applies to a state dict only; checkpoint {target} is evaluated with its own "
                                f"config.yaml (change evaluation keys with key=value).")
        checkpoint = resolve_checkpoint(target, request.step)
        _check_overrides(request.overrides, checkpoint)
        cfg = load_saved_config(checkpoint / "config.yaml", request.overrides)
    cli.check_device(cfg.device)
    try:
        ops.set_backend(cfg.kernels)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"kernels={cfg.kernels}: {err}") from None

    world = init_world(cfg.device, cfg.train.collective_timeout_minutes)
    if cfg.train.global_batch_size % world.size:
        raise EvaluateError(f"train.global_batch_size ({cfg.train.global_batch_size}) of {target} is not divisible by "
                            f"the {world.size} processes; evaluate with a number of processes that divides it.")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    scratch = Path(tempfile.mkdtemp(prefix="trm-evaluate-"))  # the trainer's metrics/tensorboard go here, then away
    try:
        cfg = dataclasses.replace(cfg, run_dir=str(scratch))
        dataset = build_dataset(cfg, world)
        torch.manual_seed(cfg.seed)
        model = build_model_for(cfg, dataset.model_dims, world)
        if export_info is not None:
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as err:
                raise EvaluateError(f"Export {target} does not fit the model built from its config and the dataset at "
                                    f"{cfg.data.path} ({str(err).strip().splitlines()[0]}). Evaluate it on the dataset "
                                    f"it was trained on.") from None
        elif state_dict is not None:
            try:
                load_reference_state_dict(model, state_dict)
            except ValueError as err:
                raise EvaluateError(f"{target} does not fit the configured model: {err}") from None
        trainer = build_trainer(cfg, world, model, dataset, checkpoint)
        step = export_info["step"] if export_info is not None else None
        if checkpoint is not None:
            try:
                trainer.load_checkpoint(checkpoint)
            except RuntimeError as err:
                if isinstance(err, ckpt.CheckpointError):
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise EvaluateError(f"Checkpoint {checkpoint} does not fit the model built from its config and the dataset "
                                    f"at {cfg.data.path} ({first}). Evaluate it on the dataset it was trained on.") from None
            step = trainer.step
        out = Path(request.out) if request.out else default_out(target, checkpoint, step, export_info is not None)
        if checkpoint is not None:
            submission = out.parent / f"submission_step_{step}.json"
        else:
            submission = out.parent / f"submission_{out.stem}.json"
        metrics = trainer.evaluate(submission_path=submission)
        trainer.metrics.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "target": str(target), "checkpoint": str(checkpoint) if checkpoint else None,
        "export": str(target) if export_info is not None else None, "step": step,
        "world_size": world.size, "eval_split": cfg.data.eval_split, "overrides": request.overrides,
        "metrics": metrics, "model": to_dict(cfg.model),
    }
    if any(k.startswith("eval/arc/") for k in metrics):
        result["arc_submission"] = str(submission)
    if world.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        result["out"] = str(out)
    return result


def _evaluate_command(argv: list[str]) -> int:
    result = evaluate(parse_args(argv))
    if "out" in result:
        metrics = result["metrics"]
        print("evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        print(f"results written to {result['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: a request error, explained on stderr; 130: interrupted)."""
    return cli.run("trm.evaluate", _evaluate_command, argv,
                   interrupted="nothing was written; run the same command again to evaluate")


if __name__ == "__main__":
    sys.exit(record(main)())
