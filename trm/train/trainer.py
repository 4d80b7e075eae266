"""The training loop: ACT slots, deep supervision, evaluation, checkpoints, exact resume.

Every optimizer step is ONE supervision step over all ``global_batch_size`` slots:

1. slots that halted at the previous step are refilled, in global slot order, with the next
   samples of the data stream (global sample index = one integer of run state);
2. the model runs one supervision step; loss / local_batch goes backward (DeepSpeed averages
   over ranks, so gradients are those of sum / global_batch);
3. the network steps (AdamATan2 / AdamW via DeepSpeed), the puzzle table steps (sign-SGD),
   the EMA follows.

Refill policy (a documented difference from the reference, which discards the unused rows of
a fresh batch): halted slots take CONSECUTIVE stream samples, so no data is skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from trm.config import Config, ConfigError, to_yaml
from trm.data.curriculum import CurriculumSchedule
from trm.data.puzzle_dataset import PuzzleDataset
from trm.eval.metrics import accuracy_intervals, format_accuracy
from trm.model import ACTCarry, act_loss
from trm.train import checkpoint as ckpt
from trm.train.distributed import World, all_gather_cat, all_reduce_sum, barrier
from trm.train.ema import EMA
from trm.train.metrics import MetricsLog, Throughput, grad_norm_before_step, grad_norm_metrics
from trm.train.optim import PuzzleEmbeddingSignSGD
from trm.train.puzzle_table import ShardedPuzzleTable
from trm.train.runtime import describe_run
from trm.train.schedule import lr_at
from trm.train.shared_storage import HOW_TO_FIX, missing_rank_files



def deepspeed_config(cfg: Config, world: World) -> dict[str, Any]:
    """The DeepSpeed config of a run. The model keeps fp32 master weights and casts at use
    (``model.forward_dtype``), so DeepSpeed itself runs in fp32 mode."""
    local_batch = cfg.train.global_batch_size // world.size
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload keeps our client optimizer (AdamATan2) on the CPU
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def epoch_steps(epochs: int, total_groups: int, mean_puzzle_examples: float, global_batch_size: int) -> int:
    """Optimizer steps of ``epochs`` epochs, the reference's formula (``pretrain.py``):
    ``int(epochs * total_groups * mean_puzzle_examples / global_batch_size)``."""
    return int(epochs * total_groups * mean_puzzle_examples / global_batch_size)


def resolve_epoch_schedule(cfg: Config, dataset: Any) -> str | None:
    """Turn ``train.epochs`` (and the ``*_interval_epochs``) into steps with the train split's
    dataset.json, in place, unless ``train.max_steps`` is given; returns the line to print."""
    tc = cfg.train
    if tc.max_steps is not None:
        if tc.epochs:
            return f"trm: train.max_steps={tc.max_steps} is given, so train.epochs={tc.epochs} and the intervals in epochs are not used"
        return None
    meta = getattr(dataset, "base", dataset).train.metadata
    groups, mean, batch = meta.total_groups, meta.mean_puzzle_examples, tc.global_batch_size
    tc.max_steps = epoch_steps(tc.epochs, groups, mean, batch)
    if tc.max_steps < 1:
        raise ConfigError(
            f"train.epochs={tc.epochs} of {cfg.data.path} ({groups} groups x {mean:.4f} examples per puzzle) is less than "
            f"one batch of {batch}: raise train.epochs or give train.max_steps."
        )
    if tc.eval_interval_epochs is not None:
        tc.eval_interval = max(1, epoch_steps(tc.eval_interval_epochs, groups, mean, batch)) if tc.eval_interval_epochs else 0
    if tc.checkpoint_interval_epochs is not None:
        tc.checkpoint_interval = max(1, epoch_steps(tc.checkpoint_interval_epochs, groups, mean, batch)) if tc.checkpoint_interval_epochs else 0
    return (f"trm: {tc.epochs} epochs x {groups} groups x {mean:.4f} mean examples per puzzle / batch {batch} = "
            f"train.max_steps {tc.max_steps}; eval_interval {tc.eval_interval} steps, checkpoint_interval {tc.checkpoint_interval} steps")


UNIVERSAL_TAG = "universal"
CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many steps; the message says what to do."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Signals that make ``fit`` finish its step, save a checkpoint and return (preemption, Ctrl+C)."""
RELAYED_SIGINT_WINDOW_S = 1.0
"""A second SIGINT within this long of the first is the same Ctrl+C relayed by a launcher
(torchrun forwards the terminal's SIGINT to workers that already got it), not a second press."""


