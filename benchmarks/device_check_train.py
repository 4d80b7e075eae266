"""The verdict of ``benchmarks/device_check.sh train``: given two runs of the same recipe, seed and
steps (``<work>/run_torch`` with kernels=torch, ``<work>/run_auto`` with kernels=auto):

1. one training step of the run's model under ``auto`` launches the kernels auto resolves to
   (``trm.ops.counters``), with no call handed to the reference;
2. auto's ``train/lm_loss`` agrees with torch's at every logged step within ``--rtol`` (relative);
3. examples/s of both (median of the logged windows after the first);
4. against ``<baselines>/<device class>-train.json``: when it exists, auto's curve must stay within
   ``--rtol`` of the recorded one and its speed at least ``(1 - --speed-tol)`` x the recorded speed;
   when it does not, this result is recorded there (and not gated).

Writes ``<out>/train_curves.json``; exits 1 naming every failed check.

    python benchmarks/device_check_train.py WORK OUT [--rtol 0.02] [--speed-tol 0.2] [--baselines DIR] [--sizes S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_util  # noqa: E402

FILES = {"rms_norm": "rms_norm", "stablemax_cross_entropy": "stablemax_ce", "swiglu": "swiglu",
         "apply_rope": "rope", "attention": "attention"}


def kernels_in_one_step(run_dir: Path) -> list[str]:
    """Failures of check 1 (printed: what was launched and what fell back)."""
    from trm import ops
    from trm.config import load_config
    from trm.data.puzzle_dataset import PuzzleDataset
    from trm.factories import build_model_for
    from trm.model import act_loss
    from trm.ops import counters, dispatch
    from trm.train.distributed import World

    cfg = load_config(run_dir / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    dataset = PuzzleDataset(cfg.data.path, seed=0)
    model = build_model_for(cfg, dataset.model_dims, World(0, 0, 1, device)).to(device).train()
    rows = torch.arange(cfg.train.global_batch_size).numpy() % dataset.num_eval_examples
    batch = {k: v.to(device) for k, v in dataset.eval_examples(rows).items()}
    ops.set_backend("auto")
    try:
        with counters.record() as seen:
            carry = model.initial_carry(batch)
            carry, outputs = model(carry, batch)
            loss, _ = act_loss(outputs, batch["labels"], carry.halted, carry.steps, cfg.model.loss_type)
            loss.backward()
        picks = {op: dispatch.resolve(op, device) for op in FILES}
    finally:
        ops.set_backend("torch")
    print(f"one step of the {cfg.model.hidden_size}-wide model on {device} under kernels=auto:")
    print("  auto runs:", picks)
    print("  kernels launched:", dict(seen.launches) or "none")
    print("  calls handed to the reference:", dict(seen.fallbacks) or "none")
    failures = [f"auto resolves {op} to {backend} but no {backend} {FILES[op]} kernel ran"
                for op, backend in picks.items()
                if backend != "torch" and op in ("rms_norm", "stablemax_cross_entropy", "swiglu")
                and not seen.ran(backend, FILES[op])]
    if seen.fallbacks:
        failures.append(f"calls fell back to the reference under auto: {dict(seen.fallbacks)}")
    if device.type == "cuda" and not seen.launches:
        failures.append("no kernel ran in the model under kernels=auto on the GPU")
    return failures


def curve(run_dir: Path) -> tuple[dict[int, float], float]:
    """{step: train/lm_loss} and the median examples/s of the logged windows after the first."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/lm_loss" in r]
    speeds = sorted(r["train/examples_per_s"] for r in (rows[1:] or rows))
    return {r["step"]: r["train/lm_loss"] for r in rows}, speeds[len(speeds) // 2]


def relative(a: float, b: float) -> float:
    diff = abs(a - b) / max(abs(b), 1e-12)
    return diff if diff == diff else float("inf")  # NaN never passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rtol", type=float, default=0.02)
    parser.add_argument("--speed-tol", type=float, default=0.2)
    parser.add_argument("--baselines", type=Path, default=Path(__file__).resolve().parent / "baselines")
    parser.add_argument("--sizes", default="", help="the size overrides of the runs (part of the baseline's key)")
    args = parser.parse_args(argv)

    failures = kernels_in_one_step(args.work / "run_auto")
    torch_curve, torch_speed = curve(args.work / "run_torch")
    auto_curve, auto_speed = curve(args.work / "run_auto")
    steps = sorted(torch_curve)
    if steps != sorted(auto_curve):
        failures.append(f"the runs logged different steps: {steps} vs {sorted(auto_curve)}")
        steps = sorted(set(steps) & set(auto_curve))
    print(f"{'step':>6} {'torch lm_loss':>14} {'auto lm_loss':>14} {'rel diff':>9}")
    worst = 0.0
    for step in steps:
        rel = relative(auto_curve[step], torch_curve[step])
        worst = max(worst, rel)
        print(f"{step:6d} {torch_curve[step]:14.6f} {auto_curve[step]:14.6f} {rel:9.2e}")
    if not worst <= args.rtol:
        failures.append(f"kernels=auto's loss curve differs from kernels=torch by {worst:.2e} relative "
                        f"(> {args.rtol}, TRM_DC_CURVE_RTOL)")
    print(f"examples/s: torch {torch_speed:.1f}, auto {auto_speed:.1f} (auto / torch = {auto_speed / torch_speed:.3f})")

    result = {"device_class": bench_util.device_class(), "sizes": args.sizes, "steps": steps,
              "torch_lm_loss": [torch_curve[s] for s in steps], "auto_lm_loss": [auto_curve[s] for s in steps],
              "torch_examples_per_s": torch_speed, "auto_examples_per_s": auto_speed, "max_rel_diff": worst}
    baseline = args.baselines / f"{result['device_class']}-train.json"
    if baseline.exists():
        old = json.loads(baseline.read_text())
        if (old.get("steps"), old.get("sizes")) != (steps, args.sizes):
            failures.append(f"{baseline} holds other steps or sizes ({old.get('steps')}, {old.get('sizes')!r}); "
                            f"delete it to record this setting")
        else:
            drift = max(relative(a, b) for a, b in zip(result["auto_lm_loss"], old["auto_lm_loss"]))
            print(f"baseline {baseline}: auto's curve moved {drift:.2e}; examples/s {auto_speed:.1f} "
                  f"vs {old['auto_examples_per_s']:.1f} recorded")
            if not drift <= args.rtol:
                failures.append(f"auto's loss curve moved {drift:.2e} relative from the baseline (> {args.rtol})")
            if auto_speed < (1 - args.speed_tol) * old["auto_examples_per_s"]:
                failures.append(f"auto trains at {auto_speed:.1f} examples/s, below {1 - args.speed_tol:.2f} x the "
                                f"baseline's {old['auto_examples_per_s']:.1f} (TRM_DC_SPEED_TOL)")
    else:
        baseline.parent.mkdir(parents=True, exist_ok=True)
        baseline.write_text(json.dumps(result, indent=1) + "\n")
        print(f"no baseline: recorded {baseline}, not gated")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_curves.json").write_text(json.dumps(result, indent=1) + "\n")
    for failure in failures:
        print("FAIL:", failure)
    print("train verdict:", "FAIL" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
