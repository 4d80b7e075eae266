"""Optimisers for TRM: AdamATan2 for the network, sign-SGD for the puzzle table.

The network is trained with AdamATan2 (Adam without epsilon; ``atan2`` bounds
the update), a plain ``torch.optim.Optimizer`` so DeepSpeed accepts it as a
client optimizer. The puzzle-embedding table is not a parameter of the network:
it lives outside the engine and is updated by :class:`PuzzleEmbeddingSignSGD`,
touching only the rows used by this step's global batch.

:class:`MuonAdamATan2` (``train.optimizer: muon``) runs Muon on the recursion's matrices and
AdamATan2 on the rest (:func:`muon_param_groups`).

Optimisers are built by name from the config through :func:`build_optimizer`;
:func:`register_optimizer` adds a name to :data:`OPTIMIZERS`.

Example::

    optimizer = build_optimizer("adam_atan2", model.parameters(), lr=1e-4,
                                betas=(0.9, 0.95), weight_decay=1.0)
    puzzle_optimizer = PuzzleEmbeddingSignSGD(model.puzzle_emb, lr=1e-4, weight_decay=1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

OptimizerFactory = Callable[..., torch.optim.Optimizer]
FactoryT = TypeVar("FactoryT", bound=OptimizerFactory)

OPTIMIZERS: dict[str, OptimizerFactory] = {}
"""Optimiser name (as written in the config) -> factory
``(params, lr, betas, weight_decay, **kwargs) -> torch.optim.Optimizer``."""


def register_optimizer(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator: make ``factory`` buildable as ``build_optimizer(name, ...)``.

    The factory is called as ``factory(params, lr=..., betas=..., weight_decay=..., **kwargs)``.
    Registering a name twice raises ``ValueError``.
    """

    def register(factory: FactoryT) -> FactoryT:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered ({OPTIMIZERS[name]!r})")
        OPTIMIZERS[name] = factory
        return factory

    return register


def build_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the optimiser registered under ``name``; extra ``kwargs`` go to its factory.

    Raises ``ValueError`` naming the known optimisers when ``name`` is not registered.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name](params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kwargs)


