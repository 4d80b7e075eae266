"""The CPU-scale proof that test-time adaptation works, in one repeatable command:

    python -m trm.adapt.proof configs/arc_synth.yaml --out runs/arc-synth-proof

1. builds the synthetic ARC-like tasks (``trm.data.arc_synth``, arguments in :data:`SYNTH`, or
   ``--train-tasks`` etc.): training programs, and held-out programs (compositions never trained);
2. pretrains the recipe's tiny TRM on the training tasks (``python -m trm.train`` on the YAML);
3. on the held-out tasks: no adaptation with the new rows blank / zeros / mean (``adapt.steps=0``),
   then embeddings-only and full adaptation (the YAML's ``adapt`` section);
4. writes ``OUT/proof.md`` (the README table: held-out pass@2, exact accuracy, minutes of this
   machine per stage) and ``OUT/proof.json``.

Every stage is seeded; rerunning resumes finished stages from their results (delete OUT to redo).

    python -m trm.adapt.proof --time-published configs/arc1.yaml

times a training supervision step of the published ARC model on this CPU (the README's per-task
adaptation estimate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SYNTH = dict(train_tasks=48, heldout_tasks=16, validation_tasks=4, aug=8, canvas=4, min_side=2, max_side=2, seed=0)
"""Generator arguments of the proof (a 4x4 canvas of 2x2 grids, so that a 2-core CPU trains it in minutes)."""

VARIANTS = (
    ("no adaptation, blank row", ["adapt.steps=0", "adapt.init=blank"]),
    ("no adaptation, zero rows", ["adapt.steps=0", "adapt.init=zeros"]),
    ("no adaptation, mean row", ["adapt.steps=0", "adapt.init=mean"]),
    ("embeddings only", ["adapt.train=embeddings"]),
    ("full", ["adapt.train=full"]),
)


def _stage(out: Path, name: str, run) -> dict:
    """Run a stage once; its result (with the minutes it took) is cached in OUT/<name>.result.json."""
    cached = out / f"{name}.result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    started = time.time()
    result = run()
    result["minutes"] = (time.time() - started) / 60
    cached.write_text(json.dumps(result, indent=1))
    return result


REFERENCE_ARC1 = {"steps": 519_270, "batch": 768, "h100s": 4, "days": 3.0}
"""The reference's ARC-AGI-1 training (issue 15's schedule; ~3 days on 4 H100s): the anchor of the H100 estimate."""


def time_published_size(config: str, batch: int = 1, steps: int = 2) -> dict:
    """Seconds per slot and supervision step (forward + backward, the adaptation's unit of work) of
    the recipe's model on this CPU, its FLOPs, and the H100 estimate anchored on the reference's
    ARC-AGI-1 training throughput (see the README section for the arithmetic)."""
    import torch

    from trm.config import load_config, to_dict
    from trm.model import act_loss, build_model
    from trm.train.metrics import training_flops_per_step

    cfg = load_config(config, ["run_dir=unused", "data.path=unused", "model.forward_dtype=float32"])
    torch.manual_seed(0)
    model = build_model({**to_dict(cfg.model), "seq_len": 900, "vocab_size": 12, "num_puzzle_identifiers": 1001,
                         "batch_size": batch})
    batch_data = {"inputs": torch.randint(0, 12, (batch, 900), dtype=torch.int32),
                  "labels": torch.randint(0, 12, (batch, 900)), "puzzle_identifiers": torch.arange(1, batch + 1, dtype=torch.int32)}
    model.train()
    carry = model.initial_carry(batch_data)
    timings = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        carry, outputs = model(carry, batch_data)
        loss, _ = act_loss(outputs, carry.current_data["labels"], carry.halted, carry.steps, cfg.model.loss_type)
        loss.backward()
        model.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - started)
    per_slot = sorted(timings[1:])[len(timings[1:]) // 2] / batch
    flops = training_flops_per_step(model, 1)
    ref = REFERENCE_ARC1
    h100_per_slot = ref["days"] * 86400 * ref["h100s"] / (ref["steps"] * ref["batch"])
    return {"config": config, "parameters": sum(p.numel() for p in model.parameters()), "cpu_threads": torch.get_num_threads(),
            "cpu_seconds_per_slot_step": per_slot, "flops_per_slot_step": flops,
            "h100_seconds_per_slot_step": h100_per_slot,
            "h100_tflops_achieved": flops / h100_per_slot / 1e12}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--time-published":
        print(json.dumps(time_published_size(argv[1] if len(argv) > 1 else "configs/arc1.yaml"), indent=1))
        return 0
    parser = argparse.ArgumentParser(prog="python -m trm.adapt.proof", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the pretraining recipe with an adapt section (configs/arc_synth.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the data, the runs and the table")
    for key, value in SYNTH.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, help=f"generator argument (default {value})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the pretraining run (e.g. train.max_steps=500)")
    args = parser.parse_intermixed_args(argv)
    from trm.adapt import run_adaptation
    from trm.data.arc_synth import HELDOUT_DIR, build_arc_synth
    from trm.train.__main__ import main as train_main

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    synth = {key: getattr(args, key) for key in SYNTH}
    data = out / "data"
    if not (data / "train" / "dataset.json").is_file():
        build_arc_synth(data, **synth)
    pretrain_dir = out / "pretrain"

    def pretrain() -> dict:
        if train_main([args.config, f"run_dir={pretrain_dir}", f"data.path={data}", "mode=auto", *args.overrides]) != 0:
            raise SystemExit("trm.adapt.proof: pretraining failed")
        rows = [json.loads(line) for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "eval/exact_accuracy" in r][-1]
        return {"steps": last["step"], "validation pass@2": last.get("eval/arc/pass@2"),
                "validation exact": last["eval/exact_accuracy"]}

    results = {"pretraining": _stage(out, "pretrain", pretrain)}
    for label, overrides in VARIANTS:
        name = label.split(",")[-1].strip().replace(" ", "_")
        results[label] = _stage(out, name, lambda o=overrides, n=name: run_adaptation(
            pretrain_dir, data / HELDOUT_DIR, out / n, [*o, "train.progress_bar=false"]))
    pre = results["pretraining"]
    lines = [
        f"Synthetic tasks: {synth['train_tasks']} training programs, {synth['heldout_tasks']} held-out programs "
        f"({synth['canvas']}x{synth['canvas']} canvas, inputs {synth['min_side']}-{synth['max_side']} a side, "
        f"{synth['aug']} augmentations per task, seed {synth['seed']}).",
        f"Pretraining: {pre['steps']} steps in {pre['minutes']:.1f} min; validation tasks (training-family programs) "
        f"pass@2 {pre['validation pass@2']:.3f}, exact {pre['validation exact']:.3f}.",
        "",
        "| held-out tasks (new programs) | pass@2 | exact accuracy (augmented test inputs) | token accuracy | adaptation steps | minutes (this CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for label, _ in VARIANTS:
        r = results[label]
        after = r["after"]
        lines.append(f"| {label} | {after['arc/pass@2']:.3f} | {after['exact_accuracy']:.3f} | {after['token_accuracy']:.3f} "
                     f"| {r['steps']} | {r['minutes']:.2f} |")
    table = "\n".join(lines)
    (out / "proof.md").write_text(table + "\n")
    (out / "proof.json").write_text(json.dumps(results, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