class StopRequests:
    """Signal handlers for the duration of a training loop: the first SIGTERM / SIGUSR1 / SIGINT
    records a stop request (the loop saves and returns at the end of the step the ranks agree on);
    a second Ctrl+C raises KeyboardInterrupt at once. Handlers are restored afterwards."""

    def __init__(self):
        self.signum: int | None = None
        self._since = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - self._since > RELAYED_SIGINT_WINDOW_S:
                raise KeyboardInterrupt
            return
        self.signum, self._since = signum, time.monotonic()
        if os.environ.get("RANK", "0") == "0":
            # os.write: a handler may interrupt a print of the loop; this cannot fail re-entrantly
            os.write(2, f"\ntrm: {signal.Signals(signum).name} received: finishing the current step, then saving a "
                        f"checkpoint (a second Ctrl+C aborts without saving).\n".encode())


class Trainer:
    """Owns the engine, optimizers, EMA, ACT carry and data position of one run."""

    def __init__(self, cfg: Config, world: World, model: torch.nn.Module, dataset: PuzzleDataset,
                 resume_from: Path | None = None):
        import deepspeed

        if cfg.train.global_batch_size % world.size:
            raise ValueError(
                f"train.global_batch_size ({cfg.train.global_batch_size}) must be divisible by the "
                f"number of processes ({world.size})."
            )
        self.cfg, self.world, self.dataset = cfg, world, dataset
        schedule_line = resolve_epoch_schedule(cfg, dataset)
        if schedule_line and world.is_main:
            print(schedule_line, flush=True)
        self.run_dir = Path(cfg.run_dir)
        self.local_batch = cfg.train.global_batch_size // world.size
        model = model.to(world.device)
        tc = cfg.train
        self.puzzle_table = None
        if tc.shard_puzzle_table and model.puzzle_emb is not None:
            self.puzzle_table = ShardedPuzzleTable(model.puzzle_emb, world)
        from trm.factories import build_network_optimizer

        optimizer = build_network_optimizer(cfg, model)
        self.resume_from = resume_from
        ds_config = deepspeed_config(cfg, world)
        if resume_from is not None and self._prepare_universal(resume_from):
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine.module
        if tc.compile:
            # In place (nn.Module.compile): parameter names, checkpoints and the EMA are unchanged.
            # Only the recursion is compiled; the ACT bookkeeping around it stays eager.
            self.model.inner.compile()
        puzzle_emb = self.model.puzzle_emb
        self.puzzle_optimizer = None
        if puzzle_emb is not None:
            table = self.puzzle_table
            self.puzzle_optimizer = PuzzleEmbeddingSignSGD(
                puzzle_emb, lr=tc.puzzle_emb_lr, weight_decay=tc.puzzle_emb_weight_decay,
                table=table.shard if table else None, row_offset=table.lo if table else 0,
            )
        self.ema = None
        if tc.ema:
            with self._full_parameters():
                self.ema = EMA(self.model.named_parameters(), decay=tc.ema_rate)
        self.metrics = MetricsLog(self.run_dir, enabled=world.is_main, config=cfg)
        self.throughput = Throughput(self.model, tc.global_batch_size, world.size, world.device, tc.peak_tflops)
        self.step = 0
        self.stream_position = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.stop_requests = StopRequests()
        self.stopped_by: int | None = None
        """The signal that ended ``fit`` early after a checkpoint was saved (None: it ran to the end)."""
        self.last_checkpoint: Path | None = None
        self.curriculum = CurriculumSchedule.from_config(cfg.curriculum)
        if self.curriculum is not None:
            self.curriculum.check_model(self.model.config)
        self.carry = self.model.initial_carry(self._blank_batch(self.local_batch))

    # ------------------------------------------------------------------ data
    def _blank_batch(self, size: int) -> dict[str, torch.Tensor]:
        seq_len = self.dataset.model_dims["seq_len"]
        device = self.world.device
        return {
            "inputs": torch.zeros(size, seq_len, dtype=torch.int32, device=device),
            "labels": torch.zeros(size, seq_len, dtype=torch.int64, device=device),
            "puzzle_identifiers": torch.zeros(size, dtype=torch.int32, device=device),
        }

    def _refill(self) -> dict[str, torch.Tensor]:
        """The batch for this step: the next stream samples in the halted slots (global order)."""
        halted_global = all_gather_cat(self.carry.halted).cpu().numpy()
        positions = self.stream_position + np.cumsum(halted_global) - 1
        lo = self.world.rank * self.local_batch
        mine = halted_global[lo:lo + self.local_batch]
        batch = {k: v.clone() for k, v in self.carry.current_data.items()}
        if mine.any():
            new = self.dataset.train_examples(positions[lo:lo + self.local_batch][mine], step=self.step)
            rows = torch.from_numpy(np.flatnonzero(mine)).to(self.world.device)
            for key, value in new.items():
                batch[key][rows] = value.to(self.world.device, batch[key].dtype)
        self.stream_position += int(halted_global.sum())
        return batch

    def _exploration_draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ACT exploration draws keyed by (seed, step, global slot): the same for a slot whatever
        the number of processes, and reproducible on resume without any RNG state."""
        generator = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + self.step) % 2**63)
        global_batch = self.cfg.train.global_batch_size
        uniform = torch.rand(global_batch, generator=generator)
        halt_max_steps = self.model.config.halt_max_steps  # a curriculum stage may lower it
        min_steps = torch.randint(2, max(halt_max_steps, 2) + 1, (global_batch,), generator=generator, dtype=torch.int32)
        lo = self.world.rank * self.local_batch
        return (uniform[lo:lo + self.local_batch].to(self.world.device),
                min_steps[lo:lo + self.local_batch].to(self.world.device))

    # ----------------------------------------------------------------- steps
    def _set_lr(self) -> float:
        tc = self.cfg.train
        lr = lr_at(self.step, tc.lr, tc.lr_warmup_steps, tc.max_steps, tc.lr_min_ratio)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        if self.puzzle_optimizer is not None:
            self.puzzle_optimizer.lr = lr_at(self.step, tc.puzzle_emb_lr, tc.lr_warmup_steps, tc.max_steps, tc.lr_min_ratio)
        return lr

    def train_step(self) -> dict[str, torch.Tensor]:
        """One supervision step over all slots; returns the step's metric sums (this rank)."""
        self.engine.train()
        batch = self._refill()
        with self._curriculum_depth():
            self.carry, outputs = self.engine(self.carry, batch, exploration=self._exploration_draws())
            self.throughput.count_step()               # FLOPs at this stage's depth (perf/mfu)
        loss, metrics = act_loss(outputs, self.carry.current_data["labels"], self.carry.halted,
                                 self.carry.steps, self.cfg.model.loss_type, self.cfg.train.deep_supervision_decay)
        if not self._finite_everywhere(loss):
            return metrics
        self.engine.backward(loss / self.local_batch)
        grad_norm = grad_norm_before_step(self.engine)  # metrics: only without ZeRO (ZeRO's step computes it)
        if self.puzzle_optimizer is not None:
            self.puzzle_optimizer.step()
            self.puzzle_optimizer.zero_grad()
        self.engine.step()
        metrics.update(grad_norm_metrics(self.engine, grad_norm))
        if self.ema is not None:
            with self._full_parameters():
                self.ema.update(self.model.named_parameters())
        return metrics

    def _curriculum_depth(self):
        """The curriculum stage's recursion depth for this step's training forward (evaluation
        keeps the configured depth)."""
        if self.curriculum is None:
            return contextlib.nullcontext()
        return self.curriculum.applied(self.step, self.model.config)

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """True when every rank's loss is finite. Otherwise the update is skipped and counted
        (``train.skip_nonfinite``), and too many in a row stop the run with NonFiniteLossError."""
        # The same collective carries the stop requests (signals), so every rank learns at the same
        # step that one was signalled, at no extra cost.
        stop = torch.tensor(float(self.stop_requests.signum or 0), dtype=torch.float64, device=loss.device)
        reduced = all_reduce_sum({"bad": (~torch.isfinite(loss.detach())).to(torch.float64), "stop": stop})
        if float(reduced["stop"]) > 0 and self.stopped_by is None:
            self.stopped_by = self.stop_requests.signum or signal.SIGTERM  # another rank's signal
        bad = reduced["bad"]
        if float(bad) == 0:
            self.consecutive_nonfinite = 0
            return True
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        tc = self.cfg.train
        if not tc.skip_nonfinite or self.consecutive_nonfinite > tc.max_consecutive_nonfinite:
            latest = ckpt.find_latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"The loss was NaN/inf at step {self.step} ({self.consecutive_nonfinite} step(s) in a row, "
                f"{self.nonfinite_steps} in this run). Nothing from these steps was applied; the last good "
                f"checkpoint is {latest or 'none'}. Lower train.lr, check the data, or raise "
                f"train.max_consecutive_nonfinite, then resume with mode=resume."
            )
        return False

    def _full_parameters(self, modify: bool = False):
        """Whole parameters on every rank for the duration (ZeRO-3 partitions them; a no-op
        below stage 3). With ``modify``, rank 0's in-place changes are written back."""
        if self.cfg.deepspeed.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0 if modify else None)

    @contextlib.contextmanager
    def _ema_weights(self):
        """Evaluate with the EMA weights; the live weights are restored afterwards."""
        if self.ema is None:
            yield
            return
        params = dict(self.model.named_parameters())
        with self._full_parameters(modify=True):
            live = {name: p.detach().clone() for name, p in params.items()}
            self.ema.copy_to(params.items())
        try:
            yield
        finally:
            with self._full_parameters(modify=True), torch.no_grad():
                for name, p in params.items():
                    p.copy_(live[name])

    @torch.no_grad()
    def evaluate(self, submission_path: str | Path | None = None) -> dict[str, float]:
        """Exact / token accuracy after all halt_max_steps steps (the reference's protocol), and
        with early exit (each sample stops at its first q_halt > 0), with the EMA weights.

        On an ARC dataset the max-steps predictions also vote (``trm.eval.arc_eval``):
        ``eval/arc/pass@k`` metrics, and rank 0 writes the ARC Prize submission to
        ``submission_path`` (default ``<run_dir>/eval/submission_step_<N>.json``)."""
        cfg = self.cfg
        arc = self._arc_evaluation()
        if arc is not None:
            arc.begin()
        n = self.dataset.num_eval_examples
        if cfg.data.eval_max_examples is not None:
            n = min(n, cfg.data.eval_max_examples)
        batch_size = cfg.train.eval_batch_size or self.local_batch
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.world.device) for k in
                ("count", "exact", "token", "q_halt_acc", "early_exact", "early_token", "early_steps")}
        self.engine.eval()
        stride = batch_size * self.world.size
        with self._ema_weights():
            # Every rank runs the same number of equally sized batches (lookups may be collective);
            # rows past the end repeat example 0 and are not counted.
            batches = range(0, n, stride)
            for first in tqdm(batches, desc="evaluate", unit="batch", leave=False, dynamic_ncols=True,
                              disable=not (self.world.is_main and cfg.train.progress_bar) or len(batches) < 2):
                idx = first + self.world.rank * batch_size + torch.arange(batch_size)
                valid = idx < n
                rows = torch.where(valid, idx, 0).numpy()
                batch = {k: v.to(self.world.device) for k, v in self.dataset.eval_examples(rows).items()}
                last = self._evaluate_batch(batch, valid.to(self.world.device), sums)
                if arc is not None:
                    arc.collect(idx, valid, last["logits"], last["q_halt_logits"])
        totals = all_reduce_sum(sums)
        count = max(float(totals["count"]), 1.0)
        metrics = {
            "eval/exact_accuracy": float(totals["exact"]) / count,
            "eval/token_accuracy": float(totals["token"]) / count,
            "eval/q_halt_accuracy": float(totals["q_halt_acc"]) / count,
            "eval/steps": float(self.eval_steps),
            "eval/early_exit/exact_accuracy": float(totals["early_exact"]) / count,
            "eval/early_exit/token_accuracy": float(totals["early_token"]) / count,
            "eval/early_exit/steps": float(totals["early_steps"]) / count,
            "eval/count": float(totals["count"]),
        }
        if arc is not None:
            if submission_path is None:
                submission_path = self.run_dir / "eval" / f"submission_step_{self.step}.json"
            metrics.update(arc.finish(submission_path))
        metrics.update(accuracy_intervals(metrics))  # 95% Wilson intervals (trm.eval.metrics)
        return metrics

    def _arc_evaluation(self):
        """The ARC voter of this run's evaluations (built at the first one), or None when the
        evaluation dataset is not an ARC dataset."""
        if not hasattr(self, "_arc"):
            from trm.eval.arc_eval import ArcEvaluation

            self._arc = ArcEvaluation.from_config(self.cfg, self.dataset, self.world)
        return self._arc

    @property
    def eval_steps(self) -> int:
        return self.cfg.train.eval_halt_max_steps or self.cfg.model.halt_max_steps

    def _evaluate_batch(self, batch: dict[str, torch.Tensor], valid: torch.Tensor, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add one batch's counts to ``sums``; return the model outputs of the last step."""
        labels = batch["labels"]
        mask = labels != -100
        valid = valid & mask.any(-1)  # an example without labels (unknown test output) is not counted, as in the reference
        counts = mask.sum(-1).clamp_min(1)
        carry = self.model.initial_carry(batch)
        stopped = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        max_steps = self.eval_steps
        for step in range(1, max_steps + 1):
            carry, outputs = self.engine(carry, batch)
            carry.halted = torch.zeros_like(carry.halted)  # keep recursing past the model's own limit
            correct = mask & (outputs["logits"].argmax(-1) == labels)
            token_acc = correct.sum(-1) / counts
            exact = correct.sum(-1) == mask.sum(-1)
            stop_now = valid & ~stopped & ((outputs["q_halt_logits"] > 0) | (step == max_steps))
            sums["early_exact"] += (exact & stop_now).sum()
            sums["early_token"] += token_acc[stop_now].sum()
            sums["early_steps"] += stop_now.sum() * step
            stopped |= stop_now
        sums["count"] += valid.sum()
        sums["exact"] += (exact & valid).sum()
        sums["token"] += token_acc[valid].sum()
        sums["q_halt_acc"] += (((outputs["q_halt_logits"] >= 0) == exact) & valid).sum()
        return outputs

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write step_<N>/ on every rank, then the commit marker (rank 0, last)."""
        path = ckpt.step_dir(self.run_dir, self.step)
        try:
            if self.world.is_main:
                if path.exists() and ckpt.is_complete(path):  # a corrupt one resume skipped, or a resume_from= past it
                    corrupt = ckpt.checkpoint_problem(path) is not None
                    aside = ckpt.set_aside(path, ckpt.CORRUPT_SUFFIX if corrupt else ckpt.REPLACED_SUFFIX)
                    print(f"trm: warning: moved the {'corrupt ' if corrupt else ''}checkpoint {path} to {aside} before "
                          f"saving this step again.", file=sys.stderr, flush=True)
                elif path.exists():  # the leftover of a save that did not finish
                    shutil.rmtree(path)
                path.mkdir(parents=True)
            barrier()
            self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False,
                                        client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
            rank_state = {"rng": self._rng_state(), "carry": _to_cpu(self.carry.state_dict()),
                          "puzzle_table": self.puzzle_table.state_dict() if self.puzzle_table else None}
            ckpt.save_torch(rank_state, path / f"rank_{self.world.rank}.pt")
            if self.world.is_main:
                ckpt.save_torch(self._trainer_state(), path / "trainer_state.pt")
                ckpt.atomic_write_text(path / "config.yaml", to_yaml(self.cfg))
            barrier(60 * self.cfg.train.save_timeout_minutes, f"the end of saving {path}")
            if self.world.is_main:
                missing = missing_rank_files(path, self.world.size)
                if missing:  # the other ranks wrote them elsewhere: run_dir is not one directory for all
                    raise ckpt.CheckpointError(f"Checkpoint {path} lacks {', '.join(missing)} after every rank saved; "
                                               f"it is not committed. {HOW_TO_FIX}")
                ckpt.commit(path, self.step)
                ckpt.prune(self.run_dir, self.cfg.train.keep_last, self.best_step, self.step)
            barrier()
            self.last_checkpoint = path
        except TimeoutError as err:
            raise ckpt.CheckpointError(
                f"Saving checkpoint {path} timed out: {err}. It has no {ckpt.COMMIT_MARKER} marker, so resuming "
                f"ignores it; earlier checkpoints are untouched."
            ) from None
        except OSError as err:
            raise ckpt.CheckpointError(
                f"Saving checkpoint {path} failed ({err.strerror or err}); earlier checkpoints are untouched. "
                f"Free disk space or fix permissions of {self.run_dir}, then resume with mode=resume."
            ) from None
        return path

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "stream_position": self.stream_position,
            "world_size": self.world.size,
            "global_batch_size": self.cfg.train.global_batch_size,
            "model_dims": dict(self.dataset.model_dims),
            "puzzle_table_sharded": self.puzzle_table is not None,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "nonfinite_steps": self.nonfinite_steps,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "puzzle_optimizer": self.puzzle_optimizer.state_dict() if self.puzzle_optimizer is not None else None,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
        }

    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if self.world.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.world.device)
        return state

    def _prepare_universal(self, path: Path) -> bool:
        """A ZeRO 1-3 checkpoint written by another number of processes is converted once to
        DeepSpeed's universal format (``<ckpt>/universal``, rank 0) so it loads at this world size.
        Returns whether the engine must load it as universal."""
        state = _load_trainer_state(path)
        if state["world_size"] == self.world.size or self.cfg.deepspeed.zero_stage == 0:
            return False
        if state.get("global_batch_size", self.cfg.train.global_batch_size) != self.cfg.train.global_batch_size:
            raise ckpt.CheckpointError(
                f"Checkpoint {path} was trained with global_batch_size {state['global_batch_size']}; this run asks for "
                f"{self.cfg.train.global_batch_size}. Keep the global batch when changing the number of processes."
            )
        target = path / UNIVERSAL_TAG
        if self.world.is_main and not (target / "zero").is_dir():
            proc = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / "deepspeed"),
                 "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise ckpt.CheckpointError(
                    f"Converting {path} (written by {state['world_size']} processes) to DeepSpeed's universal format "
                    f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
                )
        barrier()
        return True

    def _restore_buffers(self, model_states: Path) -> None:
        """DeepSpeed's universal load restores parameters only; buffers (y0/z0, the replicated
        puzzle table) come from the original model states."""
        saved = ckpt.load_torch(model_states)
        own = dict(self.model.named_buffers())
        with torch.no_grad():
            for name in saved["buffer_names"]:
                if name in own and own[name].numel():
                    own[name].copy_(saved["module"][name])

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything ``save_checkpoint`` wrote; the run continues bit-identically."""
        ckpt.verify_checkpoint(path)
        state = _load_trainer_state(path)
        saved_dims, dims = state.get("model_dims"), dict(self.dataset.model_dims)
        if saved_dims is not None and saved_dims != dims:
            changed = ", ".join(f"{k}: checkpoint {saved_dims.get(k)}, now {dims.get(k)}" for k in sorted(set(saved_dims) | set(dims))
                                if saved_dims.get(k) != dims.get(k))
            raise ckpt.CheckpointError(
                f"Checkpoint {path} was trained on a dataset of another shape than {self.cfg.data.path} ({changed}); "
                f"use the dataset it was trained on (data.path), or start a new run."
            )
        same_world = state["world_size"] == self.world.size
        if state["puzzle_table_sharded"] != (self.puzzle_table is not None):
            raise ckpt.CheckpointError(
                f"Checkpoint {path} was written with train.shard_puzzle_table={state['puzzle_table_sharded']}; "
                f"resume with the same setting."
            )
        tag = "deepspeed" if same_world or self.cfg.deepspeed.zero_stage == 0 else UNIVERSAL_TAG
        loaded, _ = self.engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise ckpt.CheckpointError(f"DeepSpeed found no model states under {path / tag}.")
        if tag == UNIVERSAL_TAG:
            self._restore_buffers(path / "deepspeed" / "mp_rank_00_model_states.pt")
        self.step = state["step"]
        self.stream_position = state["stream_position"]
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.nonfinite_steps = state["nonfinite_steps"]
        saved_curriculum = state.get("curriculum")
        current_curriculum = self.curriculum.state_dict() if self.curriculum is not None else None
        if saved_curriculum != current_curriculum and self.world.is_main:
            print(f"trm: warning: checkpoint {path} was trained with curriculum {saved_curriculum}; continuing with "
                  f"{current_curriculum} from step {state['step']} (the stages follow the step).", file=sys.stderr)
        if self.ema is not None:
            if state["ema"] is None:
                raise ckpt.CheckpointError(f"Checkpoint {path} has no EMA state but train.ema is true.")
            self.ema.load_state_dict(state["ema"])
        if self.puzzle_optimizer is not None and state["puzzle_optimizer"] is not None:
            self.puzzle_optimizer.load_state_dict(state["puzzle_optimizer"])
        if self.puzzle_table is not None:
            ranks = [self.world.rank] if same_world else range(state["world_size"])
            self.puzzle_table.load_shards([ckpt.load_torch(path / f"rank_{r}.pt")["puzzle_table"] for r in ranks])
        if same_world:
            rank_state = ckpt.load_torch(path / f"rank_{self.world.rank}.pt")
            self.carry = ACTCarry.from_state_dict(rank_state["carry"], self.world.device)
            torch.set_rng_state(rank_state["rng"]["torch"])
            if "cuda" in rank_state["rng"]:
                torch.cuda.set_rng_state(rank_state["rng"]["cuda"], self.world.device)
        else:
            # Slots are numbered rank-major, so the global carry is the ranks' carries in order;
            # re-slice it for the new world. (RNG streams are per rank and start afresh.)
            saved = [ckpt.load_torch(path / f"rank_{r}.pt")["carry"] for r in range(state["world_size"])]
            whole = _concat_trees(saved)
            lo = self.world.rank * self.local_batch
            self.carry = ACTCarry.from_state_dict(_slice_tree(whole, lo, lo + self.local_batch), self.world.device)
        self.metrics.truncate_after(self.step)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps`` (or the time limit); return the last evaluation.

        SIGTERM / SIGUSR1 / Ctrl+C end it early: every rank finishes the step they agree on, the
        checkpoint of that step is saved, and it returns with ``stopped_by`` set to the signal."""
        cfg = self.cfg
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        elif self.world.is_main:
            self.metrics.truncate_after(0)
        if self.world.is_main:
            ckpt.atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))
            print(describe_run(self), flush=True)  # once, in our words: what runs (trm.train.runtime)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, dynamic_ncols=True, desc="train",
                   disable=not (self.world.is_main and cfg.train.progress_bar))
        with bar, self.stop_requests:  # the bar ends its line before anything else is printed, an error included
            return self._loop(bar)

    def _loop(self, bar: tqdm) -> dict[str, float]:
        tc = self.cfg.train
        started = time.time()
        window: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.time()
        last_eval: dict[str, float] = {}
        while self.step < tc.max_steps:
            self.step += 1
            lr = self._set_lr()
            step_metrics = self.train_step()
            for k, v in step_metrics.items():
                window[k] = window.get(k, 0) + v.detach().to(torch.float64)
            window_steps += 1
            out_of_time = tc.time_limit_minutes is not None and time.time() - started > 60 * tc.time_limit_minutes
            last = self.step == tc.max_steps or out_of_time
            if self.step % tc.log_interval == 0 or last:
                logged = self._train_summary(window, window_steps, time.time() - window_start, lr)
                self.metrics.log(self.step, logged)
                bar.set_postfix(loss=f"{logged['train/lm_loss']:.3f}", acc=f"{logged['train/exact_accuracy']:.3f}",
                                ex_s=f"{logged['train/examples_per_s']:.0f}")
                window, window_steps, window_start = {}, 0, time.time()
            bar.update(1)
            if self.stopped_by is not None and not last:  # a signal: save this step (no evaluation), return
                self.save_checkpoint()
                if self.world.is_main:
                    bar.write(f"stopped by {signal.Signals(self.stopped_by).name} at step {self.step}; "
                              f"checkpoint {self.last_checkpoint} is complete")
                break
            if (tc.eval_interval and self.step % tc.eval_interval == 0) or last:
                last_eval = self.evaluate()
                self.metrics.log(self.step, last_eval)
                value = last_eval.get(tc.best_metric)
                if value is not None and (self.best_value is None or value > self.best_value):
                    self.best_value, self.best_step = value, self.step
                if self.world.is_main:
                    bar.write(f"step {self.step}: exact {format_accuracy(last_eval, 'eval/exact_accuracy')} "
                              f"token {last_eval['eval/token_accuracy']:.4f} "
                              f"early-exit exact {last_eval['eval/early_exit/exact_accuracy']:.4f} "
                              f"at {last_eval['eval/early_exit/steps']:.2f} steps"
                              + (f" ARC pass@2 {last_eval['eval/arc/pass@2']:.4f}" if "eval/arc/pass@2" in last_eval else ""))
            if (tc.checkpoint_interval and self.step % tc.checkpoint_interval == 0) or last:
                self.save_checkpoint()
            if out_of_time:
                if self.world.is_main:
                    bar.write(f"time limit of {tc.time_limit_minutes} min reached at step {self.step}")
                break
        else:
            self.stopped_by = None  # a signal during the last step: the run finished anyway
        bar.close()
        self.metrics.close()
        return last_eval

    def _train_summary(self, window: dict[str, torch.Tensor], steps: int, seconds: float, lr: float) -> dict[str, float]:
        totals = all_reduce_sum(window)
        slots = float(self.cfg.train.global_batch_size * steps)
        halted = max(float(totals["count"]), 1.0)
        summary = {
            "train/lm_loss": float(totals["lm_loss"]) / slots,
            "train/q_halt_loss": float(totals["q_halt_loss"]) / slots,
            "train/token_accuracy": float(totals["token_accuracy"]) / halted,
            "train/exact_accuracy": float(totals["exact_accuracy"]) / halted,
            "train/q_halt_accuracy": float(totals["q_halt_accuracy"]) / halted,
            "train/steps": float(totals["steps"]) / halted,
            "train/halted": float(totals["count"]),
            "train/lr": lr,
            "train/examples_per_s": slots / max(seconds, 1e-9),
            "train/stream_position": self.stream_position,
            "train/nonfinite_steps": self.nonfinite_steps,
        }
        if "q_continue_loss" in totals:
            summary["train/q_continue_loss"] = float(totals["q_continue_loss"]) / slots
        if "grad_norm" in totals:
            summary["train/grad_norm"] = float(totals["grad_norm"]) / max(float(totals["grad_norm_count"]), 1.0)
        summary.update(self.throughput.summary(steps, seconds))  # perf/*: tokens/s, TFLOP/s, MFU, memory
        return summary


def _load_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.pt of a complete checkpoint in this version's format, or CheckpointError."""
    if not ckpt.is_complete(path):
        raise ckpt.CheckpointError(f"Checkpoint {path} has no {ckpt.COMMIT_MARKER} marker: it is incomplete.")
    state = ckpt.load_torch(path / "trainer_state.pt")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format", "none") if isinstance(state, dict) else type(state).__name__
        raise ckpt.CheckpointError(
            f"Checkpoint {path} has trainer-state format {found}; this version reads format {CHECKPOINT_FORMAT}. "
            f"Resume it with the trm version that wrote it, or start a new run."
        )
    return state


def _concat_trees(trees: list[Any]) -> Any:
    if isinstance(trees[0], torch.Tensor):
        return torch.cat(trees)
    return {k: _concat_trees([t[k] for t in trees]) for k in trees[0]}


def _slice_tree(tree: Any, lo: int, hi: int) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree[lo:hi]
    return {k: _slice_tree(v, lo, hi) for k, v in tree.items()}


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree


