"""The Tiny Recursive Model: recursion over (y, z) with one shared network, and ACT halting.

One call of :class:`TRM` is ONE supervision step over a batch of persistent slots::

    carry = model.initial_carry(batch)      # every slot "halted": the next call loads batch
    carry, outputs = model(carry, batch)    # halted slots take their row of batch, fresh y0/z0
    # outputs: logits [B, seq_len, V], q_halt_logits [B], q_continue_logits [B]

Inside (paper names: x input, y answer state z_H, z latent z_L, T = H_cycles, n = L_cycles)::

    for _ in range(T - 1):                           # no grad
        for _ in range(n): z = net(z, y + x)
        y = net(y, z)
    for _ in range(n): z = net(z, y + x)             # with grad: n + 1 calls of net
    y = net(y, z)

Shape legend: B batch, L positions incl. the puzzle prefix P, S seq_len, D hidden, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from trm.config import ModelConfig
from trm.model.layers import (
    Block,
    CastedEmbedding,
    CastedLinear,
    ReasoningModule,
    RotaryEmbedding,
    SparsePuzzleEmbedding,
    trunc_normal_,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(kw_only=True)
class TRMConfig(ModelConfig):
    """Architecture keys (``trm.config.ModelConfig``: reference names and defaults) plus the
    data shape the model is built for."""

    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int
    batch_size: int

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "TRMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"Unknown TRM architecture keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @property
    def prefix_len(self) -> int:
        """Positions taken by the puzzle embedding (0 when it is disabled)."""
        if self.puzzle_emb_ndim == 0:
            return 0
        return self.puzzle_emb_len or -(-self.puzzle_emb_ndim // self.hidden_size)


@dataclass
class InnerCarry:
    """The recursion state carried between supervision steps (detached)."""

    z_H: torch.Tensor
    z_L: torch.Tensor


@dataclass
class ACTCarry:
    """Per-slot state: recursion state, steps taken, halted flag and the slot's current sample."""

    inner_carry: InnerCarry
    steps: torch.Tensor
    halted: torch.Tensor
    current_data: dict[str, torch.Tensor]

    def state_dict(self) -> dict[str, Any]:
        return {
            "z_H": self.inner_carry.z_H, "z_L": self.inner_carry.z_L, "steps": self.steps,
            "halted": self.halted, "current_data": dict(self.current_data),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str) -> "ACTCarry":
        return cls(
            InnerCarry(state["z_H"].to(device), state["z_L"].to(device)),
            state["steps"].to(device), state["halted"].to(device),
            {k: v.to(device) for k, v in state["current_data"].items()},
        )