@register_optimizer("adamw")
def build_adamw(
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float = 1e-8,
    **kwargs: Any,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the registry's signature (``eps`` defaults to 1e-8)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **kwargs)


@register_optimizer("adam_atan2")
class AdamATan2(torch.optim.Optimizer):
    r"""Adam with ``atan2`` in place of the division by ``sqrt(v) + eps``, decoupled weight decay.

    Per parameter ``p`` with gradient ``g`` at step ``t`` (t = 1, 2, ...)::

        p *= 1 - lr * weight_decay
        m = lerp(m, g, 1 - beta1)            # m + (1 - beta1) * (g - m)
        v = lerp(v, g * g, 1 - beta2)
        p -= (lr / (1 - beta1^t)) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))

    There is no epsilon: ``atan2`` is bounded by pi/2 and ``atan2(0, 0) = 0``, so a
    zero gradient gives a zero update. ``lr`` is read from ``param_groups[i]["lr"]``
    at every step, so external LR schedulers (and DeepSpeed) drive it.

    State per parameter (created at its first gradient): ``step`` (a float32 CPU
    scalar tensor, as in ``torch.optim.Adam``, so ``state_dict`` round-trips),
    ``exp_avg`` (m) and ``exp_avg_sq`` (v). Parameters whose ``grad`` is None are
    skipped and their step count does not advance.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: (beta1, beta2), decay rates of m and v.
        weight_decay: decoupled weight decay coefficient (multiplied by lr).
        foreach: True (or None, the default) runs the fused multi-tensor op
            ``trm.ops.adam_atan2`` over each group's tensors (bucketed by device,
            dtype and step; the backend follows the ``kernels`` config, the
            reference being ``torch._foreach_*``); False runs a per-tensor loop.
            The reference and the loop give bit-identical results on CPU.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas} (each must be in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def _collect_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Parameters of ``group`` that have a gradient, with their grads and state (created lazily)."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(
                    "AdamATan2 does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(sparse=False)) or a sparse optimizer for that parameter"
                )
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """The AdamATan2 update of one parameter group."""
        params, grads, exp_avgs, exp_avg_sqs, steps = self._collect_group(group)
        if params:
            foreach = group["foreach"]
            if foreach is None:
                foreach = True
            update = _adam_atan2_foreach if foreach else _adam_atan2_loop
            beta1, beta2 = group["betas"]
            update(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
            )


MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""(a, b, c) of the quintic Newton-Schulz iteration (Keller Jordan's Muon; ``torch.optim.Muon``'s defaults)."""


def orthogonalize(matrix: Tensor, ns_steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately ``U V^T`` of ``matrix = U S V^T``: ``ns_steps`` quintic Newton-Schulz iterations
    in the matrix's dtype (float32 here; ``torch.optim.Muon`` runs them in bfloat16)."""
    a, b, c = MUON_NS_COEFFICIENTS
    wide = matrix.T if matrix.size(0) > matrix.size(1) else matrix
    x = wide / wide.norm().clamp_min(eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + torch.addmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x.T if matrix.size(0) > matrix.size(1) else x


def muon_param_groups(named_parameters: Iterable[tuple[str, Tensor]]) -> list[dict[str, Any]]:
    """Split a model's parameters for :class:`MuonAdamATan2`: the 2-D weights of the recursion
    (names containing ``L_level.``: the attention / MLP / token-mixing matrices) go to Muon; the
    token and position embeddings, the output heads, norms and biases stay on AdamATan2."""
    matrices, others = [], []
    for name, param in named_parameters:
        (matrices if param.ndim == 2 and "L_level." in name else others).append(param)
    return [{"params": matrices, "muon": True}, {"params": others, "muon": False}]


@register_optimizer("muon")
class MuonAdamATan2(AdamATan2):
    r"""Muon for the parameter groups flagged ``"muon": True``, AdamATan2 for the others.

    Per matrix ``p`` (shape ``A x B``) of a Muon group, with gradient ``g`` and ``lr_muon = lr * lr_ratio``
    (``lr`` is the group's scheduled learning rate, ``lr_ratio = muon_lr / lr`` fixed at construction)::

        m = lerp(m, g, 1 - momentum)                  # momentum buffer
        u = lerp(g, m, momentum)                      # Nesterov
        p *= 1 - lr_muon * weight_decay
        p -= lr_muon * 0.2 * sqrt(max(A, B)) * orthogonalize(u)

    The ``0.2 * sqrt(max(A, B))`` factor gives the update the RMS of an AdamW update (Moonshot's
    scaling, ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``), so ``muon_lr`` is on the same
    scale as ``lr``. Build the groups with :func:`muon_param_groups`.

    Args:
        params: parameter groups, at least one with ``"muon": True``.
        lr, betas, weight_decay, foreach: as :class:`AdamATan2` (``weight_decay`` applies to both).
        muon_lr: peak learning rate of the Muon groups (None: ``lr``).
        momentum: Muon momentum.
        ns_steps: Newton-Schulz iterations per update.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        *,
        muon_lr: float | None = None,
        momentum: float = 0.95,
        ns_steps: int = 5,
        foreach: bool | None = None,
    ) -> None:
        groups = [dict(group) if isinstance(group, dict) else group for group in params]
        if not all(isinstance(group, dict) for group in groups) or not any(group.get("muon") for group in groups):
            raise ValueError("the muon optimizer needs parameter groups with 'muon': True for the matrices; "
                             "build them with trm.train.optim.muon_param_groups(model.named_parameters())")
        if not lr > 0.0:
            raise ValueError(f"invalid learning rate for muon: {lr} (must be > 0: the Muon groups' lr is a multiple of it)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum: {momentum} (must be in [0, 1))")
        muon_lr = lr if muon_lr is None else muon_lr
        for group in groups:
            group.setdefault("muon", False)
            if group["muon"]:
                for param in group["params"]:
                    if param.ndim != 2:
                        raise ValueError(f"Muon updates 2-D matrices only; got a parameter of shape {tuple(param.shape)}")
                group.update(lr_ratio=muon_lr / lr, momentum=momentum, ns_steps=ns_steps)
        super().__init__(groups, lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach)

    def _step_group(self, group: dict[str, Any]) -> None:
        """Muon for a ``"muon"`` group, else AdamATan2."""
        if not group["muon"]:
            super()._step_group(group)
            return
        lr = float(group["lr"]) * group["lr_ratio"]
        momentum = group["momentum"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            buffer.lerp_(param.grad, 1.0 - momentum)
            update = orthogonalize(param.grad.lerp(buffer, momentum), group["ns_steps"])
            if group["weight_decay"] != 0.0:
                param.mul_(1.0 - lr * group["weight_decay"])
            param.add_(update, alpha=-lr * 0.2 * math.sqrt(max(param.shape)))


def _adam_atan2_loop(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """AdamATan2 update, one tensor at a time (the same op sequence as the foreach path)."""
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step += 1
        t = step.item()
        if weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.lerp_(grad * grad, 1.0 - beta2)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2**t))
        direction = torch.atan2(exp_avg, denom, out=denom)
        param.sub_(direction.mul_(lr / (1.0 - beta1**t)))


def _adam_atan2_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """AdamATan2 update through ``trm.ops.adam_atan2``, bucketed by (device, dtype, step).

    The op is fused per backend (``kernels`` config: the CUDA / Triton multi-tensor kernels, or
    the ``torch._foreach_*`` reference, bit-identical to :func:`_adam_atan2_loop` on CPU).
    """
    from trm import ops

    torch._foreach_add_(steps, 1.0)
    buckets: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
    for index, (param, step) in enumerate(zip(params, steps)):
        buckets.setdefault((param.device, param.dtype, int(step.item())), []).append(index)
    for (_, _, t), indices in buckets.items():
        ops.adam_atan2([params[i] for i in indices], [grads[i] for i in indices],
                       [exp_avgs[i] for i in indices], [exp_avg_sqs[i] for i in indices],
                       step=t, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


# torch >= 2.14 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PuzzleEmbeddingSignSGD:
    r"""Sparse sign-SGD with decoupled weight decay for the puzzle-embedding table.

    The table is not a network parameter and lives outside the main optimizer (and
    the DeepSpeed engine). The embedding module it drives exposes:

    - ``module.weights``: float32 ``[num_ids, dim]``, the table;
    - after a training forward + backward, ``module.local_ids`` (int64 ``[B]``, the
      row of each sample; ids may repeat) and ``module.local_weights`` (a leaf
      ``[B, dim]`` whose ``.grad`` holds each sample's row gradient).

    ``step()`` gathers ``(local_ids, local_weights.grad)`` from every rank of
    ``process_group`` (when torch.distributed is initialised with world > 1; all
    ranks must have the same local batch size), sums the gradients of equal ids,
    and updates only those rows::

        g_sum[id] = sum of the gradients of all samples (all ranks) with that id
        p[id] = p[id] * (1 - lr * weight_decay) - lr * sign(g_sum[id])

    Rows not used this step are untouched (no weight decay either). Every rank
    ends with the same table. With a row-sharded table, pass the rank's shard as
    ``table`` and its first row as ``row_offset``: only the rows it owns are updated. ``param_groups = [{"lr", "weight_decay"}]`` lets the
    network's LR schedule drive it; ``lr`` and ``weight_decay`` are views of that group.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        lr: float,
        weight_decay: float,
        process_group: dist.ProcessGroup | None = None,
        table: Tensor | None = None,
        row_offset: int = 0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        self.module = module
        self.process_group = process_group
        self.table = table
        self.row_offset = row_offset
        self.param_groups: list[dict[str, float]] = [{"lr": lr, "weight_decay": weight_decay}]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = value

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["weight_decay"]

    @weight_decay.setter
    def weight_decay(self, value: float) -> None:
        self.param_groups[0]["weight_decay"] = value

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _gather(self, ids: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """All ranks' ``(ids [world*B], grads [world*B, dim])``, rank-major; local ones when alone."""
        world_size = self._world_size()
        if world_size == 1:
            return ids, grads
        all_ids = ids.new_empty((world_size * ids.shape[0],))
        all_grads = grads.new_empty((world_size * grads.shape[0], grads.shape[1]))
        _all_gather_single(all_ids, ids.contiguous(), group=self.process_group)
        _all_gather_single(all_grads, grads.contiguous(), group=self.process_group)
        return all_ids, all_grads

    @torch.no_grad()
    def step(self) -> None:
        """Update the rows used this step (all ranks); a no-op when there is no gradient."""
        local_weights = getattr(self.module, "local_weights", None)
        if local_weights is None or local_weights.grad is None:
            return
        ids, grads = self._gather(self.module.local_ids, local_weights.grad)
        table = self.table if self.table is not None else self.module.weights

        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        grad_sums = grads.new_zeros((unique_ids.shape[0], grads.shape[1]))
        grad_sums.index_add_(0, inverse, grads)

        local_ids = unique_ids.to(device=table.device, dtype=torch.int64) - self.row_offset
        owned = (local_ids >= 0) & (local_ids < table.shape[0])
        local_ids, grad_sums = local_ids[owned], grad_sums[owned.to(grad_sums.device)]
        rows = table.index_select(0, local_ids)
        rows.mul_(1.0 - self.lr * self.weight_decay)
        rows.add_(torch.sign(grad_sums).to(rows), alpha=-self.lr)
        table.index_copy_(0, local_ids, rows)

    def zero_grad(self) -> None:
        """Drop ``local_weights.grad`` (set to None)."""
        local_weights = getattr(self.module, "local_weights", None)
        if local_weights is not None:
            local_weights.grad = None

    def state_dict(self) -> dict[str, float]:
        """``{"lr", "weight_decay"}``: sign-SGD has no moment state (the table is the module's)."""
        return dict(self.param_groups[0])

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.lr = float(state_dict["lr"])
        self.weight_decay = float(state_dict["weight_decay"])
