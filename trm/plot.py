"""PNG learning curves of a run, drawn from its ``metrics.jsonl``.

    python -m trm.plot runs/tiny                 # writes runs/tiny/learning_curves.png
    python -m trm.plot runs/tiny --out curves.png

Panels (each only when the run logged its keys), one quantity per axis: losses, exact accuracy
(train, evaluation with all steps and with early exit, the evaluation's 95% interval as a band),
token accuracy, mean supervision steps, learning rate, gradient norm, throughput (examples/s)
and, only when the run knew its devices' peak, MFU. The trainer draws the same figure at the end
of every run (``train.plots``). Uses matplotlib's Agg canvas directly, so no display and no
global backend. This module reads ``metrics.jsonl`` itself and imports nothing of the trainer
(``trm.train.metrics`` calls it, never the reverse).

Test: ``pytest tests/test_export_plot.py -k plot``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from trm import cli

PLOT_FILE = "learning_curves.png"
METRICS_FILE = "metrics.jsonl"

PANELS: list[tuple[str, tuple[tuple[str, str], ...], bool]] = [
    # title (the one quantity of the axis), (metric key, legend label) pairs, log scale
    ("loss", (("train/lm_loss", "LM (stablemax CE)"), ("train/q_halt_loss", "Q halt"),
              ("train/q_continue_loss", "Q continue")), True),
    ("exact accuracy", (("train/exact_accuracy", "train (halted slots)"), ("eval/exact_accuracy", "eval, all steps"),
                        ("eval/early_exit/exact_accuracy", "eval, early exit")), False),
    ("token accuracy", (("train/token_accuracy", "train (halted slots)"), ("eval/token_accuracy", "eval, all steps"),
                        ("eval/early_exit/token_accuracy", "eval, early exit")), False),
    ("mean supervision steps", (("train/steps", "train (at halt)"), ("eval/early_exit/steps", "eval, early exit")), False),
    ("learning rate", (("train/lr", "network"),), False),
    ("gradient norm", (("train/grad_norm", "L2, before clipping"),), True),
    ("throughput (examples/s)", (("train/examples_per_s", "examples/s"),), False),
    ("MFU (% of peak)", (("perf/mfu", "MFU"),), False),
]
PERCENT = {"perf/mfu"}
"""Fractions drawn as percentages."""

HALTED_ONLY = ("train/token_accuracy", "train/exact_accuracy", "train/q_halt_accuracy", "train/steps")
"""Averages over the slots that halted in a logging window: undefined (logged as 0) when none did."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All events of a run's metrics.jsonl (empty when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
              and not (key in HALTED_ONLY and r.get("train/halted") == 0)]
    scale = 100.0 if key in PERCENT else 1.0
    return [s for s, _ in points], [scale * v for _, v in points]


def draw(rows: list[dict[str, Any]], title: str):
    """The figure of a run's events (a matplotlib ``Figure`` on an Agg canvas, one axis per panel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(name, [(k, label) for k, label in keys if _series(rows, k)[0]], log) for name, keys, log in PANELS]
    panels = [p for p in panels if p[1]]
    cols = 3
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.3 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, keys, log) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for key, label in keys:
            steps, values = _series(rows, key)
            marker = "o" if key.startswith("eval/") or len(steps) < 20 else None
            line, = ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.4)
            low, high = _series(rows, key + "/ci95_low"), _series(rows, key + "/ci95_high")
            if low[0] and low[0] == high[0]:
                ax.fill_between(low[0], low[1], high[1], color=line.get_color(), alpha=0.15, linewidth=0,
                                label=f"{label}: 95% CI")
        if log and all(v > 0 for k, _ in keys for v in _series(rows, k)[1]):
            ax.set_yscale("log")
        if name.endswith("accuracy"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 or name.endswith("accuracy"):
            ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.suptitle(title)
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the learning curves of ``run_dir`` into ``out`` (default ``<run_dir>/learning_curves.png``)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise cli.CommandError(f"{run_dir / METRICS_FILE} is missing or empty: {run_dir} is not a run folder, or its "
                               f"run has not logged a step yet. Give the run_dir of a run (e.g. runs/tiny).")
    fig = draw(rows, f"{run_dir.name}: {rows[-1]['step']} steps")
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
