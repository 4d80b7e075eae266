"""Exponential moving average (EMA) of the network's weights.

The reference evaluates and checkpoints the EMA weights (rate 0.999). The EMA
covers the floating-point parameters the caller passes (the puzzle table, a
buffer trained by sign-SGD, is not among them), never buffers.

Example::

    ema = EMA(model.named_parameters(), decay=0.999)
    ...  # after every optimizer step:
    ema.update(model.named_parameters())
    with ema.swapped_in(model.named_parameters()):
        evaluate(model)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

NamedTensors = Iterable[tuple[str, Tensor]]


def _floating(named_params: NamedTensors) -> dict[str, Tensor]:
    """The floating-point entries of ``named_params``, by name."""
    return {name: param for name, param in named_params if param.is_floating_point()}


class EMA:
    r"""fp32 shadow copies of parameters, updated as ``shadow = lerp(shadow, p, 1 - decay)``.

    That is ``shadow += (1 - decay) * (p - shadow)``, computed in float32 with
    foreach ops whatever the parameters' dtype. The shadow starts as a copy of
    the parameters and lives on each parameter's device.

    Every method taking ``named_params`` (e.g. ``model.named_parameters()``) uses
    only its floating-point entries, and those must carry exactly the names the
    EMA was built with; a mismatch raises ``KeyError`` naming the missing and
    unexpected names.
    """

    def __init__(self, named_params: NamedTensors, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"invalid EMA decay {decay}: must be in [0, 1]")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            name: param.detach().to(dtype=torch.float32, copy=True) for name, param in _floating(named_params).items()
        }

    def _check_names(self, names: Iterable[str], what: str) -> None:
        names = set(names)
        missing = sorted(self.shadow.keys() - names)
        unexpected = sorted(names - self.shadow.keys())
        if missing or unexpected:
            raise KeyError(f"EMA {what}: missing names {missing}, unexpected names {unexpected}")

    def _matched(self, named_params: NamedTensors, what: str) -> tuple[list[Tensor], list[Tensor]]:
        """(shadows, params) in the same order, after checking that the names match exactly."""
        params = _floating(named_params)
        self._check_names(params, what)
        names = list(self.shadow)
        return [self.shadow[name] for name in names], [params[name].detach() for name in names]

    @torch.no_grad()
    def update(self, named_params: NamedTensors) -> None:
        """``shadow = lerp(shadow, p, 1 - decay)`` for every covered parameter (fp32)."""
        shadows, params = self._matched(named_params, "update")
        if shadows:
            torch._foreach_lerp_(shadows, [param.float() for param in params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, named_params: NamedTensors) -> None:
        """Overwrite the live parameters with the shadow (cast to their dtype)."""
        shadows, params = self._matched(named_params, "copy_to")
        if shadows:
            torch._foreach_copy_(params, shadows)

    @contextmanager
    def swapped_in(self, named_params: NamedTensors) -> Iterator[None]:
        """Inside the block the live parameters hold the shadow; on exit (even by an
        exception) they get back their exact previous values."""
        shadows, params = self._matched(named_params, "swapped_in")
        with torch.no_grad():
            saved = [param.clone() for param in params]
            if shadows:
                torch._foreach_copy_(params, shadows)
        try:
            yield
        finally:
            with torch.no_grad():
                if saved:
                    torch._foreach_copy_(params, saved)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow, keyed by parameter name (the tensors themselves, not copies)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy a saved shadow in (strict: names and shapes must match exactly)."""
        self._check_names(state_dict, "load_state_dict")
        for name, shadow in self.shadow.items():
            saved = state_dict[name]
            if saved.shape != shadow.shape:
                raise ValueError(f"EMA load_state_dict: {name!r} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(shadow.shape)}")
            shadow.copy_(saved)
