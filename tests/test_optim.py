"""Tests for trm.train.optim (AdamATan2, registry, puzzle sign-SGD), trm.train.ema and trm.train.schedule.

Run: ``python -m pytest tests/test_optim.py -q`` (CPU, a few seconds).
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from trm.train import optim
from trm.train.ema import EMA
from trm.train.optim import OPTIMIZERS, AdamATan2, PuzzleEmbeddingSignSGD, build_optimizer, register_optimizer
from trm.train.schedule import lr_at, set_lr

SHAPES = [(7, 5), (13,), (3, 4, 2), ()]


def make_params(seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def make_grads(step: int) -> list[Tensor | None]:
    """Deterministic gradients for ``step``; parameter 1 has no gradient on step 2."""
    generator = torch.Generator().manual_seed(1000 + step)
    grads: list[Tensor | None] = [torch.randn(shape, generator=generator) for shape in SHAPES]
    if step == 2:
        grads[1] = None
    return grads


def apply_grads(params: list[nn.Parameter], grads: list[Tensor | None]) -> None:
    for param, grad in zip(params, grads):
        param.grad = None if grad is None else grad.clone()


class Float64AdamATan2:
    """The spec's formula, written out in float64, one tensor at a time."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float], weight_decay: float):
        self.params = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = [0 for _ in self.params]
        self.lr, (self.beta1, self.beta2), self.weight_decay = lr, betas, weight_decay

    def step(self, grads: list[Tensor | None]) -> None:
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            g = grad.double()
            self.t[i] += 1
            t = self.t[i]
            self.params[i] = self.params[i] * (1 - self.lr * self.weight_decay)
            self.m[i] = self.m[i] + (1 - self.beta1) * (g - self.m[i])
            self.v[i] = self.v[i] + (1 - self.beta2) * (g * g - self.v[i])
            direction = torch.atan2(self.m[i], self.v[i].sqrt() / math.sqrt(1 - self.beta2**t))
            self.params[i] = self.params[i] - self.lr / (1 - self.beta1**t) * direction


# ---------------------------------------------------------------------------- AdamATan2


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_atan2_matches_float64_formula(foreach: bool) -> None:
    lr, betas, weight_decay = 1e-2, (0.9, 0.95), 0.5
    params = make_params()
    reference = Float64AdamATan2(params, lr, betas, weight_decay)
    optimizer = AdamATan2(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach)
    for step in range(6):
        grads = make_grads(step)
        apply_grads(params, grads)
        optimizer.step()
        reference.step(grads)
    for param, expected in zip(params, reference.params):
        torch.testing.assert_close(param.detach().double(), expected, rtol=1e-6, atol=1e-8)
    # Parameter 1 skipped one step: its step count did not advance.
    assert [optimizer.state[p]["step"].item() for p in params] == [6.0, 5.0, 6.0, 6.0]


