"""Model fidelity of ``trm.model`` against /work/shared/TRM_SPEC.md (CPU, fp32, small shapes).

Run: ``python -m pytest tests/test_model.py -q`` (a few seconds on 2 CPU cores).

The reference computations below are written from the spec, independently of ``trm.model``
and ``trm.ops``: stablemax in float64 with analytic gradients, one supervision step built
from raw weight tensors read from the model's state dict (reference key names).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trm import ops
from trm.model import act_loss, build_model, load_reference_state_dict
from trm.model.layers import trunc_normal_

TINY = dict(
    name="trm", hidden_size=32, num_heads=4, expansion=2.0, H_cycles=2, L_cycles=2, L_layers=2,
    halt_max_steps=4, halt_exploration_prob=0.0, pos_encodings="rope", mlp_t=False,
    puzzle_emb_len=2, puzzle_emb_ndim=32, forward_dtype="float32", rms_norm_eps=1e-5,
    rope_theta=10000.0, no_ACT_continue=True, seq_len=9, vocab_size=7, num_puzzle_identifiers=5,
    batch_size=3,
)


def make_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model({**TINY, **overrides})


def make_batch(cfg: dict, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, cfg["vocab_size"], (batch_size, cfg["seq_len"]), generator=g, dtype=torch.int32)
    labels = torch.randint(0, cfg["vocab_size"], (batch_size, cfg["seq_len"]), generator=g, dtype=torch.int32)
    ids = torch.randint(0, cfg["num_puzzle_identifiers"], (batch_size,), generator=g, dtype=torch.int32)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


def randomise_zero_inits(model, seed: int = 123) -> None:
    """Give the zero-initialised puzzle table and q head random values so they are observable."""
    g = torch.Generator().manual_seed(seed)
    inner = model.inner
    with torch.no_grad():
        if hasattr(inner, "puzzle_emb"):
            scale = 1 / math.sqrt(model.config.hidden_size)       # the token embedding's scale
            inner.puzzle_emb.weights.copy_(torch.randn(inner.puzzle_emb.weights.shape, generator=g) * scale)
        inner.q_head.weight.copy_(torch.randn(inner.q_head.weight.shape, generator=g) / math.sqrt(inner.q_head.weight.shape[1]))
        inner.q_head.bias.copy_(torch.randn(2, generator=g))


# ---------------------------------------------------------------------------------------------
# 1. Stablemax / softmax cross-entropy
# ---------------------------------------------------------------------------------------------

def stablemax_ce_reference(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100):
    """float64 value and analytic gradient of -log(s(v_y) / sum_j s(v_j)), per token."""
    v = logits.astype(np.float64)
    neg = v < 0
    s = np.empty_like(v)
    ds = np.empty_like(v)
    s[~neg] = v[~neg] + 1.0
    ds[~neg] = 1.0
    s[neg] = 1.0 / (1.0 - v[neg])
    ds[neg] = 1.0 / (1.0 - v[neg]) ** 2
    total = s.sum(-1, keepdims=True)
    valid = labels != ignore_index
    safe = np.where(valid, labels, 0)
    s_y = np.take_along_axis(s, safe[..., None], -1)[..., 0]
    loss = np.where(valid, -np.log(s_y / total[..., 0]), 0.0)
    grad = ds / total
    onehot = np.zeros_like(v)
    np.put_along_axis(onehot, safe[..., None], 1.0, -1)
    grad = grad - onehot * (ds / s)
    grad = np.where(valid[..., None], grad, 0.0)
    return loss, grad


def awkward_logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=g, dtype=torch.float64) * 3
    logits[0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    logits[0, 1] = torch.tensor([1.0, 1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    logits[0, 2] = torch.tensor([-1e30, 1.0, 0.0, -1e4, -3.0], dtype=torch.float64)
    logits[0, 3] = torch.tensor([-1e30, -1e30, -1e30, -1e30, -1e30], dtype=torch.float64)
    logits[0, 4] = torch.tensor([1.0, -1e6, 1.0, 0.0, 1.0], dtype=torch.float64)
    labels = torch.randint(0, 5, (4, 6), generator=g)
    labels[0, 2] = 0          # label on a -1e30 logit: large but finite loss
    labels[0, 3] = 2
    labels[0, 4] = 1
    labels[1, :] = -100       # a fully ignored row
    labels[2, 3] = -100
    return logits, labels


def test_stablemax_ce_matches_float64_formula_values_and_grads():
    logits, labels = awkward_logits()
    leaf = logits.clone().requires_grad_(True)
    loss = ops.stablemax_cross_entropy(leaf, labels, ignore_index=-100)
    assert loss.dtype == torch.float64 and loss.shape == labels.shape
    loss.sum().backward()
    ref_loss, ref_grad = stablemax_ce_reference(logits.numpy(), labels.numpy())
    assert torch.isfinite(loss).all() and torch.isfinite(leaf.grad).all()
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(leaf.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-14)
    # the label on a -1e30 logit costs log(total / 1e-30): ~69 + log(total), finite
    assert 60 < loss[0, 2].item() < 80
    # ignored tokens: zero loss and zero gradient on every logit of the token
    assert (loss[1] == 0).all() and (leaf.grad[1] == 0).all()
    assert loss[2, 3] == 0 and (leaf.grad[2, 3] == 0).all()


def test_stablemax_ce_fp32_logits_with_zeros_and_ones_have_finite_grads():
    logits, labels = awkward_logits()
    leaf = logits.to(torch.float32).clone().requires_grad_(True)
    loss = ops.stablemax_cross_entropy(leaf, labels)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(leaf.grad).all(), "0 * inf from an unselected stablemax branch leaked into the gradient"
    _, ref_grad = stablemax_ce_reference(leaf.detach().numpy(), labels.numpy())
    np.testing.assert_allclose(leaf.grad.numpy(), ref_grad, rtol=1e-5, atol=1e-7)


def test_log_stablemax_is_not_shift_invariant_and_matches_formula():
    x = torch.tensor([[0.0, 1.0, -1.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 2.0, 0.5, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(ops.log_stablemax(x), torch.log(s / s.sum()), rtol=0, atol=1e-14)
    assert not torch.allclose(ops.log_stablemax(x), ops.log_stablemax(x - 3.0))


def test_stablemax_ce_matches_float64_autograd_of_naive_formula_on_safe_inputs():
    """Cross-check the analytic gradient too: autograd of the plain formula on inputs away from 1."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.rand(3, 4, 6, generator=g, dtype=torch.float64) * 8 - 4)
    labels = torch.randint(0, 6, (3, 4), generator=g)
    a = logits.clone().requires_grad_(True)
    s = torch.where(a < 0, 1 / (1 - a), a + 1)            # safe: no logit equals 1 here
    ref = -torch.log(s.gather(-1, labels[..., None])[..., 0] / s.sum(-1))
    ref.sum().backward()
    b = logits.clone().requires_grad_(True)
    loss = ops.stablemax_cross_entropy(b, labels)
    loss.sum().backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)


