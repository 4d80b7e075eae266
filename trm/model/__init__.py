"""TRM models. ``build_model(cfg)`` looks the family up by ``cfg["name"]`` in ``MODELS``.

    from trm.model import build_model
    model = build_model(dict(name="trm", hidden_size=64, seq_len=81, vocab_size=11,
                             num_puzzle_identifiers=1, batch_size=32, forward_dtype="float32"))
    carry = model.initial_carry(batch)
    carry, outputs = model(carry, batch)
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from trm.model.losses import act_loss
from trm.model.reference import load_reference_state_dict
from trm.model.trm import TRM, ACTCarry, InnerCarry, TRMConfig

MODELS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_model(name: str):
    """Decorator: make a model family buildable by name from YAML (``model.name``)."""
    def add(builder: Callable[[dict[str, Any]], nn.Module]):
        MODELS[name] = builder
        return builder
    return add


@register_model("trm")
def _build_trm(cfg: dict[str, Any]) -> TRM:
    return TRM(TRMConfig.from_dict(cfg))


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """Build the model named ``cfg["name"]`` (default "trm") from architecture + data-shape keys."""
    name = cfg.get("name", "trm")
    if name not in MODELS:
        raise ValueError(f"Unknown model '{name}'; registered models: {sorted(MODELS)}")
    return MODELS[name](dict(cfg))


__all__ = ["MODELS", "register_model", "build_model", "TRM", "TRMConfig", "ACTCarry", "InnerCarry",
           "act_loss", "load_reference_state_dict"]
