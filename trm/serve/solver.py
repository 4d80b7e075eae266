"""A served model: an export folder loaded for inference, and the ACT loop that answers a batch.

``ServedModel.solve(tokens, puzzle_ids)`` runs supervision steps on the whole batch; a row stops
at its first step with ``q_halt > 0`` (the model is confident) or at the step budget
(``train.eval_halt_max_steps``, else ``model.halt_max_steps``: the evaluation's early exit),
and its answer is the argmax of that step's logits. Stopped rows leave the batch, so the rest
runs on fewer rows. Per row it reports the steps used, ``sigmoid(q_halt)`` at the stop (the
halting confidence) and whether the model itself chose to halt. With ``trace=True`` it also
keeps every row's predicted tokens and halting confidence after each of its steps (what the
service's page steps through).

Only safetensors / YAML / JSON are read (``trm.export.load_exported_model``), never a pickle.

Test: ``pytest tests/test_serve.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trm import ops
from trm.export import load_exported_model
from trm.model import ACTCarry


@dataclass
class Solution:
    """Answers of one batch, row-aligned with its inputs."""

    tokens: np.ndarray       # [N, seq_len] predicted token ids
    steps: np.ndarray        # [N] supervision steps used
    confidence: np.ndarray   # [N] sigmoid(q_halt) at the stopping step
    halted: np.ndarray       # [N] True when the model chose to stop (q_halt > 0)
    trace_tokens: np.ndarray | None = None
    """With ``trace``: [max_steps, N, seq_len] the prediction after each step (row n: steps[n] of them)."""
    trace_confidence: np.ndarray | None = None
    """With ``trace``: [max_steps, N] sigmoid(q_halt) after each step (row n: steps[n] of them)."""

    def rows(self, lo: int, hi: int) -> "Solution":
        """Rows ``lo:hi`` (the answer of one job of a batch)."""
        traced = self.trace_tokens is not None
        return Solution(self.tokens[lo:hi], self.steps[lo:hi], self.confidence[lo:hi], self.halted[lo:hi],
                        self.trace_tokens[:, lo:hi] if traced else None,
                        self.trace_confidence[:, lo:hi] if traced else None)

    @staticmethod
    def concatenate(parts: list["Solution"]) -> "Solution":
        """One solution of consecutive row chunks (with a trace when the chunks have one)."""
        def cat(name: str, axis: int = 0) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts], axis=axis)

        traced = parts[0].trace_tokens is not None
        return Solution(cat("tokens"), cat("steps"), cat("confidence"), cat("halted"),
                        cat("trace_tokens", 1) if traced else None, cat("trace_confidence", 1) if traced else None)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return torch.device(requested)


def _select_carry(carry: ACTCarry, keep: torch.Tensor) -> ACTCarry:
    inner = type(carry.inner_carry)(carry.inner_carry.z_H[keep], carry.inner_carry.z_L[keep])
    return ACTCarry(inner, carry.steps[keep], carry.halted[keep], {k: v[keep] for k, v in carry.current_data.items()})


class ServedModel:
    """One immutable loaded model; the service swaps whole instances when a newer checkpoint arrives."""

    def __init__(self, export_dir: str | Path, device: torch.device):
        exported = load_exported_model(export_dir, device)
        self.model, self.cfg, self.info, self.path = exported.model, exported.cfg, exported.info, exported.path
        self.device = device
        dims = self.info["model_dims"]
        self.seq_len, self.vocab_size = int(dims["seq_len"]), int(dims["vocab_size"])
        self.num_puzzle_identifiers = int(dims["num_puzzle_identifiers"])
        self.task: str | None = self.info.get("task")
        self.step = int(self.info["step"])
        self.max_steps = self.cfg.train.eval_halt_max_steps or self.cfg.model.halt_max_steps
        self._held_out = None
        self.task_rows = known_task_rows(self.cfg.data.path, self.num_puzzle_identifiers)
        """Task id -> puzzle-embedding row of each original (un-augmented) task the model learned."""

    def held_out_example(self, index: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Example ``index`` of the run's evaluation split (``data.path`` / ``data.eval_split``, read
        relative to the service's working directory): input tokens, label tokens (the dataset's
        ignore id -> 0), its puzzle identifier, and how many examples the split has.
        ``trm.data.format.DatasetError`` when the dataset is not here; IndexError when out of range."""
        from trm.data.format import load_split

        if self._held_out is None:
            self._held_out = load_split(self.cfg.data.path, self.cfg.data.eval_split, check_tokens=False)
        split = self._held_out
        if not 0 <= index < split.num_examples:
            raise IndexError(f"example {index} is out of range: {split.num_examples} held-out examples (0-{split.num_examples - 1})")
        labels = np.array(split.labels[index], dtype=np.int64)
        labels[labels == split.metadata.ignore_label_id] = 0
        puzzle_id = int(split.example_puzzle_identifier(np.array([index]))[0])
        return np.array(split.inputs[index], dtype=np.int64), labels, puzzle_id, split.num_examples

    def describe(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "task": self.task,
            "step": self.step,
            "parameters": int(self.info["parameters"]),
            "puzzle_embedding_rows": int(self.info.get("puzzle_embedding_rows", 0)),
            "ema_weights": bool(self.info.get("ema")),
            "device": str(self.device),
            "max_supervision_steps": self.max_steps,
            "recipe": {
                "task": self.task, "seq_len": self.seq_len, "vocab_size": self.vocab_size,
                "num_puzzle_identifiers": self.num_puzzle_identifiers,
                "model": {k: getattr(m, k) for k in ("name", "hidden_size", "num_heads", "expansion", "H_cycles",
                                                     "L_cycles", "L_layers", "halt_max_steps", "mlp_t",
                                                     "pos_encodings", "puzzle_emb_ndim", "forward_dtype")},
                "run_dir": self.cfg.run_dir,
            },
            "source": self.info.get("source"),
            "export": str(self.path),
        }

    @torch.inference_mode()
    def solve(self, tokens_NS: np.ndarray, puzzle_ids_N: np.ndarray, trace: bool = False) -> Solution:
        n = tokens_NS.shape[0]
        batch = {
            "inputs": torch.as_tensor(tokens_NS, dtype=torch.int32, device=self.device),
            "puzzle_identifiers": torch.as_tensor(puzzle_ids_N, dtype=torch.int32, device=self.device),
        }
        out_tokens = torch.zeros(n, self.seq_len, dtype=torch.int64, device=self.device)
        out_steps = torch.zeros(n, dtype=torch.int64, device=self.device)
        out_conf = torch.zeros(n, dtype=torch.float32, device=self.device)
        out_halted = torch.zeros(n, dtype=torch.bool, device=self.device)
        if trace:
            trace_tokens = torch.zeros(self.max_steps, n, self.seq_len, dtype=torch.int16, device=self.device)
            trace_conf = torch.zeros(self.max_steps, n, dtype=torch.float32, device=self.device)
        rows = torch.arange(n, device=self.device)
        carry = self.model.initial_carry(batch)
        for step in range(1, self.max_steps + 1):
            carry, outputs = self.model(carry, batch)
            carry.halted = torch.zeros_like(carry.halted)  # keep recursing past the model's own limit
            q_halt = outputs["q_halt_logits"].float()
            chose = q_halt > 0
            stop = chose | (step == self.max_steps)
            if trace:
                trace_tokens[step - 1, rows] = outputs["logits"].argmax(-1).to(torch.int16)
                trace_conf[step - 1, rows] = torch.sigmoid(q_halt)
            done = rows[stop]
            out_tokens[done] = outputs["logits"][stop].argmax(-1)
            out_steps[done] = step
            out_conf[done] = torch.sigmoid(q_halt[stop])
            out_halted[done] = chose[stop]
            keep = ~stop
            if not keep.any():
                break
            rows, carry = rows[keep], _select_carry(carry, keep)
            batch = {k: v[keep] for k, v in batch.items()}
        solution = Solution(out_tokens.cpu().numpy(), out_steps.cpu().numpy(), out_conf.cpu().numpy(),
                            out_halted.cpu().numpy())
        if trace:
            solution.trace_tokens, solution.trace_confidence = trace_tokens.cpu().numpy(), trace_conf.cpu().numpy()
        return solution


def known_task_rows(data_path: str, rows: int) -> dict[str, int]:
    """Task id -> row, from the run's ``identifiers.json`` (names of augmented versions, which
    contain ``|||``, are left out); empty when the file is not there."""
    from trm.data.arc import ID_SEPARATOR
    from trm.data.format import DatasetError, load_identifiers

    try:
        names = load_identifiers(data_path)
    except DatasetError:
        return {}
    return {name: i for i, name in enumerate(names[:rows]) if i > 0 and ID_SEPARATOR not in name and not name.startswith("<")}


def set_kernels(name: str) -> str:
    """Use the run's op backend when it can run here, else ``auto`` (which never trades correctness)."""
    try:
        ops.set_backend(name)
        return name
    except (ValueError, RuntimeError) as err:
        print(f"trm.serve: kernels={name} cannot run here ({err}); using kernels=auto", flush=True)
        ops.set_backend("auto")
        return "auto"