class TRMInner(nn.Module):
    """Embeddings, the shared network, and the heads; one supervision step of recursion."""

    def __init__(self, config: TRMConfig):
        super().__init__()
        self.config = config
        self.forward_dtype = DTYPES[config.forward_dtype]
        D = config.hidden_size
        self.prefix_len = config.prefix_len
        total_len = config.seq_len + self.prefix_len
        self.embed_scale = math.sqrt(D)

        self.embed_tokens = CastedEmbedding(config.vocab_size, D, init_std=1.0 / self.embed_scale, cast_to=self.forward_dtype)
        self.lm_head = CastedLinear(D, config.vocab_size, bias=False)
        self.q_head = CastedLinear(D, 2, bias=True)
        if config.puzzle_emb_ndim > 0:
            self.puzzle_emb = SparsePuzzleEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim, self.forward_dtype)
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(D // config.num_heads, total_len, config.rope_theta)
        elif config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(total_len, D, init_std=1.0 / self.embed_scale, cast_to=self.forward_dtype)
        self.L_level = ReasoningModule([
            Block(D, config.num_heads, config.expansion, total_len, config.mlp_t, config.rms_norm_eps)
            for _ in range(config.L_layers)
        ])
        self.register_buffer("H_init", trunc_normal_(torch.empty(D), std=1.0).to(self.forward_dtype))
        self.register_buffer("L_init", trunc_normal_(torch.empty(D), std=1.0).to(self.forward_dtype))
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)

    def input_embeddings(self, inputs_BS: torch.Tensor, puzzle_ids_B: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]: puzzle prefix + token embeddings (+ learned positions), times sqrt(D)."""
        x = self.embed_tokens(inputs_BS.to(torch.int32))
        if self.prefix_len:
            rows_BE = self.puzzle_emb(puzzle_ids_B)
            pad = self.prefix_len * self.config.hidden_size - rows_BE.shape[-1]
            if pad > 0:
                rows_BE = torch.nn.functional.pad(rows_BE, (0, pad))
            x = torch.cat((rows_BE.view(-1, self.prefix_len, self.config.hidden_size), x), dim=-2)
        if self.config.pos_encodings == "learned":
            x = 0.707106781 * (x + self.embed_pos.embedding_weight.to(self.forward_dtype))
        return self.embed_scale * x

    def empty_carry(self, batch_size: int, device: torch.device) -> InnerCarry:
        shape = (batch_size, self.config.seq_len + self.prefix_len, self.config.hidden_size)
        return InnerCarry(
            torch.zeros(shape, dtype=self.forward_dtype, device=device),
            torch.zeros(shape, dtype=self.forward_dtype, device=device),
        )

    def reset_carry(self, reset_B: torch.Tensor, carry: InnerCarry) -> InnerCarry:
        """Slots flagged in ``reset_B`` restart from (y0, z0)."""
        mask = reset_B.view(-1, 1, 1)
        return InnerCarry(torch.where(mask, self.H_init, carry.z_H), torch.where(mask, self.L_init, carry.z_L))

    def forward(self, carry: InnerCarry, batch: dict[str, torch.Tensor]):
        cos_sin = self.rotary_emb() if hasattr(self, "rotary_emb") else None
        x = self.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
        y, z = carry.z_H, carry.z_L
        net = self.L_level
        with torch.no_grad():
            for _ in range(self.config.H_cycles - 1):
                for _ in range(self.config.L_cycles):
                    z = net(z, y + x, cos_sin)
                y = net(y, z, cos_sin)
        for _ in range(self.config.L_cycles):
            z = net(z, y + x, cos_sin)
        y = net(y, z, cos_sin)
        logits_BSV = self.lm_head(y)[:, self.prefix_len:]
        q_B2 = self.q_head(y[:, 0]).to(torch.float32)
        return InnerCarry(y.detach(), z.detach()), logits_BSV, (q_B2[..., 0], q_B2[..., 1])


class TRM(nn.Module):
    """TRM with Adaptive Computational Time over persistent slots (the reference's ACT wrapper)."""

    def __init__(self, config: TRMConfig):
        super().__init__()
        self.config = config
        self.inner = TRMInner(config)

    @property
    def puzzle_emb(self) -> SparsePuzzleEmbedding | None:
        return getattr(self.inner, "puzzle_emb", None)

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> ACTCarry:
        """All slots halted, so the first call loads every row of ``batch``."""
        B = batch["inputs"].shape[0]
        device = batch["inputs"].device
        return ACTCarry(
            self.inner.empty_carry(B, device),
            torch.zeros(B, dtype=torch.int32, device=device),
            torch.ones(B, dtype=torch.bool, device=device),
            {k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: ACTCarry, batch: dict[str, torch.Tensor],
                exploration: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One supervision step. ``exploration`` = (uniform [B] in [0, 1), min_steps [B] in
        [2, halt_max_steps]) lets the caller supply the exploration draws (e.g. keyed by global
        slot so a run does not depend on its world size); by default they are drawn here."""
        cfg = self.config
        inner_carry = self.inner.reset_carry(carry.halted, carry.inner_carry)
        steps = torch.where(carry.halted, 0, carry.steps)
        data = {
            k: torch.where(carry.halted.view((-1,) + (1,) * (v.ndim - 1)), batch[k], v)
            for k, v in carry.current_data.items()
        }
        inner_carry, logits, (q_halt, q_continue) = self.inner(inner_carry, data)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}

        with torch.no_grad():
            steps = steps + 1
            is_last_step = steps >= cfg.halt_max_steps
            halted = is_last_step
            if self.training and cfg.halt_max_steps > 1:
                halted = halted | ((q_halt > 0) if cfg.no_ACT_continue else (q_halt > q_continue))
                if exploration is None:
                    exploration = (torch.rand_like(q_halt), torch.randint_like(steps, low=2, high=cfg.halt_max_steps + 1))
                uniform, drawn_min_steps = exploration
                min_steps = (uniform < cfg.halt_exploration_prob) * drawn_min_steps
                halted = halted & (steps >= min_steps)
                if not cfg.no_ACT_continue:
                    # Q-learning target for q_continue: the next step's best value (bootstrapped).
                    _, _, (next_halt, next_continue) = self.inner(inner_carry, data)
                    outputs["target_q_continue"] = torch.sigmoid(
                        torch.where(is_last_step, next_halt, torch.maximum(next_halt, next_continue))
                    )
        return ACTCarry(inner_carry, steps, halted, data), outputs
