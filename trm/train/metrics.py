"""Run metrics: ``<run_dir>/metrics.jsonl``, TensorBoard scalars, optional Weights & Biases,
PNG learning curves at the end, and the throughput / MFU / memory / gradient-norm numbers.

Each event is ``{"step": N, "time": unix_seconds, "train/lm_loss": ..., ...}``. On resume the
file is cut back to the resumed step (and TensorBoard is told to purge later events), so it reads
as if the run had never stopped. Keys:

- ``train/*``: loss parts (lm, q_halt, q_continue), token / exact / q_halt accuracy and mean
  supervision steps of the slots that halted, learning rate, gradient norm, examples/s;
- ``eval/*``: evaluation (full steps and early exit);
- ``perf/*``: measurements that depend on the machine and its load (never bit-identical across
  runs): tokens/s, model TFLOP/s, MFU, peak memory.

FLOPs per optimizer step (``training_flops_per_step``), the usual count of 2 FLOPs per
multiply-add, backward = 2 x forward, applied to each call of the shared network::

    F_net  = per sample, one call of the L_layers blocks on L = seq_len + prefix positions:
             sum over blocks of  2 * P_mlp * L                      (channel SwiGLU)
                              +  2 * P_mlp_t * D                    (mlp_t: SwiGLU over positions)
                              or 2 * P_attn * L + 4 * L^2 * D       (attention: projections + QK^T, AV)
    calls  = (H_cycles - 1) * (L_cycles + 1)  without grad (forward only)
           + (L_cycles + 1)                   with grad (x3: forward + backward)
           [+ H_cycles * (L_cycles + 1)       the extra no-grad Q-target pass when no_ACT_continue=false]
    F_step = global_batch * (F_net * calls + 3 * 2 * (P_lm_head * L + P_q_head))   (heads, with grad)

    MFU = F_step * steps / seconds / (peak FLOP/s per device * devices)

The peak comes from ``train.peak_tflops``; by default, dense bf16/fp16 (or TF32 for a float32
forward) figures of known GPUs (``PEAK_TFLOPS``), and on CPU a rough ``threads x 32 FLOP/cycle x
2.5 GHz`` (AVX2: two 8-wide fp32 FMA units); set ``train.peak_tflops`` for a number you trust.
Embedding lookups, norms and the loss are not counted.

Memory: ``perf/max_rss_gib`` (peak resident memory of rank 0's process) and, on a GPU,
``perf/gpu_max_allocated_gib`` (peak allocated by PyTorch since the previous log line).

Test: ``pytest tests/test_export_plot.py`` (reads the event files back with TensorBoard).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    # device-name substring: (bf16/fp16 dense, tf32 dense) TFLOP/s per GPU (SXM parts)
    "H200": (989.0, 494.5),
    "H100": (989.0, 494.5),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5),
}
CPU_FLOPS_PER_THREAD = 32 * 2.5e9


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions parameters; ds_numel is the full size


def _params(module: torch.nn.Module | None) -> int:
    return sum(_numel(p) for p in module.parameters()) if module is not None else 0


def training_flops_per_step(model: torch.nn.Module, global_batch: int) -> float:
    """Estimated FLOPs of one optimizer step of a TRM (formula in the module docstring)."""
    cfg = model.config
    inner = model.inner
    L = cfg.seq_len + cfg.prefix_len
    D = cfg.hidden_size
    f_net = 0.0
    for block in inner.L_level.layers:
        f_net += 2 * _params(block.mlp) * L
        if block.use_mlp_t:
            f_net += 2 * _params(block.mlp_t) * D
        else:
            f_net += 2 * _params(block.self_attn) * L + 4 * L * L * D
    per_cycle = cfg.L_cycles + 1
    calls = (cfg.H_cycles - 1) * per_cycle + 3 * per_cycle
    if not cfg.no_ACT_continue:
        calls += cfg.H_cycles * per_cycle
    heads = _params(inner.lm_head) * L + _params(inner.q_head)  # q_head reads position 0 only
    return float(global_batch) * (f_net * calls + 3 * 2 * heads)


def default_peak_tflops(device: torch.device, forward_dtype: str) -> float | None:
    """Peak dense TFLOP/s of one device (None when unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in PEAK_TFLOPS.items():
            if key in name:
                return tf32 if forward_dtype == "float32" else half
        return None
    if device.type == "cpu":
        return torch.get_num_threads() * CPU_FLOPS_PER_THREAD / 1e12
    return None


class Throughput:
    """Turns (steps, seconds) of a logging window into the ``perf/*`` numbers."""

    def __init__(self, model: torch.nn.Module, global_batch: int, devices: int, device: torch.device,
                 peak_tflops: float | None = None):
        self.model, self.global_batch, self.devices, self.device = model, global_batch, devices, device
        self.peak_tflops = peak_tflops if peak_tflops else default_peak_tflops(device, model.config.forward_dtype)
        self._counted_flops = 0.0                       # of the steps counted since the last summary
        self._flops_at_depth: dict[tuple, float] = {}

    def count_step(self) -> None:
        """Count one optimizer step at the model's recursion depth NOW: the trainer calls it inside
        the curriculum stage's depth, so a shallow early stage is not credited full-depth FLOPs."""
        cfg = self.model.config
        depth = (cfg.H_cycles, cfg.L_cycles, cfg.no_ACT_continue)
        if depth not in self._flops_at_depth:
            self._flops_at_depth[depth] = training_flops_per_step(self.model, self.global_batch)
        self._counted_flops += self._flops_at_depth[depth]

    def summary(self, steps: int, seconds: float) -> dict[str, float]:
        """``perf/*`` of a window of ``steps`` steps: FLOPs of the steps counted by :meth:`count_step`
        (without any, ``steps`` at the configured depth)."""
        seconds = max(seconds, 1e-9)
        flops = self._counted_flops or training_flops_per_step(self.model, self.global_batch) * steps
        self._counted_flops = 0.0
        out = {
            "perf/tokens_per_s": self.global_batch * self.model.config.seq_len * steps / seconds,
            "perf/tflops_per_s": flops / seconds / 1e12,
            "perf/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        }
        if self.peak_tflops:
            out["perf/mfu"] = out["perf/tflops_per_s"] / (self.peak_tflops * self.devices)
        if self.device.type == "cuda":
            out["perf/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return out


def grad_norm_before_step(engine: Any) -> torch.Tensor | None:
    """Without ZeRO: the L2 norm of the network's gradients (already averaged over ranks by
    ``engine.backward``), which DeepSpeed's step would discard. ZeRO optimizers compute it in
    their step (``grad_norm_metrics`` reads it there), so this returns None under ZeRO."""
    if engine.zero_optimization():
        return None
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def grad_norm_metrics(engine: Any, before_step: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``grad_norm`` + ``grad_norm_count`` sums for the metric window (the norm is the same on every
    rank, so the summed norm / summed count is the mean over the window's steps)."""
    norm = before_step if before_step is not None else engine.get_global_grad_norm()
    if norm is None:
        return {}
    norm = torch.as_tensor(norm, dtype=torch.float64).detach().cpu()
    return {"grad_norm": norm, "grad_norm_count": torch.ones((), dtype=torch.float64)}


class MetricsLog:
    """Append-only JSONL + TensorBoard (+ W&B) writer (rank 0 only; other ranks pass enabled=False).

    ``config`` (the run's Config) switches on W&B (``train.wandb``) and the end-of-run plots
    (``train.plots``); without it only JSONL and TensorBoard are written."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, config: Any = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tensorboard = enabled and tensorboard
        self.plots = bool(enabled and config is not None and config.train.plots)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tb = self._tb_writer() if self.tensorboard else None
        self._wandb = self._start_wandb(config) if enabled and config is not None and config.train.wandb else None

    def _tb_writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def _start_wandb(self, config: Any):
        try:
            import wandb
        except ImportError:
            print("trm: train.wandb=true but the wandb package is not installed (pip install wandb); "
                  "logging to metrics.jsonl and TensorBoard only.", file=sys.stderr, flush=True)
            return None
        from trm.config import to_dict

        return wandb.init(project=config.train.wandb_project, name=self.run_dir.name, dir=str(self.run_dir),
                          config=to_dict(config), resume="allow")

    def truncate_after(self, step: int) -> None:
        """Drop events logged after ``step`` (left by a run that stopped before its next checkpoint)."""
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            from trm.train.checkpoint import atomic_write_text

            atomic_write_text(self.path, "".join(line + "\n" for line in kept))  # never half a log
        if self._tb is not None and step > 0:
            self._tb.close()
            self._tb = self._tb_writer(purge_step=step + 1)  # TensorBoard hides the dropped events too

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self.plots and self.path.exists():
            try:
                from trm.plot import plot_run

                plot_run(self.run_dir)
            except Exception as err:  # a plot must never fail a finished run
                print(f"trm: could not write learning curves: {err}", file=sys.stderr, flush=True)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All events of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value