def test_adam_atan2_foreach_and_loop_are_bit_identical() -> None:
    loop_params, foreach_params = make_params(), make_params()
    loop = AdamATan2(loop_params, lr=3e-3, weight_decay=0.1, foreach=False)
    fused = AdamATan2(foreach_params, lr=3e-3, weight_decay=0.1, foreach=True)
    for step in range(5):
        grads = make_grads(step)
        apply_grads(loop_params, grads)
        apply_grads(foreach_params, grads)
        loop.step()
        fused.step()
    for a, b in zip(loop_params, foreach_params):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loop.state[a][key], fused.state[b][key])


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_atan2_state_dict_round_trip_continues_bit_identically(foreach: bool) -> None:
    params = make_params()
    optimizer = AdamATan2(params, lr=1e-2, weight_decay=0.2, foreach=foreach)
    for step in range(3):
        apply_grads(params, make_grads(step))
        optimizer.step()
    assert optimizer.state[params[0]]["step"].dtype == torch.float32

    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_params = [nn.Parameter(p.clone()) for p in saved["params"]]
    resumed = AdamATan2(resumed_params, lr=123.0, foreach=foreach)  # lr and wd come from the state dict
    resumed.load_state_dict(saved["optimizer"])

    for step in range(3, 6):
        grads = make_grads(step)
        apply_grads(params, grads)
        apply_grads(resumed_params, grads)
        optimizer.step()
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_atan2_zero_gradient_gives_no_nan_and_only_weight_decay(foreach: bool) -> None:
    lr, weight_decay = 1e-2, 0.5
    params = make_params()
    initial = [p.detach().clone() for p in params]
    optimizer = AdamATan2(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
    apply_grads(params, [torch.zeros(shape) for shape in SHAPES])
    optimizer.step()
    for param, before in zip(params, initial):
        assert not param.isnan().any()
        assert torch.equal(param.detach(), before * (1 - lr * weight_decay))
        assert not optimizer.state[param]["exp_avg"].isnan().any()


def test_adam_atan2_reads_lr_from_param_groups_every_step() -> None:
    params = make_params()
    initial = [p.detach().clone() for p in params]
    optimizer = AdamATan2(params, lr=1e-2)
    set_lr(optimizer, 0.0)
    apply_grads(params, make_grads(0))
    optimizer.step()
    assert all(torch.equal(p.detach(), before) for p, before in zip(params, initial))
    set_lr(optimizer, 1e-2)
    optimizer.step()
    assert not any(torch.equal(p.detach(), before) for p, before in zip(params, initial))


def test_adam_atan2_rejects_sparse_gradients() -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = AdamATan2(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()


def test_adam_atan2_validates_hyperparameters() -> None:
    with pytest.raises(ValueError, match="betas"):
        AdamATan2(make_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="learning rate"):
        AdamATan2(make_params(), lr=-1.0)


# ---------------------------------------------------------------------------- registry


def test_build_optimizer_by_name() -> None:
    adam_atan2 = build_optimizer("adam_atan2", make_params(), lr=2e-4, betas=[0.8, 0.9], weight_decay=0.1)
    assert type(adam_atan2) is AdamATan2
    group = adam_atan2.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-4, (0.8, 0.9), 0.1)

    adamw = build_optimizer("adamw", make_params(), lr=2e-4, betas=(0.8, 0.9), weight_decay=0.1)
    assert type(adamw) is torch.optim.AdamW
    assert (adamw.param_groups[0]["eps"], adamw.param_groups[0]["weight_decay"]) == (1e-8, 0.1)
    adamw_eps = build_optimizer("adamw", make_params(), lr=2e-4, betas=(0.8, 0.9), weight_decay=0.1, eps=1e-6)
    assert adamw_eps.param_groups[0]["eps"] == 1e-6


def test_build_optimizer_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lion'") as error:
        build_optimizer("lion", make_params(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    assert "adam_atan2" in str(error.value) and "adamw" in str(error.value)


def test_register_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim, "OPTIMIZERS", dict(OPTIMIZERS))

    @register_optimizer("plain_sgd")
    def build_sgd(params, lr, betas, weight_decay, **kwargs):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    assert type(optim.build_optimizer("plain_sgd", make_params(), 0.1, (0.9, 0.95), 0.0)) is torch.optim.SGD
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("adamw")(build_sgd)


# ---------------------------------------------------------------------------- puzzle sign-SGD


class PuzzleTable(nn.Module):
    """The interface PuzzleEmbeddingSignSGD drives: ``weights``, ``local_ids``, ``local_weights``."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.clone())
        self.local_ids: Tensor | None = None
        self.local_weights: Tensor | None = None

    def forward(self, ids: Tensor) -> Tensor:
        self.local_ids = ids.clone()
        self.local_weights = self.weights[ids].clone().requires_grad_()
        return self.local_weights


def backward_with_row_grads(table: PuzzleTable, ids: Tensor, row_grads: Tensor) -> None:
    """A forward whose backward gives ``local_weights.grad == row_grads``."""
    (table(ids) * row_grads).sum().backward()


def test_sign_sgd_sums_repeated_ids_before_sign_and_touches_only_used_rows() -> None:
    initial = torch.arange(1.0, 13.0).reshape(6, 2)  # row r = [2r + 1, 2r + 2]
    table = PuzzleTable(initial)
    lr, weight_decay = 0.1, 0.5
    optimizer = PuzzleEmbeddingSignSGD(table, lr=lr, weight_decay=weight_decay)
    ids = torch.tensor([4, 1, 4, 3, 3])
    row_grads = torch.tensor(
        [
            [1.0, -0.5],  # id 4
            [2.0, 0.0],  # id 1
            [-3.0, -0.5],  # id 4: sums to [-2, -1], while the signs alone would sum to [0, -2]
            [0.25, 1.0],  # id 3
            [-0.25, 1.0],  # id 3: sums to [0, 2]; sign(0) = 0 -> weight decay only
        ]
    )
    backward_with_row_grads(table, ids, row_grads)
    optimizer.step()

    decay = 1 - lr * weight_decay
    expected = initial.clone()
    expected[1] = torch.tensor([3.0 * decay - lr, 4.0 * decay])
    expected[3] = torch.tensor([7.0 * decay, 8.0 * decay - lr])
    expected[4] = torch.tensor([9.0 * decay + lr, 10.0 * decay + lr])
    torch.testing.assert_close(table.weights, expected, rtol=0, atol=1e-6)
    for untouched in (0, 2, 5):  # no update and no weight decay
        assert torch.equal(table.weights[untouched], initial[untouched])


def test_sign_sgd_without_gradient_is_a_no_op_and_zero_grad_clears() -> None:
    table = PuzzleTable(torch.randn(5, 3))
    initial = table.weights.clone()
    optimizer = PuzzleEmbeddingSignSGD(table, lr=0.1, weight_decay=0.5)
    optimizer.step()  # before any forward
    table(torch.tensor([0, 1]))
    optimizer.step()  # forward but no backward
    assert torch.equal(table.weights, initial)

    backward_with_row_grads(table, torch.tensor([0, 1]), torch.ones(2, 3))
    optimizer.zero_grad()
    assert table.local_weights.grad is None
    optimizer.step()
    assert torch.equal(table.weights, initial)


def test_sign_sgd_lr_follows_schedule_and_state_round_trips() -> None:
    table = PuzzleTable(torch.zeros(3, 2))
    optimizer = PuzzleEmbeddingSignSGD(table, lr=1e-2, weight_decay=0.1)
    set_lr(optimizer, 0.25)
    assert optimizer.lr == 0.25
    backward_with_row_grads(table, torch.tensor([2]), -torch.ones(1, 2))
    optimizer.step()
    assert torch.equal(table.weights[2], torch.tensor([0.25, 0.25]))

    restored = PuzzleEmbeddingSignSGD(table, lr=1.0, weight_decay=0.0)
    restored.load_state_dict(optimizer.state_dict())
    assert (restored.lr, restored.weight_decay) == (0.25, 0.1)


DIST_TABLE = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
DIST_IDS = [torch.tensor([1, 6, 1]), torch.tensor([6, 2, 1])]
DIST_GRADS = [torch.randn(3, 3, generator=torch.Generator().manual_seed(6 + rank)) for rank in range(2)]


def _sign_sgd_rank(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        table = PuzzleTable(DIST_TABLE)
        backward_with_row_grads(table, DIST_IDS[rank], DIST_GRADS[rank])
        PuzzleEmbeddingSignSGD(table, lr=0.1, weight_decay=0.5).step()
        torch.save(table.weights, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sign_sgd_two_ranks_equal_one_rank_over_the_global_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mp.spawn(_sign_sgd_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)

    single = PuzzleTable(DIST_TABLE)
    backward_with_row_grads(single, torch.cat(DIST_IDS), torch.cat(DIST_GRADS))
    PuzzleEmbeddingSignSGD(single, lr=0.1, weight_decay=0.5).step()
    assert not torch.equal(single.weights, DIST_TABLE)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), single.weights)


# ---------------------------------------------------------------------------- EMA


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("running", torch.ones(2))


def test_ema_update_math() -> None:
    net = TinyNet()
    p0 = {name: p.detach().clone() for name, p in net.named_parameters()}
    ema = EMA(net.named_parameters(), decay=0.9)
    assert set(ema.state_dict()) == {"linear.weight", "linear.bias"}  # buffers are not covered

    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net.named_parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-2.0)
    ema.update(net.named_parameters())

    for name, p in net.named_parameters():
        p1 = p0[name] + 1.0
        expected = 0.9 * (0.9 * p0[name] + 0.1 * p1) + 0.1 * p.detach()
        torch.testing.assert_close(ema.shadow[name], expected, rtol=1e-6, atol=1e-6)
        assert ema.shadow[name].dtype == torch.float32


def test_ema_shadow_is_fp32_for_bf16_params() -> None:
    param = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = EMA([("w", param)], decay=0.999)
    with torch.no_grad():
        param.fill_(3.0)
    ema.update([("w", param)])
    assert ema.shadow["w"].dtype == torch.float32
    # 1 + 0.001 * (3 - 1) = 1.002 is not representable in bf16: the shadow kept it.
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.002, 2.001]), rtol=0, atol=1e-6)


def test_ema_swapped_in_restores_live_weights_even_on_error() -> None:
    net = TinyNet()
    ema = EMA(net.named_parameters(), decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(4.0)
    live = {name: p.detach().clone() for name, p in net.named_parameters()}
    ema.update(net.named_parameters())

    with ema.swapped_in(net.named_parameters()):
        for name, p in net.named_parameters():
            assert torch.equal(p.detach(), ema.shadow[name])
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), live[name])

    with pytest.raises(ZeroDivisionError):
        with ema.swapped_in(net.named_parameters()):
            1 / 0
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), live[name])

    ema.copy_to(net.named_parameters())
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), ema.shadow[name])
        assert not torch.equal(p.detach(), live[name])


def test_ema_state_dict_round_trip_and_strict_names() -> None:
    net = TinyNet()
    ema = EMA(net.named_parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net.named_parameters())

    restored = EMA(TinyNet().named_parameters())
    restored.load_state_dict(ema.state_dict())
    for name in ema.shadow:
        assert torch.equal(restored.shadow[name], ema.shadow[name])

    state = ema.state_dict()
    with pytest.raises(KeyError, match=r"missing names \['linear.bias'\]"):
        restored.load_state_dict({"linear.weight": state["linear.weight"]})
    with pytest.raises(KeyError, match=r"unexpected names \['extra'\]"):
        restored.load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict({**state, "linear.bias": torch.zeros(5)})
    with pytest.raises(KeyError, match="missing names"):
        restored.update([("linear.weight", net.linear.weight)])


# ---------------------------------------------------------------------------- schedule


def test_lr_warmup_then_cosine() -> None:
    base, warmup, total, min_ratio = 1e-3, 100, 1100, 0.1
    assert lr_at(0, base, warmup, total, min_ratio) == 0.0
    assert lr_at(50, base, warmup, total, min_ratio) == pytest.approx(base / 2)
    assert lr_at(99, base, warmup, total, min_ratio) == pytest.approx(base * 0.99)
    assert lr_at(100, base, warmup, total, min_ratio) == pytest.approx(base)
    assert lr_at(600, base, warmup, total, min_ratio) == pytest.approx(base * (0.1 + 0.9 * 0.5))
    assert lr_at(1100, base, warmup, total, min_ratio) == pytest.approx(base * min_ratio)
    assert lr_at(5000, base, warmup, total, min_ratio) == pytest.approx(base * min_ratio)
    assert lr_at(0, base, 0, total, min_ratio) == pytest.approx(base)  # no warmup


def test_lr_min_ratio_one_is_constant_after_warmup() -> None:
    base = 1e-4
    assert lr_at(1000, base, 2000, 100_000, 1.0) == pytest.approx(base / 2)
    assert {lr_at(step, base, 2000, 100_000, 1.0) for step in range(2000, 100_001, 997)} == {base}


def test_set_lr_accepts_optimizers_groups_and_lists() -> None:
    network = AdamATan2([{"params": make_params()[:2]}, {"params": make_params()[2:], "lr": 5.0}])
    puzzle = PuzzleEmbeddingSignSGD(PuzzleTable(torch.zeros(2, 2)), lr=1.0, weight_decay=0.0)
    set_lr([network, puzzle], 0.5)
    assert [group["lr"] for group in network.param_groups] == [0.5, 0.5] and puzzle.lr == 0.5
    set_lr(network.param_groups[1], 0.25)
    assert [group["lr"] for group in network.param_groups] == [0.5, 0.25]
