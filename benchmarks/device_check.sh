#!/usr/bin/env bash
# One prepared GPU check for a lent GPU machine (the `device` tool: one H100/H200, no network,
# 15 minutes of device time per session, machine start included). Run from the repository root.
#
#   bash benchmarks/device_check.sh [STAGE ...]      stages: env build tests train bench (default: all)
#
# Stages (each under its own time limit, each writes one log to $OUT, a failing stage does not stop
# the next one; the exit status is the number of failed stages):
#   env    nvidia-smi, torch/triton versions, the device class the benchmark baselines use
#   build  JIT-build + load the native kernels for the visible GPU, the CUDA self-check, a quick timing
#   tests  pytest -m gpu tests          (CUDA and Triton kernels against the reference; GPU training)
#   train  a full-size sudoku_mlp run on generated data: 30 steps + checkpoint, resume to 40 (each ends with an evaluation)
#   bench  TRM_BENCH_UPDATE=1 pytest benchmarks   (records baselines/<card>.json + results/<card>-<date>.csv)
# Results (at most 8 files come back from $OUT): *.log, the baseline JSON and the results CSV.
#
# Preparation, on the CPU machine (the GPU machine lacks DeepSpeed and OmegaConf):
#   bash ../shared/device/wheels.sh            # -> .whl/ (ignored by git), carried with carry [".whl"]
# Suggested plan for 15 minutes of device time (machine start ~1-2 min included). Two calls back to
# back: the machine stays warm ~30 s after a call, and the kernels the first call JIT-built (torch's
# extension cache, ~/.triton) are reused by the second:
#   run(command="bash benchmarks/device_check.sh env build tests", carry=[".whl"], timeout_s=420)
#   run(command="bash benchmarks/device_check.sh bench train",     carry=[".whl"], timeout_s=540)
# None of this has been timed on a GPU yet (no session had one): if the first call shows the stages
# are slower than their limits, narrow the benchmarks, e.g. TRM_DC_BENCH_ARGS="-k 'not compile'".
# Limits per stage (seconds): TRM_DC_BUILD_S (240), TRM_DC_TESTS_S (240), TRM_DC_TRAIN_S (150),
# TRM_DC_BENCH_S (300). Extra pytest arguments: TRM_DC_TESTS_ARGS, TRM_DC_BENCH_ARGS; extra train
# overrides: TRM_DC_TRAIN_ARGS; wheels folder: TRM_DC_WHEELS (.whl).
# On a machine without a GPU the script still runs (gpu tests skip, benchmarks take the CPU path):
# tests/test_device_check.py runs it that way so that it is not broken when a GPU session needs it.
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

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env build tests train bench)
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
  "$PY" -m trm.ops.native --bench --device "$dev" --dtype "$([ $dev = cuda ] && echo bfloat16 || echo float32)" \
    && "$PY" -c "from trm.ops import dispatch; import json; dispatch.set_backend('auto'); print('kernels=auto runs:', json.dumps(dispatch.describe()))"
}

stage_tests() {
  eval "set -- ${TRM_DC_TESTS_ARGS:-}"   # shell words: TRM_DC_TESTS_ARGS="-k 'rms_norm and not mlp_t'"
  "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --maxfail=20 -o addopts="-ra" "$@" 2>&1
}

stage_train() {
  local work=${TRM_DC_WORK:-/tmp/trm-dc}
  rm -rf "$work" && mkdir -p "$work"
  "$PY" -m trm.data build sudoku --out "$work/data" --train-puzzles 200 --aug 10 --test-puzzles 64 --seed 0 \
    || return 1
  eval "set -- ${TRM_DC_TRAIN_ARGS:-}"
  local common=("data.path=$work/data" "run_dir=$work/run" "train.eval_interval=0" "train.checkpoint_interval=30"
                "train.log_interval=10" "$@")
  "$PY" -m trm.train configs/sudoku_mlp.yaml "${common[@]}" train.max_steps=30 || return 1
  "$PY" -m trm.train configs/sudoku_mlp.yaml "${common[@]}" train.max_steps=40 mode=resume || return 1
  ls -R "$work/run" | head -40
}

stage_bench() {
  eval "set -- ${TRM_DC_BENCH_ARGS:-}"
  TRM_BENCH_UPDATE=${TRM_BENCH_UPDATE-1} "$PY" -m pytest benchmarks -q -p no:cacheprovider -o addopts="-ra" "$@" 2>&1
  local rc=$?
  cp benchmarks/baselines/*.json "$OUT/" 2>/dev/null
  cp "$(ls -t benchmarks/results/*.csv 2>/dev/null | head -1)" "$OUT/" 2>/dev/null
  return $rc
}

export OUT PY
export -f stage_env stage_build stage_tests stage_train stage_bench
for s in "${stages[@]}"; do
  case $s in
    env)   run_stage env 60 stage_env ;;
    build) run_stage build "${TRM_DC_BUILD_S:-240}" stage_build ;;
    tests) run_stage tests "${TRM_DC_TESTS_S:-240}" stage_tests ;;
    train) run_stage train "${TRM_DC_TRAIN_S:-150}" stage_train ;;
    bench) run_stage bench "${TRM_DC_BENCH_S:-300}" stage_bench ;;
    *) echo "device_check: unknown stage '$s' (env build tests train bench)" >&2; exit 100 ;;
  esac
done
echo "device_check: ${#stages[@]} stage(s), $failed failed; logs in $OUT"
exit $failed
