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
