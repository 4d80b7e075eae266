"""Export a checkpoint to a self-contained folder that loads without unpickling anything.

    python -m trm.export runs/tiny/checkpoints/step_1000 --out exports/tiny

writes into ``--out``::

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
The folder is written under a temporary name and renamed, so a reader never sees half an export.

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

from trm.config import Config, ConfigError, load_saved_config, to_dict, to_yaml
from trm.train import checkpoint as ckpt

EXPORT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
INFO_FILE = "export.json"
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


def checkpoint_weights(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, full model state dict, export info) of a COMPLETE checkpoint folder."""
    from trm.train.trainer import CHECKPOINT_FORMAT

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory; pass a checkpoint folder such as <run_dir>/checkpoints/step_N.")
    if not ckpt.is_complete(path):
        raise ExportError(f"{path} has no {ckpt.COMMIT_MARKER} marker: it is not a complete checkpoint "
                          f"(pick one listed by find_latest_checkpoint, e.g. <run_dir>/checkpoints/step_N).")
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


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the export folder ``out`` (atomically); return it. An existing ``out`` is replaced."""
    from safetensors.torch import save_file

    cfg, weights, info = checkpoint_weights(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "step": str(info["step"])})
        (tmp / CONFIG_FILE).write_text(to_yaml(cfg))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE, INFO_FILE):
            os.chmod(tmp / name, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a complete checkpoint folder, e.g. runs/tiny/checkpoints/step_1000")
    parser.add_argument("--out", required=True, help="export folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except ExportError as err:
        print(f"trm.export: error: {err}", file=sys.stderr)
        return 2
    info = json.loads((out / INFO_FILE).read_text())
    print(f"exported step {info['step']} ({info['parameters']:,} parameters, "
          f"{'EMA' if info['ema'] else 'raw'} weights, task {info['task']}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
