"""Export a checkpoint to a self-contained folder that loads without unpickling anything.

    python -m trm.export runs/tiny --out exports/tiny                # the run's best checkpoint (else its latest)
    python -m trm.export runs/tiny --step latest --out exports/tiny  # or --step N
    python -m trm.export CHECKPOINT_DIR --out exports/tiny    # one checkpoint: runs/tiny/checkpoints/step_N
    python -m trm.export runs/tiny --out exports/tiny --force        # replace an earlier export

writes the folder ``--out``::

    model.safetensors   every tensor of model.state_dict(): the EMA weights when the run kept an
                        EMA (as evaluation uses), the puzzle-embedding table (gathered when it was
                        sharded) and the y0/z0 buffers
    config.yaml         the run's resolved config
    export.json         step, task, model dims (seq_len, vocab_size, num_puzzle_identifiers),
                        parameter count, whether the weights are the EMA's, source checkpoint

``load_exported_model(DIR)`` (used by the service, ``trm.serve``, and usable by evaluators)
reads only safetensors, YAML and JSON. Reading a checkpoint uses ``torch.load(weights_only=True)``
on the trainer's own files; the one exception is a ZeRO-3 checkpoint without an EMA, whose full
weights exist only in DeepSpeed's optimizer shards and are gathered by DeepSpeed's own converter.
The folder is written under a temporary name next to ``--out`` and renamed into place, so a reader
never sees half an export. ``--out`` must be new, an empty folder, or (with ``--force``) a previous
export: a folder holding anything else is refused, so an export never deletes a user's files.

Test: ``pytest tests/test_export_plot.py tests/test_serve.py -k export``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from trm import cli
from trm.config import Config, ConfigError, load_saved_config, to_dict, to_yaml
from trm.train import checkpoint as ckpt

EXPORT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
INFO_FILE = "export.json"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, INFO_FILE)
"""Everything an export folder holds (and all that ``--force`` may replace)."""
PUZZLE_TABLE_KEY = "inner.puzzle_emb.weights"
EMBED_KEY = "inner.embed_tokens.embedding_weight"


class ExportError(ValueError):
    """A checkpoint cannot be exported, or an export folder cannot be loaded; the message says why."""


def is_export_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / INFO_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _model_dims(path: Path, module: dict[str, torch.Tensor], table: torch.Tensor | None) -> dict[str, int]:
    """seq_len from the saved ACT carry (always stored), vocab from the token embedding, puzzle ids
    from the table (1 when the model has no puzzle embedding)."""
    carry = ckpt.load_torch(path / "rank_0.pt")["carry"]
    return {
        "seq_len": int(carry["current_data"]["inputs"].shape[-1]),
        "vocab_size": int(module[EMBED_KEY].shape[0]),
        "num_puzzle_identifiers": int(table.shape[0]) if table is not None else 1,
    }


def _zero3_weights(path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")


def _check_complete(path: Path) -> None:
    if not ckpt.is_complete(path):
        raise ExportError(f"{path} has no {ckpt.COMMIT_MARKER} marker: it is not a complete checkpoint "
                          f"(its save did not finish). Export the run folder instead (python -m trm.export RUN_DIR "
                          f"--out DIR), which takes its best or latest complete checkpoint.")


def checkpoint_weights(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, full model state dict, export info) of a COMPLETE checkpoint folder."""
    from trm.train.trainer import CHECKPOINT_FORMAT

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory; pass a checkpoint folder such as <run_dir>/checkpoints/step_N.")
    _check_complete(path)
    try:
        ckpt.verify_checkpoint(path)
        cfg = load_saved_config(path / CONFIG_FILE)
        state = ckpt.load_torch(path / "trainer_state.pt")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ExportError(f"{path}/trainer_state.pt is not a trainer state of format {CHECKPOINT_FORMAT}.")
        states = path / "deepspeed" / "mp_rank_00_model_states.pt"
        if not states.is_file():  # ZeRO-3 names it per data-parallel rank
            states = path / "deepspeed" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        saved = ckpt.load_torch(states)
        module = {k: v for k, v in saved["module"].items()}
        buffers = set(saved.get("buffer_names", []))
        params = {k: v for k, v in module.items() if k not in buffers}
        if state["ema"] is not None:
            params = {k: v.to(params[k].dtype) if k in params else v for k, v in state["ema"].items()}
        elif any(v.numel() == 0 for v in params.values()):  # ZeRO-3 keeps only placeholders here
            full = _zero3_weights(path)
            params = {k: full[k] for k in params}
        weights = {**params, **{k: module[k] for k in buffers if k in module}}
        table = weights.get(PUZZLE_TABLE_KEY)
        if state["puzzle_table_sharded"] and table is not None:
            shards = [ckpt.load_torch(path / f"rank_{r}.pt")["puzzle_table"] for r in range(state["world_size"])]
            table = torch.empty(shards[0]["num_rows"], shards[0]["shard"].shape[-1], dtype=shards[0]["shard"].dtype)
            for shard in shards:
                table[shard["lo"]:shard["hi"]] = shard["shard"]
            weights[PUZZLE_TABLE_KEY] = table
        dims = _model_dims(path, weights, table)
    except ConfigError as err:
        raise ExportError(f"{path}/{CONFIG_FILE}: {err}") from None
    except ckpt.CheckpointError as err:
        raise ExportError(str(err)) from None
    except KeyError as err:
        raise ExportError(f"Checkpoint {path} lacks {err}; it was not written by this trainer version.") from None
    model = _build(cfg, dims)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"Checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}.")
    from trm.serve.tasks import task_for_dims

    info = {
        "format": EXPORT_FORMAT,
        "step": int(state["step"]),
        "task": task_for_dims(dims["seq_len"], dims["vocab_size"]),
        "model_dims": dims,
        "parameters": sum(p.numel() for p in model.parameters()),
        "puzzle_embedding_rows": dims["num_puzzle_identifiers"] if table is not None else 0,
        "ema": state["ema"] is not None,
        "source": str(path.resolve()),
    }
    return cfg, {k: v.detach().contiguous() for k, v in model.state_dict().items()}, info


