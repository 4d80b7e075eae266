#!/usr/bin/env bash
# One prepared GPU check for a lent GPU machine (the `device` tool: one H100/H200, no network,
# 15 minutes of device time per session, machine start included). Run from the repository root.
#
#   bash benchmarks/device_check.sh [STAGE ...]   stages: env build tests bench train suite
#                                                 (default: env build tests bench train)
#   TRM_DC_DRY=1 bash benchmarks/device_check.sh  the same stages at toy sizes on the CPU, end to end
#                                                 (tests/test_device_check.py runs it on every commit)
#
# What each stage proves on a GPU (each under its own time limit, each writes one log to $OUT; a
# failing stage does not stop the next; the exit status is the number of failed stages):
#   env    which card, torch/triton/deepspeed versions, the device class the baselines are keyed by.
#   build  the native kernels build/load for this card and pass their self-check; `auto`'s run-time
#          verification (trm.ops.verify: every dtype and model layout incl. mlp_t's axis, forward and
#          gradient, against float64) accepts every kernel of AUTO_ORDER (baseline or not), or the
#          stage fails naming the refusal; what auto runs per op and why; a quick kernel timing.
#          => do the kernels run here, and does auto trust them?
#   tests  pytest -m gpu: the CUDA and Triton kernels against the reference in fp32/fp16/bf16, each
#          check asserting its kernels were launched (trm.ops.counters), and the model under cuda,
#          triton and auto on CUDA tensors equal to kernels=torch (test_ops_dispatch::test_model_on_gpu_*).
#          => are the kernels right, and is each one really what ran?
#   bench  pytest benchmarks (TRM_BENCH_UPDATE=1: records baselines/<card>.json, the file kernels=auto
#          reads: without it auto runs the reference ops on this card) and the day's results CSV.
#          Before train, so that train's kernels=auto runs what the benchmarks found faster.
#                                                                       => how much faster, per op?
#   train  the full-size sudoku_mlp recipe on generated data with kernels=torch and with kernels=auto,
#          same seed and steps, a checkpoint and a resume in each; then benchmarks/device_check_train.py:
#          a step of that model under auto launches the kernels (counted), the two loss curves agree
#          within TRM_DC_CURVE_RTOL at every logged step, examples/s of both; gated against
#          $TRM_DC_BASELINES/<device class>-train.json when it exists (auto's curve within the
#          tolerance of the recorded one, its speed >= (1 - TRM_DC_SPEED_TOL) x the recorded),
#          recorded there when it does not (not gated).
#          => does training with the kernels learn like the reference, and is it faster?
#   suite  the whole test suite on the GPU machine, not only -m gpu (default "-m 'not slow'",
#          TRM_DC_SUITE_ARGS); a call of its own.               => nothing else breaks on a GPU
# Results (at most 8 files come back from $OUT): *.log, train_curves.json, the baselines, the CSV.
#
# Preparation, on the CPU machine (the GPU machine lacks DeepSpeed and OmegaConf):
#   bash ../shared/device/wheels.sh            # -> .whl/ (ignored by git), carried with carry [".whl"]
# One 10-minute call answers "do the kernels run, are they right, are they faster" (machine start
# ~1-2 min; not yet timed on a GPU: a stage that overruns its limit says so, narrow it with *_ARGS):
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
# then, time permitting, the rest of the suite:
#   run(command="bash benchmarks/device_check.sh suite", carry=[".whl"], timeout_s=600)
# Limits per stage (seconds): TRM_DC_BUILD_S (120), TRM_DC_TESTS_S (150), TRM_DC_TRAIN_S (180),
# TRM_DC_BENCH_S (120), TRM_DC_SUITE_S (540). Extra pytest arguments: TRM_DC_TESTS_ARGS,
# TRM_DC_BENCH_ARGS, TRM_DC_SUITE_ARGS. Train: TRM_DC_TRAIN_STEPS (40; checkpoint + resume at half),
# TRM_DC_TRAIN_ARGS (extra overrides), TRM_DC_CURVE_RTOL (0.02), TRM_DC_SPEED_TOL (0.2),
# TRM_DC_BASELINES (benchmarks/baselines). Wheels folder: TRM_DC_WHEELS (.whl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/trm-device-check}
mkdir -p "$OUT"
PY=${TRM_DC_PYTHON:-python3}
export PYTHONUNBUFFERED=1

WHEELS=${TRM_DC_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "device_check: installing the carried wheels failed" >&2; exit 100; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

DRY=${TRM_DC_DRY:-0}
BASELINES=${TRM_DC_BASELINES:-benchmarks/baselines}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env build tests bench train)
failed=0

