"""Registries and factories: model, optimizer, dataset and trainer are looked up BY NAME.

A new component plugs in from YAML without touching the entry point::

    from trm.factories import register_dataset
    @register_dataset("my_data")
    def build_my_data(cfg, world): ...
    # YAML: data: {name: my_data, path: ...}

Dataset wrappers (``DATASET_WRAPPERS``, e.g. ``rag``: retrieval-augmented examples) wrap the
built dataset when their config section ``data.<name>`` is set.

``build_model`` lives in ``trm.model`` (``MODELS``), ``build_optimizer`` in
``trm.train.optim`` (``OPTIMIZERS``); both are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from trm.config import Config, ConfigError
from trm.data.format import DatasetError, build_hint
from trm.data.puzzle_dataset import PuzzleDataset
from trm.model import MODELS, build_model
from trm.train.distributed import World, barrier
from trm.train.optim import OPTIMIZERS, build_optimizer, muon_param_groups

DATASETS: dict[str, Callable[[Config, World], Any]] = {}
DATASET_WRAPPERS: dict[str, Callable[[Any, Config, World], Any]] = {}
TRAINERS: dict[str, Callable[..., Any]] = {}


def _registrar(table: dict[str, Callable], kind: str):
    def register(name: str):
        def add(builder: Callable) -> Callable:
            if name in table:
                raise ValueError(f"{kind} '{name}' is already registered")
            table[name] = builder
            return builder
        return add
    return register


register_dataset = _registrar(DATASETS, "dataset")
register_dataset_wrapper = _registrar(DATASET_WRAPPERS, "dataset wrapper")
register_trainer = _registrar(TRAINERS, "trainer")


def _lookup(table: dict[str, Callable], kind: str, name: str, key: str) -> Callable:
    if name not in table:
        raise ConfigError(f"Unknown {kind} '{name}' (config key '{key}'); registered: {', '.join(sorted(table))}.")
    return table[name]


BUILD_RECORD = "trm_build.json"
"""Written next to the splits of a dataset built from ``data.build``: the build section it came from."""


def build_dataset_dir(cfg: Config, world: World) -> None:
    """Build ``data.path`` from ``data.build`` when it does not exist yet (rank 0; others wait).

    The build section is recorded in ``<data.path>/trm_build.json``; an existing directory whose
    record differs from the config's ``data.build`` is a ConfigError (training on data the config
    does not describe would be silent and wrong); a key the record lacks (added to the schema
    later) counts as its default. Directories without a record (built by the CLI, or by hand) are
    used as they are."""
    import json

    from trm.config import to_dict

    path = Path(cfg.data.path)
    if cfg.data.build is None:
        return
    wanted = to_dict(cfg.data.build)
    if (path / "train" / "dataset.json").exists():
        record = path / BUILD_RECORD
        if record.exists():
            try:
                built = json.loads(record.read_text())
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{record} is unreadable ({exc}); delete {path} to rebuild it.") from exc
            # A key missing from the record came into the schema after that build: the build ran as
            # its default does, so only a non-default value in the config is a difference.
            defaults = to_dict(type(cfg.data.build)())
            diff = {k: (built.get(k, defaults.get(k)), v) for k, v in wanted.items()
                    if built.get(k, defaults.get(k)) != v}
            if diff:
                said = ", ".join(f"{k}: built {a!r}, config {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ConfigError(
                    f"data.path {path} was built from a different data.build section ({said}). "
                    f"Delete {path} to rebuild it from the config, or set data.path to a new directory.")
        return
    if world.is_main:
        b = cfg.data.build
        print(f"trm: building {b.kind} dataset at {path}", flush=True)
        if b.kind == "sudoku":
            from trm.data.sudoku import build_sudoku

            build_sudoku(path, train_puzzles=b.train_puzzles, test_puzzles=b.test_puzzles, aug=b.aug, seed=b.seed,
                         min_blanks=b.min_blanks, max_blanks=b.max_blanks,
                         test_min_blanks=b.test_min_blanks, test_max_blanks=b.test_max_blanks)
        elif b.kind == "maze":
            from trm.data.maze import build_maze

            build_maze(path, train_mazes=b.train_puzzles, test_mazes=b.test_puzzles, seed=b.seed,
                       min_path_length=b.min_path_length, max_path_length=b.max_path_length,
                       aug=b.aug > 0, loops=b.loops)
        else:
            from trm.data.arc import build_arc

            build_arc(path, b.kind, aug=b.aug, seed=b.seed, source=b.source, max_tasks=b.max_tasks)
        (path / BUILD_RECORD).write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n")
    barrier()


@register_dataset("directory")
def _directory_dataset(cfg: Config, world: World) -> PuzzleDataset:
    build_dataset_dir(cfg, world)
    if not Path(cfg.data.path).exists():
        raise DatasetError(f"Dataset directory {cfg.data.path} does not exist; {build_hint(cfg.data.path)}, "
                           f"or add a data.build section to the config.")
    from trm.data.curriculum import CurriculumSchedule

    return PuzzleDataset(cfg.data.path, seed=cfg.seed, augment=cfg.data.augment, eval_split=cfg.data.eval_split,
                         curriculum=CurriculumSchedule.from_config(cfg.curriculum), sample_unit=cfg.data.sample_unit)


@register_dataset_wrapper("rag")
def _retrieval_dataset(dataset: PuzzleDataset, cfg: Config, world: World):
    from trm.data.rag import build_retrieval_dataset

    return build_retrieval_dataset(dataset, cfg, world.is_main, barrier)


def build_dataset(cfg: Config, world: World):
    """The configured dataset, wrapped by every wrapper whose ``data.<name>`` section is set."""
    dataset = _lookup(DATASETS, "dataset", cfg.data.name, "data.name")(cfg, world)
    for name, wrap in DATASET_WRAPPERS.items():
        if getattr(cfg.data, name, None) is not None:
            dataset = wrap(dataset, cfg, world)
    return dataset


@register_trainer("trm")
def _trm_trainer(cfg: Config, world: World, model, dataset, resume_from=None):
    from trm.train.trainer import Trainer

    return Trainer(cfg, world, model, dataset, resume_from)


def build_trainer(cfg: Config, world: World, model, dataset, resume_from=None):
    """The configured trainer; ``resume_from`` is the checkpoint it will continue from (or None)."""
    return _lookup(TRAINERS, "trainer", cfg.trainer, "trainer")(cfg, world, model, dataset, resume_from)


def build_network_optimizer(cfg: Config, model):
    """The network optimizer of ``train.optimizer`` over ``model``'s parameters; ``muon`` gets
    its parameter groups (``muon_param_groups``) and ``train.muon_lr`` / ``train.muon_momentum``."""
    tc = cfg.train
    common = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    if tc.optimizer == "muon":
        return build_optimizer("muon", muon_param_groups(model.named_parameters()), **common,
                               muon_lr=tc.muon_lr, momentum=tc.muon_momentum)
    return build_optimizer(tc.optimizer, model.parameters(), **common)


def build_model_for(cfg: Config, model_dims: dict[str, int], world: World):
    """The configured model for a dataset's shape (``model.name`` looked up in MODELS)."""
    _lookup(MODELS, "model", cfg.model.name, "model.name")
    from trm.config import to_dict

    return build_model({**to_dict(cfg.model), **model_dims, "batch_size": cfg.train.global_batch_size // world.size})


__all__ = ["DATASETS", "DATASET_WRAPPERS", "TRAINERS", "MODELS", "OPTIMIZERS", "register_dataset",
           "register_dataset_wrapper", "register_trainer", "build_dataset", "build_trainer", "build_model", "build_model_for", "build_optimizer",
           "build_network_optimizer"]
