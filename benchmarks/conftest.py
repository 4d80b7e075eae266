"""``pytest benchmarks``: GPU-only benchmarks skip (with the reason) when no GPU is visible; at the
end a short table is printed and the full numbers go to ``benchmarks/results/<device>-<date>.csv``
(see bench_util.py for the timing and the gate)."""

from __future__ import annotations

import bench_util
import pytest
import torch


def pytest_configure(config):
    bench_util.pin_threads()     # before any benchmark: both sides run with the same threads
    bench_util.keep_freed_memory()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not bench_util.SESSION:
        return
    path = bench_util.write_csv()
    terminalreporter.section("trm benchmarks (speedup = PyTorch reference time / ours, same run)")
    for line in bench_util.summary_lines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"full results: {path}")
