"""One training step of ours against the REFERENCE model (TinyRecursiveModels), same weights, same run.

The step is one supervision step of the ACT model: forward, the ACT loss, backward, AdamATan2
update. Ours runs ``kernels=auto`` (eager, and under ``torch.compile``); the reference side is
the published model code itself when ``TRM_REFERENCE_PATH`` points at a checkout of
SamsungSAILMontreal/TinyRecursiveModels, else our ``kernels=torch`` model, which computes the
reference's outputs with plain PyTorch ops (tests/test_model.py). Nothing of the reference is
copied or required: it is imported from that checkout at run time, and no test depends on it.

The reference's optimizer (the ``adam_atan2`` package) is a CUDA extension; on CPU both sides
run the same AdamATan2 math in plain PyTorch (``trm.ops.reference.adam_atan2``, foreach ops) so
the optimizer costs both sides alike. Before timing, the reference model is checked to give our
logits, loss and gradients for the same weights and batch.

    TRM_REFERENCE_PATH=/path/to/TinyRecursiveModels python benchmarks/bench_reference.py --shape issue tiny

Shapes: ``tiny`` is configs/tiny.yaml at its batch (64); ``issue`` is issue 16's (batch 128,
hidden 128, mlp_t, H_cycles 2, L_cycles 2, fp32; the rest from tiny.yaml).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_util as bu  # noqa: E402

from trm import ops  # noqa: E402
from trm.config import load_config, to_dict  # noqa: E402
from trm.model import act_loss, build_model  # noqa: E402
from trm.train.optim import AdamATan2  # noqa: E402

SUDOKU = dict(seq_len=81, vocab_size=11, num_puzzle_identifiers=1001)
SHAPES: dict[str, tuple[dict, int]] = {
    "tiny": ({}, 64),
    "issue": ({"hidden_size": 128, "H_cycles": 2, "L_cycles": 2}, 128),
}
"""shape name -> (overrides of configs/tiny.yaml's model keys, batch size)."""
REFERENCE_ENV = "TRM_REFERENCE_PATH"
LR, WEIGHT_DECAY = 1e-4, 0.1


def model_config(shape: str) -> tuple[dict, int]:
    """Our model config (tiny.yaml's model keys, the shape's overrides, Sudoku dims, fp32) and batch."""
    overrides, batch_size = SHAPES[shape]
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    model_cfg = {**to_dict(cfg.model), **overrides, **SUDOKU, "batch_size": batch_size}
    if not bu.on_gpu():
        model_cfg["forward_dtype"] = "float32"
    return model_cfg, batch_size


def make_batch(batch_size: int, dims: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(1, dims["vocab_size"], (batch_size, dims["seq_len"]), generator=g, dtype=torch.int32),
        "labels": torch.randint(1, dims["vocab_size"], (batch_size, dims["seq_len"]), generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(0, dims["num_puzzle_identifiers"], (batch_size,), generator=g, dtype=torch.int32),
    }
    return {k: v.to(bu.device()) for k, v in batch.items()}


def build_ours(model_cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_cfg).to(bu.device()).train()


def our_step(model_cfg: dict, batch: dict, backend: str, compile_: bool) -> Callable[[], None]:
    """One training step of our model under ``kernels=backend`` (optionally torch.compile'd).
    ``step.persistent`` = (model, optimizer, state) for memory accounting."""
    model = build_ours(model_cfg)
    opt = AdamATan2([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    forward = torch.compile(model) if compile_ else model
    state = {"carry": model.initial_carry(batch)}

    def step():
        with ops.use_backend(backend):
            carry, out = forward(state["carry"], batch)
            total, _ = act_loss(out, batch["labels"], carry.halted, carry.steps)
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state["carry"] = carry
    step.persistent = (model, opt, state)
    return step


def reference_path() -> Path | None:
    """The reference checkout named by ``TRM_REFERENCE_PATH``, or None when unset."""
    raw = os.environ.get(REFERENCE_ENV)
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not (path / "models" / "recursive_reasoning" / "trm.py").is_file():
        raise FileNotFoundError(
            f"{REFERENCE_ENV}={raw}: no models/recursive_reasoning/trm.py there; point it at a checkout of "
            f"SamsungSAILMontreal/TinyRecursiveModels, or unset it to compare against kernels=torch")
    return path


def build_reference(path: Path, model_cfg: dict, weights_from: torch.nn.Module):
    """The reference's ACT model and loss head from the checkout at ``path``, with our weights."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    ref_trm = importlib.import_module("models.recursive_reasoning.trm")
    ref_losses = importlib.import_module("models.losses")
    cfg = dict(model_cfg)
    cfg.pop("name", None)
    cfg.pop("loss_type", None)
    if cfg.get("puzzle_emb_ndim", 0) == 0:
        cfg["puzzle_emb_len"] = 0     # ours has no prefix then; the reference's default 16 would add one
    known = set(ref_trm.TinyRecursiveReasoningModel_ACTV1Config.model_fields)
    model = ref_trm.TinyRecursiveReasoningModel_ACTV1({k: v for k, v in cfg.items() if k in known} | {"H_layers": 0})
    model.load_state_dict(weights_from.state_dict(), strict=True)
    head = ref_losses.ACTLossHead(model, loss_type="stablemax_cross_entropy")
    return model.to(bu.device()).train(), head


def reference_step(path: Path, model_cfg: dict, batch: dict) -> Callable[[], None]:
    """One training step of the reference model (its model and loss code; AdamATan2 in plain PyTorch).
    CPU only: the reference builds its carry on the CPU."""
    if bu.on_gpu():
        raise RuntimeError(f"{REFERENCE_ENV}: the reference-model comparison runs on CPU only; unset it on a GPU")
    model, head = build_reference(path, model_cfg, build_ours(model_cfg))
    opt = AdamATan2([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    state = {"carry": model.initial_carry(batch)}

    def step():
        with ops.use_backend("torch"):
            carry, loss, _, _, _ = head(return_keys=[], carry=state["carry"], batch=batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state["carry"] = carry
    step.persistent = (model, opt, state)
    return step


def check_parity(path: Path, model_cfg: dict, batch: dict, backend: str = "auto") -> dict[str, float]:
    """Two supervision steps (the second continues the carry) of ours under ``backend`` and of the
    reference from the same weights: logits, loss and every gradient must agree (fp32: relative
    1e-4 of each tensor's scale). Raises AssertionError saying what differs; returns the errors."""
    ours = build_ours(model_cfg)
    ref, head = build_reference(path, model_cfg, ours)
    our_carry, ref_carry = ours.initial_carry(batch), ref.initial_carry(batch)
    errors: dict[str, float] = {}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))

    for k in range(2):
        torch.manual_seed(k)                      # the ACT exploration draws, alike on both sides
        with ops.use_backend(backend):
            our_carry, out = ours(our_carry, batch)
            our_loss, _ = act_loss(out, batch["labels"], our_carry.halted, our_carry.steps)
            our_loss.backward()
        torch.manual_seed(k)
        ref_carry, ref_loss, _, ref_out, _ = head(return_keys=["logits"], carry=ref_carry, batch=batch)
        ref_loss.backward()
        errors[f"step{k}/logits"] = rel(out["logits"].detach(), ref_out["logits"])
        errors[f"step{k}/loss"] = rel(our_loss.detach(), ref_loss.detach())
        assert torch.equal(our_carry.halted, ref_carry.halted), f"step {k}: the halting decisions differ"
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            if p.grad is not None:
                errors[f"step{k}/grad/{name}"] = rel(p.grad, ref_params[name].grad)
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"ours ({backend}) differs from the reference model: {worst} relative error {errors[worst]:.2e}"
    return errors


def warm(fns, times: int) -> None:
    for _ in range(times):
        for fn in fns:
            fn()


def compare(shape: str, rounds: int = 9, min_round_s: float = 0.1) -> list[str]:
    """Measure the shape's step: ours (auto eager, auto compiled; with the reference model also
    kernels=torch eager) against the reference model (or kernels=torch); returns report lines."""
    model_cfg, batch_size = model_config(shape)
    batch = make_batch(batch_size, SUDOKU)
    path = reference_path()
    lines = []
    if path is not None:
        errors = check_parity(path, model_cfg, batch, "auto")
        lines.append(f"{shape}: parity with the reference model (auto): worst relative error {max(errors.values()):.1e}")
        ref = reference_step(path, model_cfg, batch)
        ref_name = "reference model (TinyRecursiveModels) eager"
    else:
        ref = our_step(model_cfg, batch, "torch", False)
        ref_name = "kernels=torch eager (stand-in for the reference)"
    variants = {"auto eager": our_step(model_cfg, batch, "auto", False),
                "auto + torch.compile": our_step(model_cfg, batch, "auto", True)}
    if path is not None:
        variants["kernels=torch eager"] = our_step(model_cfg, batch, "torch", False)
    warm((ref, *variants.values()), 3)
    for name, ours in variants.items():
        m = bu.measure(ref, ours, rounds=rounds, min_round_s=min_round_s)
        lo, hi = m.ci
        lines.append(f"{shape} (batch {batch_size}): {name} vs {ref_name}: {m.speedup:.2f}x [{lo:.2f}, {hi:.2f}] "
                     f"({m.ref_s * 1e3:.1f} ms -> {m.ours_s * 1e3:.1f} ms per step)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["issue", "tiny"])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    bu.pin_threads()
    bu.keep_freed_memory()
    print(f"device {bu.device_class()}, {torch.get_num_threads()} thread(s)")
    for shape in args.shape:
        for line in compare(shape, rounds=args.rounds):
            print(line, flush=True)


if __name__ == "__main__":
    main()
