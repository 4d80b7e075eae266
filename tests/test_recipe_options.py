"""The tiny recipe's training options: Muon for the recursion's matrices (``train.optimizer: muon``)
and decaying deep-supervision weights (``train.deep_supervision_decay``). The depth curriculum
(``curriculum.stages[].L_cycles``) is tested in tests/test_curriculum.py; exact resume with Muon in
tests/test_train.py.

Run: ``python -m pytest tests/test_recipe_options.py -q`` (CPU, a few seconds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from trm.config import ConfigError, load_config
from trm.model import act_loss, build_model
from trm.train.optim import AdamATan2, MuonAdamATan2, build_optimizer, muon_param_groups, orthogonalize

REPO = Path(__file__).resolve().parent.parent


def _tiny_trm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(dict(name="trm", hidden_size=32, num_heads=2, expansion=2, H_cycles=1, L_cycles=2, L_layers=2,
                            halt_max_steps=2, mlp_t=True, pos_encodings="none", puzzle_emb_ndim=0, seq_len=9,
                            vocab_size=5, num_puzzle_identifiers=1, batch_size=4))


def test_muon_groups_are_the_recursions_matrices():
    model = _tiny_trm()
    matrices, others = muon_param_groups(model.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[id(p)] for p in matrices["params"])
    assert matrices["muon"] and not others["muon"]
    assert muon_names and all(".L_level." in n and n.endswith(".weight") for n in muon_names)
    other_names = {names[id(p)] for p in others["params"]}
    assert {"inner.embed_tokens.embedding_weight", "inner.lm_head.weight", "inner.q_head.weight",
            "inner.q_head.bias"} <= other_names
    assert len(muon_names) + len(other_names) == len(list(model.parameters()))


def test_orthogonalize_flattens_the_spectrum():
    generator = torch.Generator().manual_seed(0)
    for shape in ((48, 20), (20, 48)):
        matrix = torch.randn(shape, generator=generator) @ torch.diag(torch.logspace(-2, 1, shape[1]).sqrt()[:shape[1]])
        singular = torch.linalg.svdvals(orthogonalize(matrix))
        assert singular.shape[0] == 20
        # Quintic NS does not converge to 1 exactly: singular values land in roughly [0.6, 1.2].
        assert 0.5 < singular.min() and singular.max() < 1.3, singular
        assert torch.linalg.svdvals(matrix).max() / torch.linalg.svdvals(matrix).min() > 10


def test_muon_step_updates_matrices_by_muon_and_the_rest_by_adam_atan2():
    model, reference = _tiny_trm(), _tiny_trm()
    lr, muon_lr, wd = 1e-2, 3e-2, 0.1
    optimizer = build_optimizer("muon", muon_param_groups(model.named_parameters()), lr=lr, betas=(0.9, 0.95),
                                weight_decay=wd, muon_lr=muon_lr, momentum=0.9)
    matrices, others = muon_param_groups(reference.named_parameters())
    adam = AdamATan2(others["params"], lr=lr, betas=(0.9, 0.95), weight_decay=wd)
    torch_muon = torch.optim.Muon(matrices["params"], lr=muon_lr, weight_decay=wd, momentum=0.9,
                                  adjust_lr_fn="match_rms_adamw")
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        adam.step()
        torch_muon.step()
    named = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if ".L_level." in name:
            # torch.optim.Muon orthogonalises in bfloat16; ours in float32.
            torch.testing.assert_close(param, named[name], atol=2e-3, rtol=0)
        else:
            assert torch.equal(param, named[name]), f"{name}: the non-matrix update is not AdamATan2's"
    muon_param = next(p for group in optimizer.param_groups if group["muon"] for p in group["params"])
    assert set(optimizer.state[muon_param]) == {"momentum_buffer"}


def test_muon_lr_follows_the_schedule_at_its_ratio():
    weight = nn.Parameter(torch.zeros(6, 4))
    bias, bias_alone = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    adam = AdamATan2([bias_alone], lr=5e-3, weight_decay=0.0)
    optimizer = MuonAdamATan2([{"params": [weight], "muon": True}, {"params": [bias]}], lr=1e-2, muon_lr=4e-2,
                              weight_decay=0.0)
    for group in optimizer.param_groups:
        group["lr"] = 5e-3                          # what the trainer's schedule does each step
    weight.grad = torch.ones(6, 4)
    bias.grad, bias_alone.grad = torch.ones(4), torch.ones(4)
    optimizer.step()
    adam.step()
    # orthogonalize(rank-1 ones) = u v^T with unit singular value (approximately): entries 1/sqrt(24).
    expected = -2e-2 * 0.2 * 6**0.5 * orthogonalize(torch.ones(6, 4))
    torch.testing.assert_close(weight.detach(), expected)
    assert torch.equal(bias, bias_alone), "the AdamATan2 group runs at the scheduled lr"


def test_muon_needs_flagged_groups_and_2d_matrices():
    with pytest.raises(ValueError, match="muon_param_groups"):
        build_optimizer("muon", [nn.Parameter(torch.zeros(3, 3))], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    with pytest.raises(ValueError, match="2-D matrices only"):
        MuonAdamATan2([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}], lr=1e-3)


def test_muon_learns_a_regression():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 1))
    named = [(f"L_level.{n}", p) for n, p in net.named_parameters()]
    optimizer = build_optimizer("muon", muon_param_groups(named), lr=5e-2, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(256, 8, generator=generator)
    y = x[:, :4].sum(-1, keepdim=True)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])   # 3.96 -> 0.024 when written


def test_deep_supervision_decay_weighs_each_sequence_by_its_step():
    generator = torch.Generator().manual_seed(3)
    B, S, V = 6, 5, 4
    outputs = {"logits": torch.randn(B, S, V, generator=generator, requires_grad=True),
               "q_halt_logits": torch.randn(B, generator=generator), "q_continue_logits": torch.randn(B, generator=generator)}
    labels = torch.randint(0, V, (B, S), generator=generator)
    halted = torch.ones(B, dtype=torch.bool)
    steps = torch.tensor([1, 2, 3, 1, 2, 3], dtype=torch.int32)
    plain, plain_metrics = act_loss(outputs, labels, halted, steps)
    same, _ = act_loss(outputs, labels, halted, steps, deep_supervision_decay=1.0)
    assert torch.equal(plain, same)
    # The total as the sum of per-sequence losses, each computed alone with the unweighted loss.
    per_sequence = torch.stack([act_loss({k: v[i:i + 1] for k, v in outputs.items()}, labels[i:i + 1], halted[i:i + 1],
                                         steps[i:i + 1])[0] for i in range(B)])
    torch.testing.assert_close(per_sequence.sum(), plain)
    decayed, decayed_metrics = act_loss(outputs, labels, halted, steps, deep_supervision_decay=0.5)
    torch.testing.assert_close(decayed, (per_sequence * torch.tensor([1, 0.5, 0.25, 1, 0.5, 0.25])).sum())
    assert torch.equal(decayed_metrics["lm_loss"], plain_metrics["lm_loss"]), "the logged lm_loss stays unweighted"


def test_deep_supervision_decay_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="deep_supervision_decay"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.deep_supervision_decay=0"])
    with pytest.raises(ConfigError, match="muon_momentum"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.muon_momentum=1.5"])


def test_other_recipes_keep_their_optimizer_and_loss():
    for recipe in ("sudoku_mlp", "sudoku_att", "maze", "arc1", "arc2", "large"):
        cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
        assert cfg.train.optimizer == "adam_atan2" and cfg.train.deep_supervision_decay == 1.0, recipe
        assert cfg.curriculum is None, recipe
