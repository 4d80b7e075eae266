# Sourced (not run) by the launch scripts: usage, errors, GPU counting, printing + running the command.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/run_command.sh"
#
# Environment shared by every launch script:
#   PYTHON    the Python that runs torch / deepspeed (default: python; set it to a venv's python
#             to launch from that venv without activating it)
#   DRY_RUN=1 print the command and exit 0 without running it

PYTHON="${PYTHON:-python}"

# usage: print the script's header comment (lines 2.. up to the first non-comment line).
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

# die CODE MESSAGE...: "SCRIPT: error: MESSAGE" on stderr, exit CODE.
die() {
  local code=$1
  shift
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit "$code"
}

# is_positive_int VALUE
is_positive_int() {
  [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# visible_gpu_count: CUDA_VISIBLE_DEVICES entries when set, else `nvidia-smi -L` lines, else 1 (CPU).
visible_gpu_count() {
  local count=0 listing
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "-1" ]]; then
    IFS=, read -r -a listing <<<"$CUDA_VISIBLE_DEVICES"
    count=${#listing[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if ((count > 0)); then echo "$count"; else echo 1; fi
}

# run_command ARGV...: print "+ ARGV" (one line, shell-quoted), then exec it unless DRY_RUN is set.
run_command() {
  local quoted dry=1
  case "${DRY_RUN:-0}" in 0 | "" | false | no) dry="" ;; esac
  [[ -n "$dry" ]] || command -v "$1" >/dev/null 2>&1 ||
    die 2 "'$1' is not a command on this machine: set PYTHON (DEEPSPEED for deepspeed.sh) to one that is, e.g. PYTHON=.venv/bin/python"
  printf -v quoted '%q ' "$@"
  printf '+ %s\n' "${quoted% }"
  [[ -n "$dry" ]] && exit 0
  exec "$@"
}

# first_ipv4 NAME: the first IPv4 address NAME resolves to on this machine (empty if none / no getent).
first_ipv4() {
  if command -v getent >/dev/null 2>&1; then
    getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }'
  fi
}

# interface_toward ADDRESS: the network interface this machine reaches ADDRESS (host name or IPv4)
# through, e.g. ib0 (for an address of this machine: the interface holding it); empty when that is
# loopback or cannot be told (no iproute2 / getent).
interface_toward() {
  local address source device
  command -v ip >/dev/null 2>&1 || return 0
  address=$(first_ipv4 "$1")
  [[ -n "$address" ]] || return 0
  source=$(ip -o route get "$address" 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "src") { print $(i + 1); exit } }')
  [[ -n "$source" ]] || return 0
  device=$(ip -o -4 addr show 2>/dev/null | awk -v source="$source" '{ split($4, a, "/"); if (a[1] == source) { print $2; exit } }')
  if [[ -n "$device" && "$device" != lo ]]; then echo "$device"; fi
}

# choose_gloo_interface MASTER_ADDR: unless GLOO_SOCKET_IFNAME is set or MASTER_ADDR is loopback (all
# nodes on this machine), export GLOO_SOCKET_IFNAME=<the interface that reaches MASTER_ADDR>. Without
# it gloo binds the address this machine's hostname resolves to, and where that is 127.0.1.1
# (Debian's /etc/hosts) the other nodes are told to dial loopback and time out. Exits 2 when no
# interface can be found and the hostname does resolve to loopback.
choose_gloo_interface() {
  local master=$1 device own
  [[ -z "${GLOO_SOCKET_IFNAME:-}" ]] || return 0
  [[ "$master" == localhost || "$master" =~ ^127\. || "$master" == ::1 ]] && return 0
  device=$(interface_toward "$master")
  if [[ -n "$device" ]]; then
    export GLOO_SOCKET_IFNAME=$device
    echo "$(basename "$0"): GLOO_SOCKET_IFNAME=$device (the interface that reaches $master; set GLOO_SOCKET_IFNAME to choose another)" >&2
    return 0
  fi
  own=$(first_ipv4 "$(hostname 2>/dev/null || true)")
  if [[ "$own" =~ ^127\. ]]; then
    die 2 "this machine's hostname resolves to $own and no interface toward MASTER_ADDR=$master was found," \
      "so gloo would listen on loopback where the other nodes cannot reach it. Set GLOO_SOCKET_IFNAME (and" \
      "NCCL_SOCKET_IFNAME on GPUs) to this node's interface on the cluster network (see: ip -o -4 addr)."
  fi
}