def _build(cfg: Config, dims: dict[str, int]) -> torch.nn.Module:
    from trm.model import build_model

    return build_model({**to_dict(cfg.model), **dims, "batch_size": 1})


def _is_our_export(path: Path) -> bool:
    """A folder holding exactly the files an export writes, with a readable export.json of ours."""
    if not is_export_dir(path) or {p.name for p in path.iterdir()} != set(EXPORT_FILES):
        return False
    try:
        return json.loads((path / INFO_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: str | Path, force: bool = False) -> Path:
    """``out`` if an export may be written there: a new path, an empty folder, or (``force``) a
    previous export; an ExportError saying what to do otherwise. Creates the parent folder."""
    out = Path(out)
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; give the folder it points to, or a new path.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder: an export is a folder ({', '.join(EXPORT_FILES)}). "
                          f"Give a folder path that does not exist yet, e.g. exports/{out.stem or 'model'}.")
    if out.is_dir() and any(out.iterdir()):
        if not _is_our_export(out):
            names = sorted(p.name for p in out.iterdir())
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ExportError(f"--out {out} is not empty and is not an export (it holds {shown}); trm.export "
                              f"never writes into a folder with other files{', not even with --force' if force else ''}. "
                              f"Give a new or empty folder, e.g. exports/{out.name}.")
        if not force:
            raise ExportError(f"--out {out} already holds an export; pass --force to replace it, or give another folder.")
    cli.ensure_writable_dir(out.parent, "the folder of --out", f"Give an --out (now {out}) in a folder you may write.",
                           create=False)
    return out


