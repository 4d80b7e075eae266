#!/usr/bin/env bash
# Train on several machines: run this once per node (by hand, pdsh, or srun via launch/slurm.sbatch).
#
# usage: launch/multi_node.sh CONFIG.yaml [key=value ...]
#
#   CONFIG.yaml   run config (same path on every node, e.g. on a shared filesystem)
#   key=value     config overrides, passed through to trm.train
#
# Runs:  $PYTHON -m torch.distributed.run --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT
#          --rdzv_conf=is_host=1 --local_addr=$MASTER_ADDR (node 0; is_host=0 elsewhere) [--max_restarts=N]
#          --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=$NPROC_PER_NODE --rdzv_id=$RDZV_ID
#          -m trm.train CONFIG [key=value ...]
#
# Environment (a variable that is set wins; under SLURM the rest are derived from the job):
#   MASTER_ADDR     rendezvous host, reachable from every node  (SLURM: first host of SLURM_JOB_NODELIST)
#   MASTER_PORT     rendezvous port, free on MASTER_ADDR        (SLURM: 15000 + SLURM_JOB_ID % 20000)
#   NNODES          number of nodes, or MIN:MAX (elastic)       (SLURM: SLURM_NNODES)
#   NODE_RANK       this node's index, 0..NNODES-1              (SLURM: SLURM_NODEID)
#   NPROC_PER_NODE  processes per node     (SLURM: SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE;
#                                           otherwise the visible GPUs, else 1)
#   RDZV_ID         job id shared by all nodes                  (SLURM: SLURM_JOB_ID; default: trm)
#   MAX_RESTARTS    times torchrun restarts the job after a process or node fails (default: 0); run
#                   with mode=auto so that a restart resumes from the latest complete checkpoint
#   GLOO_SOCKET_IFNAME  interface gloo uses (default: the one that reaches MASTER_ADDR, unless that is
#                   loopback). NCCL_SOCKET_IFNAME is left to you (unset: NCCL picks)
#   PYTHON          the Python to launch with (default: python)
#   DRY_RUN=1       print the command, do not run it
#
# Example (two nodes, by hand):
#   node0$ MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 launch/multi_node.sh configs/large.yaml
#   node1$ MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=1 launch/multi_node.sh configs/large.yaml
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/run_command.sh"

# first_slurm_host NODELIST: `scontrol show hostnames` when available, else the first entry of a
# compressed list (node[01-04,07],gpu5 -> node01).
first_slurm_host() {
  local hosts pattern='^([^],[]*)(\[([^],-]*)[^]]*\])?([^,]*)'
  if command -v scontrol >/dev/null 2>&1 && hosts=$(scontrol show hostnames "$1" 2>/dev/null) && [[ -n "$hosts" ]]; then
    echo "${hosts%%$'\n'*}"
  elif [[ "$1" =~ $pattern ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[3]}${BASH_REMATCH[4]}"
  fi
}

config="" overrides=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    -*) die 2 "unknown option '$1' (see --help)" ;;
    *=*) overrides+=("$1") ;;
    *)
      [[ -z "$config" ]] || die 2 "unexpected argument '$1': only one CONFIG; overrides are key=value"
      config=$1
      ;;
  esac
  shift
done
[[ -n "$config" ]] || die 2 "no CONFIG given. usage: launch/multi_node.sh CONFIG.yaml [key=value ...]"
[[ -f "$config" ]] || die 2 "config file '$config' not found"

if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR=$(first_slurm_host "$SLURM_JOB_NODELIST")
fi
if [[ -z "${MASTER_PORT:-}" && "${SLURM_JOB_ID:-}" =~ ^[0-9]+$ ]]; then
  MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
fi
NNODES=${NNODES:-${SLURM_NNODES:-}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-$(visible_gpu_count)}}}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-trm}}

declare -A how_to_set=(
  [MASTER_ADDR]="export MASTER_ADDR=<host name or IP of node 0, reachable from every node>"
  [MASTER_PORT]="export MASTER_PORT=<free TCP port on MASTER_ADDR, e.g. 29500>"
  [NNODES]="export NNODES=<number of nodes>"
  [NODE_RANK]="export NODE_RANK=<this node's index: 0 on MASTER_ADDR, 1..NNODES-1 elsewhere>"
)
missing=()
for name in MASTER_ADDR MASTER_PORT NNODES NODE_RANK; do
  [[ -n "${!name:-}" ]] || missing+=("$name is not set: ${how_to_set[$name]}")
done
if ((${#missing[@]})); then
  {
    echo "multi_node.sh: error: the rendezvous is not fully set (under SLURM it comes from SLURM_JOB_NODELIST," \
      "SLURM_JOB_ID, SLURM_NNODES and SLURM_NODEID; see --help):"
    printf '  %s\n' "${missing[@]}"
  } >&2
  exit 2
fi

[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && ((MASTER_PORT >= 1 && MASTER_PORT <= 65535)) ||
  die 2 "MASTER_PORT must be a TCP port (1-65535), got '$MASTER_PORT'"
[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die 2 "NNODES must be a positive integer or MIN:MAX, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && ((NODE_RANK < ${NNODES##*:})) ||
  die 2 "NODE_RANK must be an integer in 0..$((${NNODES##*:} - 1)) (NNODES=$NNODES), got '$NODE_RANK'"
is_positive_int "$NPROC_PER_NODE" || die 2 "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die 2 "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"

if [[ "${NNODES##*:}" != 1 ]]; then
  choose_gloo_interface "$MASTER_ADDR"
fi
# Node 0 hosts the rendezvous store, and it says so: torchrun would guess by matching MASTER_ADDR
# against this machine's hostname, which fails wherever MASTER_ADDR is not what the hostname resolves
# to (an address of a second interface, a hostname mapped to 127.0.1.1) and leaves every node waiting
# for a store nobody starts. Node 0 also publishes MASTER_ADDR (reachable from every node) as its
# address for the workers' store, instead of its hostname.
if ((NODE_RANK == 0)); then
  node_options=(--rdzv_conf=is_host=1 --local_addr="$MASTER_ADDR")
else
  node_options=(--rdzv_conf=is_host=0)
fi
if ((10#$MAX_RESTARTS > 0)); then
  node_options+=(--max_restarts="$MAX_RESTARTS")
  # By default torchrun's workers share one store whose address is published in the first rendezvous
  # round only: a node that dies and is started again waits for it in the next round forever (and
  # the others with it). Unshared, every round publishes a fresh store for the workers.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi

run_command "$PYTHON" -m torch.distributed.run --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  "${node_options[@]}" --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" --rdzv_id="$RDZV_ID" \
  -m trm.train "$config" ${overrides[@]+"${overrides[@]}"}
