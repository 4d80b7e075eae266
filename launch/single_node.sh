#!/usr/bin/env bash
# Train on one machine with N processes (one per GPU; CPU processes when there is no GPU).
#
# usage: launch/single_node.sh CONFIG.yaml [--gpus N] [key=value ...]
#
#   CONFIG.yaml   run config (configs/tiny.yaml, configs/large.yaml, ...)
#   --gpus N      processes to start (default: the visible GPUs: CUDA_VISIBLE_DEVICES entries,
#                 else `nvidia-smi -L` lines, else 1)
#   key=value     config overrides, passed through to trm.train (run_dir=runs/x train.max_steps=10)
#
# Runs:  $PYTHON -m torch.distributed.run --standalone --nproc_per_node=N -m trm.train CONFIG [key=value ...]
#
# Environment:
#   PYTHON     the Python to launch with (default: python; e.g. PYTHON=.venv/bin/python)
#   DRY_RUN=1  print the command, do not run it
#
# Examples:
#   launch/single_node.sh configs/large.yaml
#   launch/single_node.sh configs/tiny.yaml --gpus 2 device=cpu run_dir=runs/tiny2
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/run_command.sh"

config="" gpus="" overrides=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --gpus) (($# >= 2)) || die 2 "--gpus needs a number"; gpus=$2; shift 2; continue ;;
    --gpus=*) gpus=${1#--gpus=} ;;
    -*) die 2 "unknown option '$1' (see --help)" ;;
    *=*) overrides+=("$1") ;;
    *)
      [[ -z "$config" ]] || die 2 "unexpected argument '$1': only one CONFIG; overrides are key=value"
      config=$1
      ;;
  esac
  shift
done

[[ -n "$config" ]] || die 2 "no CONFIG given. usage: launch/single_node.sh CONFIG.yaml [--gpus N] [key=value ...]"
[[ -f "$config" ]] || die 2 "config file '$config' not found"
gpus=${gpus:-$(visible_gpu_count)}
is_positive_int "$gpus" || die 2 "--gpus must be a positive integer, got '$gpus'"

run_command "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$gpus" \
  -m trm.train "$config" ${overrides[@]+"${overrides[@]}"}