def _replace_dir(fresh: Path, out: Path) -> None:
    """Put the folder ``fresh`` at ``out`` by renames: an existing ``out`` (empty, or an export of
    ours) is moved aside first and deleted only once ``fresh`` is in place."""
    if not out.exists():
        os.replace(fresh, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, aside / out.name)
    try:
        os.replace(fresh, out)
    except OSError:
        os.replace(aside / out.name, out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def export_checkpoint(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the export folder ``out`` (atomically); return it. ``out`` must be new or an empty
    folder; a previous export is replaced only with ``force`` (never a folder with other files)."""
    from safetensors.torch import save_file

    out = check_out(out, force)
    cfg, weights, info = checkpoint_weights(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "step": str(info["step"])})
        (tmp / CONFIG_FILE).write_text(to_yaml(cfg))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for name in EXPORT_FILES:
            os.chmod(tmp / name, 0o644)
        os.chmod(tmp, 0o755)
        check_out(out, force)  # again: the folder may have changed while the weights were read
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def choose_checkpoint(source: str | Path, step: str | None = None) -> tuple[Path, str]:
    """(checkpoint folder, why it was chosen) for ``source``: a checkpoint folder, or a run folder
    whose best checkpoint (``train.best_metric``), else latest, is taken; ``step``: N | best | latest."""
    source = Path(source)
    if not source.exists():
        raise ExportError(f"{source} does not exist; give a run folder (e.g. runs/tiny) or one of its checkpoints "
                          f"(<run_dir>/checkpoints/step_N).")
    if ckpt.STEP_DIR.match(source.name) or (source / "trainer_state.pt").exists():
        if step is not None:
            raise ExportError(f"--step applies to a run folder; {source} is already one checkpoint.")
        _check_complete(source)
        return source, "the checkpoint given"
    found = ckpt.list_checkpoints(source)
    if not found:
        raise ExportError(f"{source} is neither a checkpoint folder nor a run folder with a complete checkpoint "
                          f"(looked for {ckpt.checkpoint_root(source)}/step_N with a {ckpt.COMMIT_MARKER} marker).")
    by_step = dict(found)
    latest_step, latest = found[-1]
    if step == "latest":
        return latest, "the latest checkpoint (--step latest)"
    if step is None or step == "best":
        state = ckpt.load_torch(latest / "trainer_state.pt")
        best = state.get("best_step") if isinstance(state, dict) else None
        if best in by_step:
            metric = OmegaConf.select(OmegaConf.load(latest / CONFIG_FILE), "train.best_metric", default="evaluation")
            return by_step[best], f"the best checkpoint ({metric} = {state.get('best_value')})"
        if step == "best":
            raise ExportError(f"{source} has no best checkpoint on disk (best step: {best}); give --step N or latest.")
        return latest, "the latest checkpoint (the run has no evaluated best one on disk)"
    if not step.isdigit() or int(step) not in by_step:
        raise ExportError(f"--step {step}: {source} has complete checkpoints at steps {sorted(by_step)}; "
                          f"give one of them, best or latest.")
    return by_step[int(step)], f"step {step} (--step)"


@dataclass
class ExportedModel:
    """A model loaded from an export folder, in eval mode on ``device``."""

    model: torch.nn.Module
    cfg: Config
    info: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.info["step"])


def load_exported_model(path: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Build the model of an export folder and load its safetensors weights (strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not is_export_dir(path):
        raise ExportError(f"{path} is not an export folder (needs {WEIGHTS_FILE}, {CONFIG_FILE} and {INFO_FILE}); "
                          f"make one with `python -m trm.export CHECKPOINT --out {path}`.")
    try:
        info = json.loads((path / INFO_FILE).read_text())
        cfg = load_saved_config(path / CONFIG_FILE)
        weights = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (OSError, ValueError, ConfigError, SafetensorError) as err:
        raise ExportError(f"Export folder {path} cannot be read: {err}") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}/{INFO_FILE} is not an export of format {EXPORT_FORMAT}; re-export the checkpoint.")
    model = _build(cfg, info["model_dims"])
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path}/{WEIGHTS_FILE} does not match its config.yaml: {str(err).splitlines()[0]}") from None
    return ExportedModel(model.to(device).eval(), cfg, info, path)


def _export_command(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m trm.export", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run folder (its best checkpoint, else its latest) or a checkpoint "
                                       "folder such as runs/tiny/checkpoints/step_N")
    parser.add_argument("--out", required=True, help="export folder to write: a new path or an empty folder")
    parser.add_argument("--step", default=None, help="with a run folder: N, best (default, else latest) or latest")
    parser.add_argument("--force", action="store_true", help="replace --out when it holds a previous export "
                                                             "(never a folder with other files)")
    args = parser.parse_args(argv)
    checkpoint, why = choose_checkpoint(args.source, args.step)
    check_out(args.out, args.force)
    print(f"exporting {checkpoint}: {why}", flush=True)
    out = export_checkpoint(checkpoint, args.out, force=args.force)
    info = json.loads((out / INFO_FILE).read_text())
    print(f"exported step {info['step']} ({info['parameters']:,} parameters, "
          f"{'EMA' if info['ema'] else 'raw'} weights, task {info['task']}) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: an error explained on stderr)."""
    return cli.run("trm.export", _export_command, argv,
                   interrupted="nothing was changed (an export is renamed into place only once complete)")


if __name__ == "__main__":
    sys.exit(main())
