"""What ``kernels=auto`` runs, from the benchmark baselines (``trm.ops.baselines``): a kernel that a
baseline of this device class shows faster (and that verification accepts) runs; one shown slower,
or one without a baseline for the device key (a GPU before ``device_check.sh`` recorded one, an
install without the checkout), leaves the reference, and ``describe()`` says why; the file
``pytest benchmarks`` records is the one auto reads; the thread-count rule; ``kernels: auto`` is the
config default. Baselines here live in temporary directories (``kernel_baselines``, conftest.py)."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from trm import ops
from trm.ops import baselines, counters, dispatch, reference, verify

from conftest import REPO

EPS = 1e-5


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    saved_global, saved_per_op = dispatch._global_backend, dict(dispatch._per_op)
    monkeypatch.setattr(dispatch, "_warned", set())
    verify.forget()
    yield
    dispatch._restore(saved_global, saved_per_op)
    verify.forget()


@pytest.fixture
def threads():
    """Set torch's intra-op threads for a test; restored afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_a_baseline_showing_the_kernel_faster_makes_auto_run_it(kernel_baselines):
    path = kernel_baselines({("cpu", "rms_norm"): 1.8})
    ops.set_backend("auto")
    assert dispatch.resolve("rms_norm", "cpu") == "cpu"
    assert verify.report()[("cpu", "rms_norm", "cpu")]["refused"] is None, "verified before it runs"
    with counters.record() as seen:
        ops.rms_norm(torch.randn(3, 8), EPS)
    assert seen.ran("cpu", "rms_norm"), seen
    said = ops.describe()
    assert said["rms_norm"]["cpu"] == f"cpu kernel: verified on cpu, baseline {path.stem}: 1.80x-1.80x the reference in its 1 entries"
    assert said["swiglu"]["cpu"] == f"reference: cpu kernel not used, baseline {path.stem} has no cpu swiglu entry"
    assert dispatch.summary("cpu") == "cpu: rms_norm; the rest the reference"


def test_one_slower_entry_keeps_the_reference_and_nothing_is_verified_for_it(kernel_baselines):
    path = kernel_baselines({("cpu", "swiglu"): 2.4})
    data = json.loads(path.read_text())
    data["benchmarks"]["swiglu/fwd/cpu/float32/64x97x3072"] = {"speedup": 0.93}
    data["benchmarks"]["swiglu/fwd+bwd-vs-compile/cpu/float32/64x97x3072"] = {"speedup": 0.5}  # not counted
    data["benchmarks"]["train_step/tiny/eager/b64"] = {"speedup": 0.5}                         # not counted
    path.write_text(json.dumps(data))
    baselines.forget()
    ops.set_backend("auto")
    assert dispatch.resolve("swiglu", "cpu") == "torch"
    assert ("cpu", "swiglu", "cpu") not in verify.report(), "an unbacked kernel costs no verification"
    assert ops.describe()["swiglu"]["cpu"] == (f"reference: cpu kernel not used, baseline {path.stem}: the cpu kernel "
                                               f"is 0.93x the reference (fwd/float32/64x97x3072)")
    with counters.record() as seen:
        y = ops.swiglu(torch.randn(3, 8))
    assert not seen.launches and y.shape == (3, 4)


def test_no_baseline_for_the_device_runs_the_reference_and_says_how_to_record_one(kernel_baselines, monkeypatch):
    kernel_baselines({("cuda", "rms_norm"): 3.0}, key="cpu-some-other-model-avx2-1t")
    ops.set_backend("auto")
    key = baselines.device_key("cpu")
    table = ops.describe()
    for op in ("rms_norm", "stablemax_cross_entropy", "swiglu", "adam_atan2"):
        assert dispatch.resolve(op, "cpu") == "torch"
        assert table[op]["cpu"].startswith(f"reference: cpu kernel not used, no baseline for {key} in "), table[op]
        assert f"record one: TRM_BENCH_THREADS={torch.get_num_threads()} TRM_BENCH_UPDATE=1 pytest benchmarks" in table[op]["cpu"]
    assert dispatch.summary("cpu") == f"the reference (no baseline for {key} in {kernel_baselines.folder}; trm.ops.describe() says more)"
    # a GPU before device_check.sh recorded its baseline (the card's name, as bench_util keys it)
    monkeypatch.setattr(baselines, "_gpu_name", lambda index: "nvidia-h200")
    found, why = baselines.locate("cuda:0")
    assert found is None and why.startswith("no baseline for nvidia-h200 in ")
    assert "bash benchmarks/device_check.sh" in why
    assert not baselines.evidence("triton", "rms_norm", "cuda:0").backed
    kernel_baselines({("triton", "rms_norm"): 1.3}, key="nvidia-h200")
    assert baselines.evidence("triton", "rms_norm", "cuda:0").backed
    assert not baselines.evidence("cuda", "rms_norm", "cuda:0").backed


