#!/usr/bin/env bash
# Train with the DeepSpeed launcher over the hosts of an MPI-style hostfile.
#
# usage: launch/deepspeed.sh --hostfile FILE CONFIG.yaml [deepspeed launcher options] [key=value ...]
#
#   --hostfile FILE   one line per node: `hostname slots=N` (N = processes on that node, > 0);
#                     blank lines and # comments are allowed; see launch/hostfile.example.
#                     Checked before anything starts: a missing file or a bad line exits 2.
#   CONFIG.yaml       run config
#   options           passed to the launcher, e.g. --include node1@node2:0,1  --num_gpus 4
#                     --master_addr A --master_port P  --launcher slurm  --ssh_port 2222
#                     --no_ssh --node_rank K (then run this once per node, with --master_addr)
#   key=value         config overrides, passed through to trm.train
#
# Runs:  deepspeed --hostfile FILE [options] --module trm.train CONFIG [key=value ...]
#        (`$PYTHON -m deepspeed.launcher.runner` instead of `deepspeed` when that is not on PATH)
#
# Environment:
#   DEEPSPEED  the launcher command (default: deepspeed if on PATH, else $PYTHON -m deepspeed.launcher.runner)
#   PYTHON     the Python to launch with (default: python)
#   DRY_RUN=1  validate the hostfile, print the command, do not run it
#   GLOO_SOCKET_IFNAME  with --no_ssh, the interface gloo uses (default: the one that reaches
#              --master_addr, unless that is loopback)
#
# Examples:
#   launch/deepspeed.sh --hostfile hosts configs/large.yaml run_dir=runs/large
#   node1$ launch/deepspeed.sh --hostfile hosts --no_ssh --node_rank=1 --master_addr=node0 configs/large.yaml
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/run_command.sh"

# The launcher's own options (deepspeed 0.19): flags, and options that take a value.
declare -A launcher_option_kind=()
for option in --no_local_rank --no_ssh --no_ssh_check --force_multi --save_pid --bind_cores_to_rank -q --quiet; do
  launcher_option_kind[$option]=flag
done
for option in -i --include -e --exclude --num_nodes --num_gpus --num_accelerators --master_port --master_addr \
  --node_rank --launcher --launcher_args --enable_each_rank_log --autotuning --bind_core_list --ssh_port \
  --venv_script --log_level; do
  launcher_option_kind[$option]=value
done
declare -A long_option=([-i]=--include [-e]=--exclude [-q]=--quiet)  # printed as --name=value, never -i=value

# check_hostfile FILE: exits 2 naming the problem, unless every entry is `hostname slots=N`, N > 0.
check_hostfile() {
  local file=$1 line number=0 hosts=0 entry='^[[:space:]]*([^[:space:]#]+)[[:space:]]+slots=([0-9]+)[[:space:]]*(#.*)?$'
  local -A seen=()
  [[ -e "$file" ]] || die 2 "hostfile '$file' does not exist"
  [[ -f "$file" && -r "$file" ]] || die 2 "hostfile '$file' is not a readable file"
  while IFS= read -r line || [[ -n "$line" ]]; do
    number=$((number + 1))
    line=${line%$'\r'}
    [[ "$line" =~ ^[[:space:]]*(#.*)?$ ]] && continue
    [[ "$line" =~ $entry ]] ||
      die 2 "hostfile '$file' line $number: '$line' is not 'hostname slots=N'"
    ((10#${BASH_REMATCH[2]} > 0)) ||
      die 2 "hostfile '$file' line $number: '$line': slots must be a positive integer"
    [[ -z "${seen[${BASH_REMATCH[1]}]:-}" ]] ||
      die 2 "hostfile '$file' line $number: '$line': host ${BASH_REMATCH[1]} is already on line ${seen[${BASH_REMATCH[1]}]}"
    seen[${BASH_REMATCH[1]}]=$number
    hosts=$((hosts + 1))
  done <"$file"
  ((hosts > 0)) || die 2 "hostfile '$file' has no host lines ('hostname slots=N'); it is empty or only comments"
}

hostfile="" config="" launcher_options=() overrides=() no_ssh="" node_rank="" master_addr=""
while (($#)); do
  arg=$1 name=${1%%=*}
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    -H | --hostfile | -H=* | --hostfile=*)
      if [[ "$arg" == *=* ]]; then hostfile=${arg#*=}; else
        (($# >= 2)) || die 2 "$arg needs a file name"
        hostfile=$2
        shift
      fi
      ;;
    --module | --no_python) die 2 "$arg: deepspeed.sh launches the module trm.train itself (--module)" ;;
    -*)
      long=${long_option[$name]:-$name}
      case "${launcher_option_kind[$name]:-}" in
        flag)
          [[ "$arg" != *=* ]] || die 2 "$name takes no value, got '$arg'"
          launcher_options+=("$long")
          value=""
          ;;
        value)
          if [[ "$arg" == *=* ]]; then value=${arg#*=}; else
            (($# >= 2)) || die 2 "$arg needs a value"
            value=$2
            shift
          fi
          launcher_options+=("$long=$value")
          ;;
        *) die 2 "unknown option '$arg': not a deepspeed launcher option this script knows (see --help)" ;;
      esac
      case "$long" in
        --no_ssh) no_ssh=1 ;;
        --node_rank) node_rank=$value ;;
        --master_addr) master_addr=$value ;;
      esac
      ;;
    *=*) overrides+=("$arg") ;;
    *)
      [[ -z "$config" ]] || die 2 "unexpected argument '$arg': only one CONFIG; overrides are key=value"
      config=$arg
      ;;
  esac
  shift
done

[[ -n "$hostfile" ]] || die 2 "--hostfile FILE is required. usage: launch/deepspeed.sh --hostfile FILE CONFIG.yaml [options] [key=value ...]"
check_hostfile "$hostfile"
[[ -n "$config" ]] || die 2 "no CONFIG given. usage: launch/deepspeed.sh --hostfile FILE CONFIG.yaml [options] [key=value ...]"
[[ -f "$config" ]] || die 2 "config file '$config' not found"
if [[ -n "$no_ssh" ]]; then
  [[ "$node_rank" =~ ^[0-9]+$ ]] || die 2 "--no_ssh needs --node_rank=K (this node's line in the hostfile, from 0)"
  [[ -n "$master_addr" ]] || die 2 "--no_ssh needs --master_addr=ADDR (the host of hostfile line 1, reachable from every node)"
  choose_gloo_interface "$master_addr"
fi

if [[ -n "${DEEPSPEED:-}" ]]; then
  read -r -a launcher <<<"$DEEPSPEED"
elif command -v deepspeed >/dev/null 2>&1; then
  launcher=(deepspeed)
else
  launcher=("$PYTHON" -m deepspeed.launcher.runner)
fi

run_command "${launcher[@]}" --hostfile "$hostfile" ${launcher_options[@]+"${launcher_options[@]}"} \
  --module trm.train "$config" ${overrides[@]+"${overrides[@]}"}
