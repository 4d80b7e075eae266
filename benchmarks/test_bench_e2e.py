"""End-to-end: one training step (one supervision step of the ACT model: forward, the ACT loss,
backward, AdamATan2 update) of a recipe, ours vs a plain-PyTorch eager model, same run.

- ``ours``: ``kernels=auto`` (the fused kernels of this device), eager; and the same under
  ``torch.compile`` (``train.compile``), which pays on CPU too. The compiled variant also times the
  plain-PyTorch model under torch.compile (``speedup_vs_ref_compiled``: what our kernels add to compile).
- ``reference``: ``kernels=torch`` eager: the same model written in plain PyTorch ops (its outputs are
  the reference model's, tests/test_model.py). With ``TRM_REFERENCE_PATH`` naming a checkout of
  TinyRecursiveModels (CPU), the published model itself, loaded with the same weights
  (bench_reference.py; recorded as ``.../vs-reference-model``, not gated). Both rows (eager,
  compiled) are timed against the same eager reference side in the same session.

CPU: the tiny recipe (configs/tiny.yaml) at its own size. GPU: sudoku_mlp and arc1 at full size,
bf16, at the published runs' per-GPU batch (sudoku 768 x 97 positions; ARC 192 x 916). Reports examples/s and peak memory (CPU: persistent state
+ the step's peak allocation from the profiler); gates the speedup
like every benchmark. Run: ``pytest benchmarks/test_bench_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import bench_reference as br
import bench_util as bu
import pytest
import torch

from trm.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
DIMS = {"sudoku": dict(seq_len=81, vocab_size=11, num_puzzle_identifiers=1001),
        "arc": dict(seq_len=900, vocab_size=12, num_puzzle_identifiers=1001)}


def recipe_config(recipe: str, dims: dict, batch_size: int) -> dict:
    """The recipe's model keys with the data dims and batch (fp32 on CPU)."""
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    model_cfg = {**to_dict(cfg.model), **dims, "batch_size": batch_size}
    if not bu.on_gpu():
        model_cfg["forward_dtype"] = "float32"
    return model_cfg


def make_step(recipe: str, dims: dict, batch_size: int, backend: str, compile_: bool):
    model_cfg = recipe_config(recipe, dims, batch_size)
    return br.our_step(model_cfg, br.make_batch(batch_size, dims), backend, compile_)


def reference_side(recipe: str, dims: dict, batch_size: int):
    """``(step, label)`` of the reference side: the published model when TRM_REFERENCE_PATH names a
    checkout (CPU), else our plain-PyTorch model (kernels=torch)."""
    path = br.reference_path() if not bu.on_gpu() else None
    if path is None:
        return make_step(recipe, dims, batch_size, "torch", False), "kernels=torch"
    model_cfg = recipe_config(recipe, dims, batch_size)
    return br.reference_step(path, model_cfg, br.make_batch(batch_size, dims)), "reference model"


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    if hasattr(tree, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(tree, f)) for f in tree.__dataclass_fields__)
    return 0


def _peak_mb(fn) -> float:
    """Peak memory of one training step in MiB. GPU: ``max_memory_allocated`` less what the other
    variants in this process hold (their models and optimizer states). CPU: the state that
    lives across steps (parameters, optimizer state, carry) plus the step's peak transient
    allocation, from the profiler's allocation events (CPU has no allocator peak counter)."""
    model, opt, state = fn.persistent
    persistent = (_tensor_bytes(list(model.parameters())) + _tensor_bytes(list(opt.state.values()))
                  + _tensor_bytes(state["carry"]))
    if bu.on_gpu():
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - persistent   # the other variants' models, the batch
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - others) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every allocation and free with its timestamp (the op-level events fold them into per-op nets)
    allocations = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
    level = peak = 0
    for event in allocations:
        level += event.nbytes()
        peak = max(peak, level)
    assert allocations and peak > 0, "the profiler recorded no CPU allocations"
    return (persistent + peak) / 2**20


CPU_RECIPES = [pytest.param("tiny", "sudoku", 64, c, id=f"tiny-cpu-{'compile' if c else 'eager'}") for c in (False, True)]
# Per-GPU batch of the published runs: sudoku_mlp 768 on one GPU; arc1 768 over 4 GPUs = 192 each
# (768 x 916 tokens on one card would need ~55 GB of activations, estimated from a CPU measurement).
GPU_RECIPES = [pytest.param(r, d, b, c, id=f"{r}-{'compile' if c else 'eager'}", marks=pytest.mark.gpu)
               for r, d, b in (("sudoku_mlp", "sudoku", 768), ("arc1", "arc", 192)) for c in (False, True)]


@pytest.mark.parametrize("recipe,data,batch_size,compile_", CPU_RECIPES if not bu.on_gpu() else GPU_RECIPES)
def test_training_step(recipe, data, batch_size, compile_):
    dims = DIMS[data]
    ref, ref_label = reference_side(recipe, dims, batch_size)
    ours = make_step(recipe, dims, batch_size, "auto", compile_)
    for _ in range(3 if compile_ else 1):          # compile + warm-up outside the timing
        ours()
        ref()
    m = bu.measure(ref, ours, rounds=9, min_round_s=0.1)
    extra = {"examples_per_s_ours": batch_size / m.ours_s, "examples_per_s_ref": batch_size / m.ref_s,
             "peak_mb_ours": _peak_mb(ours), "peak_mb_ref": _peak_mb(ref)}
    if compile_:
        # the same plain-PyTorch model under torch.compile: what compile alone buys, same run
        ref_compiled = make_step(recipe, dims, batch_size, "torch", True)
        for _ in range(3):
            ref_compiled()
        mc = bu.measure(ref_compiled, ours, rounds=9, min_round_s=0.1)
        extra.update(examples_per_s_ref_compiled=batch_size / mc.ref_s, speedup_vs_ref_compiled=mc.speedup,
                     peak_mb_ref_compiled=_peak_mb(ref_compiled))
    # against the reference model the ratio has no baseline of its own: recorded, not gated
    suffix = "" if ref_label == "kernels=torch" else "/vs-reference-model"
    result = bu.record(bu.Result.of(
        m, name=f"train_step/{recipe}/{'compile' if compile_ else 'eager'}/b{batch_size}{suffix}", op="train_step",
        shape=f"{recipe} batch {batch_size}, vs {ref_label} eager", backend="auto" + ("+compile" if compile_ else ""),
        extra=extra,
    ), remeasure=lambda: bu.measure(ref, ours, rounds=9, min_round_s=0.1))
    assert result.ours_s > 0 and result.ref_s > 0
    assert all(extra[k] > 0 for k in extra if k.startswith("peak_mb")), extra