def test_softmax_ce_matches_torch_and_ignores_pad():
    logits, labels = awkward_logits()
    logits = logits.clamp(-50, 50).to(torch.float32)
    leaf = logits.clone().requires_grad_(True)
    loss = ops.softmax_cross_entropy(leaf, labels, ignore_index=-100)
    loss.sum().backward()
    ref_leaf = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_leaf.reshape(-1, 5), labels.reshape(-1), ignore_index=-100, reduction="none").view(labels.shape)
    ref.sum().backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)
    assert (loss[1] == 0).all() and (leaf.grad[1] == 0).all()


@pytest.mark.parametrize("loss_type", ["stablemax_cross_entropy", "softmax_cross_entropy"])
def test_act_loss_formula(loss_type):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 4, generator=g).requires_grad_(True)
    labels = torch.randint(0, 4, (3, 5), generator=g)
    labels[0, 1] = -100
    labels[2] = logits.detach().argmax(-1)[2]        # sequence 2 entirely correct
    labels[2, 0] = -100
    q_halt = torch.tensor([0.3, -0.2, 1.5])
    outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": torch.zeros(3)}
    halted = torch.tensor([True, False, True])
    steps = torch.tensor([2, 1, 4], dtype=torch.int32)
    total, metrics = act_loss(outputs, labels, halted, steps, loss_type)

    valid = labels != -100
    if loss_type == "stablemax_cross_entropy":
        tok, _ = stablemax_ce_reference(logits.detach().numpy(), labels.numpy())
        tok = torch.from_numpy(tok)
    else:
        tok = torch.where(valid, -F.log_softmax(logits.detach().double(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0], 0.0)
    lm = (tok.sum(-1) / valid.sum(-1)).sum()
    correct = ((logits.detach().argmax(-1) == labels) | ~valid).all(-1)
    assert correct[2]
    bce = F.binary_cross_entropy_with_logits(q_halt.double(), correct.double(), reduction="sum")
    torch.testing.assert_close(total.double(), lm + 0.5 * bce, rtol=1e-5, atol=1e-5)
    total.backward()
    assert torch.isfinite(logits.grad).all()
    assert metrics["count"].item() == 2                                # halted slots only
    assert metrics["steps"].item() == 6
    assert metrics["exact_accuracy"].item() == int(correct[0]) + int(correct[2])


# ---------------------------------------------------------------------------------------------
# 2. One supervision step, re-implemented from the spec with raw weights
# ---------------------------------------------------------------------------------------------

def ref_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))     # fp32 (or fp64 in the fp64 reference)
    return (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ref_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    inter = w_gate_up.shape[0] // 2
    gate = x @ w_gate_up[:inter].T
    up = x @ w_gate_up[inter:].T
    return (gate * torch.sigmoid(gate) * up) @ w_down.T


def ref_rope_tables(positions: int, head_dim: int, theta: float):
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    freq = theta ** (-2.0 * i / head_dim)
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * freq[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def ref_attention(h, w_qkv, w_o, heads, cos, sin):
    B, L, D = h.shape
    K = D // heads
    qkv = h @ w_qkv.T
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, L, heads, K) for i in range(3))

    def rotate(t):
        first, second = t[..., :K // 2], t[..., K // 2:]
        rotated = torch.cat([-second, first], dim=-1)
        return t * cos[None, :, None, :] + rotated * sin[None, :, None, :]

    if cos is not None:
        q, k = rotate(q), rotate(k)
    scores = torch.einsum("blhk,bmhk->bhlm", q, k) / math.sqrt(K)
    out = torch.einsum("bhlm,bmhk->blhk", scores.softmax(-1), v)
    return out.reshape(B, L, D) @ w_o.T


def ref_net(h, inj, sd, cfg, cos, sin):
    h = h + inj
    eps = cfg["rms_norm_eps"]
    for n in range(cfg["L_layers"]):
        p = f"inner.L_level.layers.{n}."
        if cfg["mlp_t"]:
            ht = h.transpose(1, 2)
            ht = ref_rms(ht + ref_swiglu(ht, sd[p + "mlp_t.gate_up_proj.weight"], sd[p + "mlp_t.down_proj.weight"]), eps)
            h = ht.transpose(1, 2)
        else:
            attn = ref_attention(h, sd[p + "self_attn.qkv_proj.weight"], sd[p + "self_attn.o_proj.weight"],
                                 cfg["num_heads"], cos, sin)
            h = ref_rms(h + attn, eps)
        h = ref_rms(h + ref_swiglu(h, sd[p + "mlp.gate_up_proj.weight"], sd[p + "mlp.down_proj.weight"]), eps)
    return h


def ref_input_embeddings(batch, sd, cfg):
    D, P = cfg["hidden_size"], cfg["puzzle_emb_len"]
    tokens = sd["inner.embed_tokens.embedding_weight"][batch["inputs"].long()]
    rows = sd["inner.puzzle_emb.weights"][batch["puzzle_identifiers"].long()]
    prefix = torch.zeros(rows.shape[0], P * D)
    prefix[:, :rows.shape[1]] = rows
    x = torch.cat([prefix.view(-1, P, D), tokens], dim=1)
    if cfg["pos_encodings"] == "learned":
        x = 0.707106781 * (x + sd["inner.embed_pos.embedding_weight"])
    return x * math.sqrt(D)


def ref_supervision_step(y, z, batch, sd, cfg):
    L_total = cfg["seq_len"] + cfg["puzzle_emb_len"]
    cos = sin = None
    if cfg["pos_encodings"] == "rope":
        cos, sin = (t.to(y.dtype) for t in ref_rope_tables(L_total, cfg["hidden_size"] // cfg["num_heads"], cfg["rope_theta"]))
    x = ref_input_embeddings(batch, sd, cfg)
    for _ in range(cfg["H_cycles"]):
        for _ in range(cfg["L_cycles"]):
            z = ref_net(z, y + x, sd, cfg, cos, sin)
        y = ref_net(y, z, sd, cfg, cos, sin)
    logits = (y @ sd["inner.lm_head.weight"].T)[:, cfg["puzzle_emb_len"]:]
    q = y[:, 0] @ sd["inner.q_head.weight"].T + sd["inner.q_head.bias"]
    return y, z, logits, q[:, 0], q[:, 1]


def expected_keys(cfg) -> set[str]:
    keys = {"inner.embed_tokens.embedding_weight", "inner.lm_head.weight", "inner.q_head.weight",
            "inner.q_head.bias", "inner.H_init", "inner.L_init", "inner.puzzle_emb.weights"}
    if cfg["pos_encodings"] == "learned":
        keys.add("inner.embed_pos.embedding_weight")
    for n in range(cfg["L_layers"]):
        mix = ("mlp_t.gate_up_proj", "mlp_t.down_proj") if cfg["mlp_t"] else ("self_attn.qkv_proj", "self_attn.o_proj")
        for name in mix + ("mlp.gate_up_proj", "mlp.down_proj"):
            keys.add(f"inner.L_level.layers.{n}.{name}.weight")
    return keys


VARIANTS = {
    "attention_rope": dict(pos_encodings="rope", mlp_t=False),
    "mlp_t_no_pos": dict(pos_encodings="none", mlp_t=True, puzzle_emb_ndim=40, H_cycles=2, L_cycles=1),
    "attention_learned": dict(pos_encodings="learned", mlp_t=False, H_cycles=1, L_cycles=3),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_supervision_step_matches_spec_reimplementation(variant, training):
    cfg = {**TINY, **VARIANTS[variant], "halt_max_steps": 8}
    model = make_model(seed=1, **VARIANTS[variant], halt_max_steps=8)
    randomise_zero_inits(model)
    model.train(training)
    sd = model.state_dict()
    assert set(sd) == expected_keys(cfg)
    D = cfg["hidden_size"]
    P = cfg["puzzle_emb_len"]
    L_total = cfg["seq_len"] + P
    assert sd["inner.L_level.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 256, D)
    if cfg["mlp_t"]:
        assert sd["inner.L_level.layers.0.mlp_t.gate_up_proj.weight"].shape == (2 * 256, L_total)
        assert sd["inner.L_level.layers.0.mlp_t.down_proj.weight"].shape == (L_total, 256)
    else:
        assert sd["inner.L_level.layers.0.self_attn.qkv_proj.weight"].shape == (3 * D, D)

    # The reference runs in float64 on the model's fp32 weights, so the comparison measures the
    # model's own fp32 error. Each step starts from the model's carried (y, z), step 0 from (y0, z0).
    sd64 = {k: v.double() for k, v in sd.items()}
    batch = make_batch(cfg, batch_size=3, seed=5)
    carry = model.initial_carry(batch)
    y = sd64["inner.H_init"].expand(3, L_total, D)
    z = sd64["inner.L_init"].expand(3, L_total, D)
    for step in range(2):
        if step > 0:   # in training a slot whose q_halt > 0 halted: it restarts from (y0, z0)
            reset = carry.halted.view(-1, 1, 1)
            y = torch.where(reset, sd64["inner.H_init"], carry.inner_carry.z_H.double())
            z = torch.where(reset, sd64["inner.L_init"], carry.inner_carry.z_L.double())
        carry, out = model(carry, batch)
        with torch.no_grad():
            y, z, logits, q_halt, q_continue = (t.float() for t in ref_supervision_step(y, z, batch, sd64, cfg))
        assert out["logits"].shape == (3, cfg["seq_len"], cfg["vocab_size"])
        torch.testing.assert_close(out["logits"], logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["q_halt_logits"], q_halt, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["q_continue_logits"], q_continue, rtol=0, atol=1e-5)
        torch.testing.assert_close(carry.inner_carry.z_H, y, rtol=0, atol=1e-5)
        torch.testing.assert_close(carry.inner_carry.z_L, z, rtol=0, atol=1e-5)
        if training:
            assert torch.equal(carry.halted, out["q_halt_logits"] > 0)
        else:
            assert carry.steps.tolist() == [step + 1] * 3 and not carry.halted.any()


def test_puzzle_row_fills_only_first_prefix_position():
    model = make_model(seed=2).eval()
    randomise_zero_inits(model)
    batch = make_batch(TINY, seed=1)
    x = model.inner.input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    D = TINY["hidden_size"]
    rows = model.inner.puzzle_emb.weights[batch["puzzle_identifiers"].long()]
    torch.testing.assert_close(x[:, 0], rows * math.sqrt(D))
    assert (x[:, 1:TINY["puzzle_emb_len"]] == 0).all()
    tokens = model.inner.embed_tokens.embedding_weight[batch["inputs"].long()]
    torch.testing.assert_close(x[:, TINY["puzzle_emb_len"]:], tokens * math.sqrt(D))


# ---------------------------------------------------------------------------------------------
# 3. ACT semantics
# ---------------------------------------------------------------------------------------------

def set_q_bias(model, halt: float, cont: float) -> None:
    with torch.no_grad():
        model.inner.q_head.weight.zero_()
        model.inner.q_head.bias.copy_(torch.tensor([halt, cont]))


def test_initial_carry_halts_every_slot_and_first_call_loads_the_batch():
    model = make_model().eval()
    batch = make_batch(TINY, seed=4)
    carry = model.initial_carry(batch)
    assert carry.halted.dtype == torch.bool and carry.halted.all()
    assert (carry.steps == 0).all()
    seen = {}
    original = model.inner.forward

    def spy(inner_carry, data):
        seen["carry"], seen["data"] = inner_carry, data
        return original(inner_carry, data)

    model.inner.forward = spy
    carry, _ = model(carry, batch)
    for k in batch:
        assert torch.equal(seen["data"][k], batch[k]) and torch.equal(carry.current_data[k], batch[k])
    assert torch.equal(seen["carry"].z_H, model.inner.H_init.expand_as(seen["carry"].z_H))
    assert torch.equal(seen["carry"].z_L, model.inner.L_init.expand_as(seen["carry"].z_L))
    assert (carry.steps == 1).all()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_slot_halts_exactly_at_halt_max_steps(training):
    model = make_model(halt_max_steps=3).train(training)     # q_halt = -5 at init: never halts early
    batch = make_batch(TINY, seed=4)
    carry = model.initial_carry(batch)
    history = []
    for _ in range(3):
        carry, out = model(carry, batch)
        assert (out["q_halt_logits"] < 0).all()
        history.append((carry.steps.tolist(), carry.halted.tolist()))
    assert history == [([1] * 3, [False] * 3), ([2] * 3, [False] * 3), ([3] * 3, [True] * 3)]
    carry, _ = model(carry, batch)                            # halted slots restart their count
    assert carry.steps.tolist() == [1] * 3 and not carry.halted.any()


def test_positive_q_halt_halts_in_training_but_never_early_in_eval():
    model = make_model(halt_max_steps=5)
    set_q_bias(model, halt=5.0, cont=-5.0)
    batch = make_batch(TINY, seed=4)
    model.train()
    carry, out = model(model.initial_carry(batch), batch)
    assert (out["q_halt_logits"] > 0).all()
    assert carry.halted.all() and (carry.steps == 1).all()

    model.eval()
    carry = model.initial_carry(batch)
    for step in range(1, 6):
        carry, out = model(carry, batch)
        assert (out["q_halt_logits"] > 0).all()
        assert carry.halted.all() == (step == 5) and not (carry.halted.any() and step < 5)


def test_exploration_delays_halting_to_at_least_two_steps():
    torch.manual_seed(0)
    B, max_steps = 48, 5
    model = make_model(halt_max_steps=max_steps, halt_exploration_prob=1.0).train()
    set_q_bias(model, halt=5.0, cont=-5.0)                    # would halt after 1 step without exploration
    batch = make_batch(TINY, batch_size=B, seed=4)
    carry = model.initial_carry(batch)
    first_halt = torch.zeros(B, dtype=torch.int64)
    with torch.no_grad():
        for _ in range(max_steps):
            carry, _ = model(carry, batch)
            newly = carry.halted & (first_halt == 0)
            first_halt[newly] = carry.steps[newly].long()
    assert (first_halt >= 2).all() and (first_halt <= max_steps).all()
    assert (first_halt == 2).any() and len(set(first_halt.tolist())) > 1

    model_no_explore = make_model(halt_max_steps=max_steps, halt_exploration_prob=0.0).train()
    set_q_bias(model_no_explore, halt=5.0, cont=-5.0)
    carry, _ = model_no_explore(model_no_explore.initial_carry(batch), batch)
    assert carry.halted.all()


def test_halted_slots_load_new_rows_and_reset_while_others_continue():
    model = make_model(halt_max_steps=8).eval()
    randomise_zero_inits(model)
    set_q_bias(model, halt=-5.0, cont=-5.0)
    old, new = make_batch(TINY, batch_size=4, seed=1), make_batch(TINY, batch_size=4, seed=2)
    carry, _ = model(model.initial_carry(old), old)
    previous = carry.inner_carry
    carry.halted = torch.tensor([True, False, True, False])
    seen = {}
    original = model.inner.forward

    def spy(inner_carry, data):
        seen["carry"], seen["data"] = inner_carry, data
        return original(inner_carry, data)

    model.inner.forward = spy
    carry2, out = model(carry, new)
    fresh, keep = [0, 2], [1, 3]
    for k in old:
        assert torch.equal(carry2.current_data[k][fresh], new[k][fresh])
        assert torch.equal(carry2.current_data[k][keep], old[k][keep])
    assert torch.equal(seen["carry"].z_H[fresh], model.inner.H_init.expand(2, *previous.z_H.shape[1:]))
    assert torch.equal(seen["carry"].z_L[fresh], model.inner.L_init.expand(2, *previous.z_L.shape[1:]))
    assert torch.equal(seen["carry"].z_H[keep], previous.z_H[keep])
    assert torch.equal(seen["carry"].z_L[keep], previous.z_L[keep])
    assert carry2.steps.tolist() == [1, 2, 1, 2]

    model.inner.forward = original                              # slot 0 == a fresh start on its new row
    _, fresh_out = model(model.initial_carry(new), new)
    torch.testing.assert_close(out["logits"][fresh], fresh_out["logits"][fresh], rtol=0, atol=1e-6)


def test_act_continue_path_gives_targets_loss_and_gradients():
    model = make_model(halt_max_steps=2, no_ACT_continue=False).train()
    set_q_bias(model, halt=1.0, cont=2.0)                      # q_halt > 0 but < q_continue: continue
    batch = make_batch(TINY, seed=4)
    carry, out = model(model.initial_carry(batch), batch)
    assert not carry.halted.any()
    target = out["target_q_continue"]
    assert target.shape == (3,) and not target.requires_grad
    torch.testing.assert_close(target, torch.full((3,), torch.sigmoid(torch.tensor(2.0)).item()))
    total, metrics = act_loss(out, carry.current_data["labels"].long(), carry.halted, carry.steps)
    expected = F.binary_cross_entropy_with_logits(torch.full((3,), 2.0), target, reduction="sum")
    torch.testing.assert_close(metrics["q_continue_loss"], expected)
    assert out["q_continue_logits"].requires_grad
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    model.zero_grad()
    carry, out = model(carry, batch)                           # last step: target = sigmoid(q_halt)
    assert carry.halted.all()
    torch.testing.assert_close(out["target_q_continue"], torch.full((3,), torch.sigmoid(torch.tensor(1.0)).item()))

    set_q_bias(model, halt=2.0, cont=1.0)                      # q_halt > q_continue: halt
    carry, _ = model(model.initial_carry(batch), batch)
    assert carry.halted.all()
    model.eval()
    _, out = model(model.initial_carry(batch), batch)
    assert "target_q_continue" not in out


# ---------------------------------------------------------------------------------------------
# 4. Gradient only through the last cycle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H_cycles,L_cycles", [(3, 2), (2, 3), (1, 1)])
def test_only_last_cycle_carries_gradient(H_cycles, L_cycles):
    model = make_model(H_cycles=H_cycles, L_cycles=L_cycles).train()
    net = model.inner.L_level
    original = net.forward
    calls: list[bool] = []

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    net.forward = counting
    batch = make_batch(TINY, seed=4)
    carry, out = model(model.initial_carry(batch), batch)
    assert len(calls) == H_cycles * (L_cycles + 1)
    assert sum(calls) == L_cycles + 1
    assert calls[-(L_cycles + 1):] == [True] * (L_cycles + 1)        # the grad calls are the last ones
    for state in (carry.inner_carry.z_H, carry.inner_carry.z_L):
        assert not state.requires_grad and state.grad_fn is None
    assert out["logits"].requires_grad
    out["logits"].sum().backward()
    assert model.inner.L_level.layers[0].mlp.down_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# 5. Initialisation statistics
# ---------------------------------------------------------------------------------------------

def truncated_std_factor(bound: float = 2.0) -> float:
    """std of a standard normal truncated to [-bound, bound], by numerical integration."""
    u = np.linspace(-bound, bound, 200001)
    pdf = np.exp(-0.5 * u * u)
    return math.sqrt(np.trapezoid(u * u * pdf, u) / np.trapezoid(pdf, u))


def assert_trunc_normal(t: torch.Tensor, std: float, what: str) -> None:
    bound_rtol = 1e-3 if t.dtype in (torch.float32, torch.float64) else 2.0 ** -7   # bf16 rounding
    t = t.detach().double().flatten()
    n = t.numel()
    tol = 4.0 / math.sqrt(2 * n) + 0.005
    assert abs(t.std().item() / std - 1) < tol, f"{what}: std {t.std().item():.5f} vs {std:.5f}"
    assert abs(t.mean().item()) < 5 * std / math.sqrt(n), f"{what}: mean {t.mean().item()}"
    bound = 2 * std / truncated_std_factor()
    assert t.abs().max().item() <= bound * (1 + bound_rtol), f"{what}: beyond the corrected 2-sigma bound"


def test_trunc_normal_has_requested_std_and_corrected_bound():
    torch.manual_seed(0)
    std = 0.37
    t = trunc_normal_(torch.empty(400_000), std=std)
    assert_trunc_normal(t, std, "trunc_normal_")
    corrected = std / truncated_std_factor()
    assert abs(corrected / std - 1.1369) < 1e-3
    assert t.abs().max().item() > 0.99 * 2 * corrected          # reaches the corrected bound,
    assert (t.abs() > 2 * std).float().mean().item() > 0.02     # which is wider than 2 * std
    assert (trunc_normal_(torch.ones(10), std=0.0) == 0).all()


def test_model_init_statistics():
    torch.manual_seed(0)
    D = 256
    model = build_model({**TINY, "hidden_size": D, "num_heads": 4, "expansion": 4.0, "vocab_size": 200,
                         "pos_encodings": "learned", "seq_len": 60, "puzzle_emb_len": 4, "puzzle_emb_ndim": D})
    inner = model.inner
    linears = {name: m for name, m in model.named_modules() if hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.nn.Parameter)
               and m.weight.ndim == 2 and not name.endswith(("embed_tokens", "embed_pos", "q_head"))}
    assert len(linears) == 1 + 4 * TINY["L_layers"]
    for name, m in linears.items():
        assert_trunc_normal(m.weight, 1 / math.sqrt(m.weight.shape[1]), name)
        assert getattr(m, "bias", None) is None, f"{name} must have no bias"
    assert (inner.q_head.weight == 0).all() and (inner.q_head.bias == -5).all()
    assert isinstance(inner.puzzle_emb.weights, torch.Tensor) and not isinstance(inner.puzzle_emb.weights, torch.nn.Parameter)
    assert (inner.puzzle_emb.weights == 0).all()
    assert_trunc_normal(inner.embed_tokens.embedding_weight, 1 / math.sqrt(D), "embed_tokens")
    assert_trunc_normal(inner.embed_pos.embedding_weight, 1 / math.sqrt(D), "embed_pos")
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dtype_name,dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_initial_states_are_unit_trunc_normal_buffers_in_forward_dtype(dtype_name, dtype):
    torch.manual_seed(0)
    model = build_model({**TINY, "hidden_size": 2048, "num_heads": 8, "L_layers": 0, "forward_dtype": dtype_name,
                         "puzzle_emb_ndim": 0})
    inner = model.inner
    params = {id(p) for p in model.parameters()}
    for name in ("H_init", "L_init"):
        t = getattr(inner, name)
        assert t.dtype == dtype and t.shape == (2048,) and id(t) not in params
        assert f"inner.{name}" in model.state_dict()          # a persistent buffer, not a parameter
        assert_trunc_normal(t, 1.0, name)
    assert not torch.equal(inner.H_init, inner.L_init)


# ---------------------------------------------------------------------------------------------
# 6. Parameter counts of the published recipes
# ---------------------------------------------------------------------------------------------

RECIPE = dict(name="trm", hidden_size=512, num_heads=8, expansion=4, L_layers=2, H_cycles=3, L_cycles=6,
              puzzle_emb_len=16, puzzle_emb_ndim=512, forward_dtype="float32", num_puzzle_identifiers=3,
              batch_size=2)


@pytest.mark.parametrize("name,overrides,published", [
    ("sudoku_mlp", dict(mlp_t=True, pos_encodings="none", seq_len=81, vocab_size=11), 5.0e6),
    ("sudoku_att", dict(mlp_t=False, pos_encodings="rope", seq_len=81, vocab_size=11), 6.8e6),
    ("arc_att", dict(mlp_t=False, pos_encodings="rope", seq_len=900, vocab_size=12, L_cycles=4), 6.8e6),
])
def test_published_parameter_counts(name, overrides, published):
    model = build_model({**RECIPE, **overrides})
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / published - 1) < 0.02, f"{name}: {count} parameters vs published {published:.0f}"
    assert model.inner.L_level.layers[0].mlp.down_proj.weight.shape == (512, 1536)
    if overrides["mlp_t"]:
        assert model.inner.L_level.layers[0].mlp_t.down_proj.weight.shape == (97, 512)
    table = model.inner.puzzle_emb.weights
    assert all(table is not p for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 7. Loading state dicts in the reference's naming
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["_orig_mod.model.", "model._orig_mod."])
def test_load_reference_state_dict_reproduces_source_model(prefix):
    source = make_model(seed=10)
    randomise_zero_inits(source, seed=11)
    target = make_model(seed=20)
    batch = make_batch(TINY, seed=3)
    source.eval()
    target.eval()
    _, want = source(source.initial_carry(batch), batch)
    _, before = target(target.initial_carry(batch), batch)
    assert not torch.allclose(before["logits"], want["logits"])

    state = {prefix + k: v.clone() for k, v in source.state_dict().items()}
    state[prefix + "inner.puzzle_emb.local_weights"] = torch.zeros(3, TINY["puzzle_emb_ndim"])
    state[prefix + "inner.puzzle_emb.local_ids"] = torch.zeros(3, dtype=torch.int32)
    load_reference_state_dict(target, state)
    _, got = target(target.initial_carry(batch), batch)
    for k in ("logits", "q_halt_logits", "q_continue_logits"):
        assert torch.equal(got[k], want[k]), k
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_load_reference_state_dict_rejects_other_architectures():
    state = {"_orig_mod.model." + k: v for k, v in make_model(seed=1).state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_reference_state_dict(make_model(seed=1, hidden_size=64), state)
    assert "shape mismatch" in str(err.value) and "inner.L_level.layers.0." in str(err.value)

    with pytest.raises(ValueError) as err:
        load_reference_state_dict(make_model(seed=1, L_layers=3), state)
    assert "missing" in str(err.value) and "inner.L_level.layers.2." in str(err.value)

    with pytest.raises(ValueError) as err:
        load_reference_state_dict(make_model(seed=1, mlp_t=True, pos_encodings="none"), state)
    message = str(err.value)
    assert "unexpected" in message and "self_attn" in message
    assert "missing" in message and "mlp_t" in message


# ---------------------------------------------------------------------------------------------
# 8. bf16 forward on CPU
# ---------------------------------------------------------------------------------------------

def test_bf16_forward_on_cpu():
    model = make_model(forward_dtype="bfloat16").train()
    batch = make_batch(TINY, seed=4)
    carry, out = model(model.initial_carry(batch), batch)
    assert out["q_halt_logits"].dtype == torch.float32 and out["q_continue_logits"].dtype == torch.float32
    assert out["logits"].dtype == torch.bfloat16
    assert carry.inner_carry.z_H.dtype == torch.bfloat16 and carry.inner_carry.z_L.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.inner.puzzle_emb.weights.dtype == torch.float32
    total, _ = act_loss(out, carry.current_data["labels"].long(), carry.halted, carry.steps)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # close to the fp32 model with the same weights (bf16 rounding only)
    fp32 = make_model(forward_dtype="float32").eval()
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    model.eval()
    _, out16 = model(model.initial_carry(batch), batch)
    _, out32 = fp32(fp32.initial_carry(batch), batch)
    assert (out16["logits"].float() - out32["logits"]).abs().max() < 0.15