def test_the_file_pytest_benchmarks_records_is_the_one_auto_reads(kernel_baselines, monkeypatch, threads):
    """``TRM_BENCH_UPDATE=1 pytest benchmarks`` (device_check.sh's bench stage) writes
    ``<bench_util.device_class()>.json``; auto then finds it and uses the kernels it shows faster."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_util

    threads(1)
    assert bench_util.device_class() == baselines.device_key("cpu") == f"{baselines._cpu_prefix()}-1t"
    monkeypatch.setenv("TRM_BENCH_BASELINE", str(kernel_baselines.folder / f"{bench_util.device_class()}.json"))
    for name, speedup in (("rms_norm/fwd/cpu/float32/64x97x512", 1.5), ("rms_norm/fwd+bwd/cpu/float32/64x97x512", 2.2),
                          ("adam_atan2/step/cpu/float32/tiny-mlp params", 0.2)):
        bench_util._update_baseline(bench_util.Result(name=name, op=name.split("/")[0], shape="", backend="cpu",
                                                      ref_s=speedup, ours_s=1.0, speedup=speedup))
    baselines.forget()
    ops.set_backend("auto")
    assert dispatch.resolve("rms_norm", "cpu") == "cpu" and dispatch.resolve("adam_atan2", "cpu") == "torch"
    assert "1.50x-2.20x the reference in its 2 entries" in ops.describe()["rms_norm"]["cpu"]


def test_a_process_with_n_threads_reads_the_nearest_recorded_thread_count(kernel_baselines, threads):
    """The exact ``<N>t`` file when recorded, else the nearest thread count of the same CPU model and
    ISA (ties: fewer threads); the choice is per call, so a later ``set_num_threads`` is followed."""
    prefix = baselines._cpu_prefix()
    kernel_baselines({("cpu", "rms_norm"): 2.0}, key=f"{prefix}-1t")
    kernel_baselines({("cpu", "rms_norm"): 0.8}, key=f"{prefix}-4t")
    kernel_baselines({("cpu", "rms_norm"): 0.8}, key=f"{prefix}-1t-train")   # device_check's train record: not a key
    ops.set_backend("auto")
    for n, used, picked in ((1, "1t", "cpu"), (2, "1t", "cpu"), (3, "4t", "torch"), (8, "4t", "torch")):
        threads(n)
        assert dispatch.resolve("rms_norm", "cpu") == picked, n
        assert f"baseline {prefix}-{used}" in ops.describe()["rms_norm"]["cpu"]
    threads(2)
    assert f"{prefix}-1t (the nearest recorded to 2 threads)" in ops.describe()["rms_norm"]["cpu"]
    kernel_baselines({("cpu", "rms_norm"): 0.8}, key=f"{prefix}-2t")
    assert dispatch.resolve("rms_norm", "cpu") == "torch", "an exact record beats the nearest"


def test_without_a_baseline_directory_auto_runs_the_reference_and_says_why(monkeypatch):
    """A wheel install (no repository checkout around trm): no directory, no crash, the reason said."""
    monkeypatch.delenv(baselines.ENV_DIR, raising=False)
    assert baselines.directory() == (baselines.REPO_DIR, ""), "a checkout finds its committed baselines"
    monkeypatch.setattr(baselines, "REPO_DIR", REPO / "no-such-dir")
    baselines.forget()
    try:
        ops.set_backend("auto")
        assert {dispatch.resolve(op, "cpu") for op in dispatch.OPS} == {"torch"}
        said = ops.describe()["rms_norm"]["cpu"]
        assert "no baseline directory" in said and "not run from its repository checkout" in said
        assert f"set {baselines.ENV_DIR}=" in said and dispatch.summary("cpu").startswith("the reference (no baseline directory")
        monkeypatch.setenv(baselines.ENV_DIR, str(REPO / "no-such-dir"))
        baselines.forget()
        assert "TRM_KERNEL_BASELINES=" in ops.describe()["rms_norm"]["cpu"] and "is not a directory" in ops.describe()["rms_norm"]["cpu"]
    finally:
        baselines.forget()


def test_an_unreadable_baseline_keeps_the_reference_naming_the_file(kernel_baselines):
    path = kernel_baselines({("cpu", "rms_norm"): 2.0})
    path.write_text('{"benchmarks": {"rms_norm/fwd/cpu/float32/x": {"speedup": "fast"}}}')
    baselines.forget()
    ops.set_backend("auto")
    assert dispatch.resolve("rms_norm", "cpu") == "torch"
    assert f"baseline {path} is not readable (ValueError" in ops.describe()["rms_norm"]["cpu"]


def test_every_committed_baseline_names_its_entries_as_auto_reads_them():
    """The committed files parse, and each per-op entry is ``op/mode/backend/dtype/shape`` with a
    known op, mode and backend (a renamed benchmark would silently stop backing its kernel)."""
    files = [p for p in baselines.REPO_DIR.glob("*.json") if not p.stem.endswith("-train")]
    assert files, f"no committed baselines in {baselines.REPO_DIR}"
    for path in files:
        for name, entry in json.loads(path.read_text())["benchmarks"].items():
            parts = name.split("/")
            if parts[0] in dispatch.OPS:
                assert len(parts) == 5 and parts[2] in dispatch.NATIVE_BACKENDS, (path.name, name)
                assert parts[1] in (*baselines.COUNTED_MODES, "fwd+bwd-vs-compile"), (path.name, name)
                assert float(entry["speedup"]) > 0


def test_explicit_backends_say_what_runs():
    ops.set_backend("torch")
    assert ops.describe()["rms_norm"]["cpu"] == "reference: kernels=torch" and dispatch.summary("cpu") == "the reference"
    ops.set_backend("cpu")
    said = ops.describe()
    assert said["rms_norm"]["cpu"] == "cpu kernel: kernels=cpu" and said["attention"]["cpu"] == "reference: cpu has no attention kernel"
    assert dispatch.summary("cpu").startswith("cpu: adam_atan2, linear, rms_norm")


def test_a_gpu_trace_uses_what_eager_auto_chose(monkeypatch):
    """Inside a torch.compile trace auto reads no files and verifies nothing: a GPU op takes the
    eager choice (``set_backend("auto")`` makes it up front), the reference when there was none."""
    monkeypatch.setattr(dispatch, "_chosen_eagerly", {("rms_norm", "cuda"): "triton"})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ops.set_backend("torch")
    with dispatch._routed("auto", "rms_norm"), dispatch._routed("auto", "swiglu"):
        assert dispatch.resolve("rms_norm", "cuda:0") == "triton"
        assert dispatch.resolve("swiglu", "cuda:0") == "torch"
        assert dispatch.resolve("rms_norm", "cpu") == "torch"


def test_kernels_auto_is_the_config_default_and_a_failing_backend_is_named(kernel_baselines, monkeypatch):
    from trm.config import load_config
    from trm.ops import native

    assert load_config(REPO / "configs" / "tiny.yaml").kernels == "auto"
    kernel_baselines({("cpu", "rms_norm"): 2.0})
    monkeypatch.setitem(native._state, "status", "unavailable")
    monkeypatch.setitem(native._state, "reason", "simulated build failure")
    with pytest.warns(RuntimeWarning, match="simulated build failure"):
        ops.set_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.randn(3, 8)
        assert torch.equal(ops.rms_norm(x, EPS), reference.rms_norm(x, EPS))
    assert ops.describe()["rms_norm"]["cpu"].startswith("reference: cpu kernel not used, unavailable (")


def test_verify_candidates_checks_every_kernel_without_changing_what_runs(kernel_baselines):
    """device_check.sh's build stage: every candidate is verified on a card without a baseline yet,
    while auto keeps the reference there until the baseline is recorded."""
    ops.set_backend("auto")                      # an empty baseline directory: nothing is backed
    assert verify.report() == {}
    report = dispatch.verify_candidates()
    assert {k for k in report if k[2] == "cpu"} == {("cpu", op, "cpu") for op, order in dispatch.AUTO_ORDER.items()
                                                    if "cpu" in order.get("cpu", ())}
    assert all(r["refused"] is None for r in report.values()), report
    assert dispatch.resolve("rms_norm", "cpu") == "torch"
