"""PNG learning curves of a run, drawn from its ``metrics.jsonl``.

    python -m trm.plot runs/tiny                 # writes runs/tiny/learning_curves.png
    python -m trm.plot runs/tiny --out curves.png

Panels (each only when the run logged its keys): losses, accuracies (train and evaluation,
with early exit), mean supervision steps, learning rate, gradient norm, throughput (examples/s;
MFU on a second axis). The trainer draws the same figure at the end of every run
(``train.plots``). Uses matplotlib's Agg canvas directly, so no display and no global backend.

Test: ``pytest tests/test_export_plot.py -k plot``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trm import cli
from trm.train.metrics import read_metrics

PLOT_FILE = "learning_curves.png"
PANELS: list[tuple[str, tuple[str, ...], bool]] = [
    # title, keys, log scale
    ("loss", ("train/lm_loss", "train/q_halt_loss", "train/q_continue_loss"), True),
    ("accuracy", ("train/token_accuracy", "train/exact_accuracy", "eval/token_accuracy", "eval/exact_accuracy",
                  "eval/early_exit/exact_accuracy"), False),
    ("mean supervision steps", ("train/steps", "eval/early_exit/steps"), False),
    ("learning rate", ("train/lr",), False),
    ("gradient norm", ("train/grad_norm",), True),
    ("throughput", ("train/examples_per_s",), False),
]


HALTED_ONLY = ("train/token_accuracy", "train/exact_accuracy", "train/q_halt_accuracy", "train/steps")
"""Averages over the slots that halted in a logging window: undefined (logged as 0) when none did."""


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
              and not (key in HALTED_ONLY and r.get("train/halted") == 0)]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the learning curves of ``run_dir`` into ``out`` (default ``<run_dir>/learning_curves.png``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise cli.CommandError(f"{run_dir / 'metrics.jsonl'} is missing or empty: {run_dir} is not a run folder, or its "
                               f"run has not logged a step yet. Give the run_dir of a run (e.g. runs/tiny).")
    panels = [(title, [k for k in keys if _series(rows, k)[0]], log) for title, keys, log in PANELS]
    panels = [p for p in panels if p[1]]
    cols = 3
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(5 * cols, 3.4 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, keys, log) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for key in keys:
            steps, values = _series(rows, key)
            marker = "o" if key.startswith("eval/") or len(steps) < 20 else None
            ax.plot(steps, values, label=key, marker=marker, markersize=3)
        if log and all(v > 0 for k in keys for v in _series(rows, k)[1]):
            ax.set_yscale("log")
        if title == "throughput":
            steps, mfu = _series(rows, "perf/mfu")
            if steps:
                twin = ax.twinx()
                twin.plot(steps, [100 * v for v in mfu], color="tab:red", alpha=0.6, label="MFU %")
                twin.set_ylabel("MFU %")
                twin.legend(loc="lower right", fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run_dir.name}: {rows[-1]['step']} steps")
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(out)
    return out


def _plot_command(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m trm.plot", description="PNG learning curves of a run.")
    parser.add_argument("run_dir", help="a run folder (with metrics.jsonl)")
    parser.add_argument("--out", default=None, help=f"PNG to write (default RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: an error explained on stderr)."""
    return cli.run("trm.plot", _plot_command, argv)


if __name__ == "__main__":
    sys.exit(main())