run_stage() {  # name limit_s command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s): $*" >"$OUT/$name.log"
  timeout --kill-after=10 "$limit" bash -c "$*" >>"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 124 ] && echo "=== $name: TIMED OUT after ${limit}s (raise TRM_DC_${name^^}_S)" | tee -a "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

stage_env() {
  { nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } | head -20
  "$PY" - <<'EOF'
import sys, torch
sys.path.insert(0, "benchmarks")
import bench_util
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
for mod in ("deepspeed", "omegaconf"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(mod, "NOT importable:", exc)
print("device class (baseline file):", bench_util.device_class())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
EOF
}

stage_build() {
  local dev=cpu; "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" && dev=cuda
  "$PY" - <<'EOF' || return 1
import json, warnings
from trm.ops import dispatch, native, verify
print("native:", json.dumps(native.status()))
print("cuda kernels:", native.available_cuda())
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    dispatch.set_backend("auto")            # reads the baselines, loads and verifies what they back
    dispatch.verify_candidates()            # and verifies every other candidate too
for (backend, op, device), result in sorted(verify.report().items()):
    ran = sum(v == "kernel" for v in result["cases"].values())
    verdict = ("REFUSED: " + result["refused"]) if result["refused"] else \
        f"ok: {ran} of {len(result['cases'])} dtype x layout cases ran the kernel (the rest: the reference)"
    print(f"verify {backend:6s} {op:24s} on {device:4s} {verdict}")
for w in said:
    print("warning:", w.message)
print("kernels=auto runs:", json.dumps(dispatch.describe(), indent=1))
refused = sorted(k for k, r in verify.report().items() if r["refused"])
raise SystemExit(f"auto refused {refused}" if refused else 0)
EOF
  if [ "$DRY" = 1 ]; then echo "dry mode: the kernel timing is skipped"; return 0; fi
  "$PY" -m trm.ops.native --bench --device "$dev" --dtype "$([ $dev = cuda ] && echo bfloat16 || echo float32)"
}

stage_tests() {
  eval "set -- ${TRM_DC_TESTS_ARGS:-}"   # shell words: TRM_DC_TESTS_ARGS="-k 'rms_norm and not mlp_t'"
  "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --maxfail=20 -o addopts="-ra" "$@" 2>&1
}

stage_suite() {
  eval "set -- ${TRM_DC_SUITE_ARGS:--m 'not slow'}"
  "$PY" -m pytest tests -q -p no:cacheprovider -o addopts="-ra" --durations=15 "$@" 2>&1
}

stage_train() {
  local work=${TRM_DC_WORK:-/tmp/trm-dc} steps=${TRM_DC_TRAIN_STEPS:-$([ "$DRY" = 1 ] && echo 2 || echo 40)}
  local half=$((steps / 2)) log=$((steps >= 20 ? 10 : 1)) build sizes=() kernels
  build=(--train-puzzles 200 --aug 10 --test-puzzles 64)
  if [ "$DRY" = 1 ]; then   # toy sizes on the CPU, 2 steps: the plumbing, not the numbers
    build=(--train-puzzles 16 --aug 1 --test-puzzles 8)
    sizes=(device=cpu model.hidden_size=32 model.num_heads=2 model.H_cycles=1 model.L_cycles=1
           model.halt_max_steps=2 model.forward_dtype=float32 train.global_batch_size=8 train.lr_warmup_steps=1
           data.eval_max_examples=8 train.plots=false train.num_threads=1)
  fi
  rm -rf "$work" && mkdir -p "$work"
  "$PY" -m trm.data build sudoku --out "$work/data" "${build[@]}" --seed 0 || return 1
  eval "set -- ${TRM_DC_TRAIN_ARGS:-}"
  for kernels in torch auto; do
    local common=("data.path=$work/data" "run_dir=$work/run_$kernels" "kernels=$kernels" "train.eval_interval=0"
                  "train.checkpoint_interval=$half" "train.log_interval=$log" "train.progress_bar=false"
                  "${sizes[@]}" "$@")
    echo "--- kernels=$kernels: $half steps + checkpoint, then a resume to $steps"
    "$PY" -m trm.train configs/sudoku_mlp.yaml "${common[@]}" train.max_steps=$half || return 1
    "$PY" -m trm.train configs/sudoku_mlp.yaml "${common[@]}" train.max_steps=$steps mode=resume || return 1
  done
  "$PY" benchmarks/device_check_train.py "$work" "$OUT" --rtol "${TRM_DC_CURVE_RTOL:-0.02}" \
    --speed-tol "${TRM_DC_SPEED_TOL:-0.2}" --baselines "$BASELINES" --sizes "${sizes[*]} $*"
  local rc=$?
  cp "$BASELINES"/*-train.json "$OUT/" 2>/dev/null
  return $rc
}

stage_bench() {
  local dry=""
  [ "$DRY" = 1 ] && dry="--collect-only"   # dry mode: the benchmarks are collected, not timed
  eval "set -- $dry ${TRM_DC_BENCH_ARGS:-}"
  TRM_BENCH_UPDATE=${TRM_BENCH_UPDATE-1} "$PY" -m pytest benchmarks -q -p no:cacheprovider -o addopts="-ra" "$@" 2>&1
  local rc=$?
  cp benchmarks/baselines/*.json "$OUT/" 2>/dev/null
  cp "$(ls -t benchmarks/results/*.csv 2>/dev/null | head -1)" "$OUT/" 2>/dev/null
  return $rc
}

export OUT PY DRY BASELINES
export -f stage_env stage_build stage_tests stage_train stage_bench stage_suite
for s in "${stages[@]}"; do
  case $s in
    env)   run_stage env 60 stage_env ;;
    build) run_stage build "${TRM_DC_BUILD_S:-120}" stage_build ;;
    tests) run_stage tests "${TRM_DC_TESTS_S:-150}" stage_tests ;;
    train) run_stage train "${TRM_DC_TRAIN_S:-180}" stage_train ;;
    bench) run_stage bench "${TRM_DC_BENCH_S:-120}" stage_bench ;;
    suite) run_stage suite "${TRM_DC_SUITE_S:-540}" stage_suite ;;
    *) echo "device_check: unknown stage '$s' (env build tests bench train suite)" >&2; exit 100 ;;
  esac
done
echo "device_check: ${#stages[@]} stage(s), $failed failed; logs in $OUT"
exit $failed
