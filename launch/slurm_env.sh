#!/usr/bin/env bash
# JAX multi-process settings of the current SLURM task, for launch/gpu_slurm.sh.
#
# Usage:
#   source launch/slurm_env.sh        exports COORDINATOR, NUM_PROCESSES, PROCESS_ID
#   bash launch/slurm_env.sh --print  prints COORDINATOR=... NUM_PROCESSES=... PROCESS_ID=...
#
# COORDINATOR   first host of SLURM_JOB_NODELIST (`scontrol show hostnames`, or a bash
#               parser of nodelists such as node[01-04] and a,b where scontrol is absent),
#               port COORDINATOR_PORT [10000 + SLURM_JOB_ID % 50000: same on every task,
#               different for jobs sharing a node]
# NUM_PROCESSES SLURM_NTASKS, else SLURM_NNODES (one task per node)
# PROCESS_ID    SLURM_PROCID, else SLURM_NODEID
# Read them inside each task (srun ... bash -c 'source ...'): in the batch script itself
# SLURM_PROCID is 0.

# First host of a nodelist: the first top-level entry ("a[1-2],b" -> "a[1-2]"), each
# bracket replaced by the start of its first range ("gpu[003-006,010]" -> "gpu003").
first_host_of_nodelist() {
  local list=$1 entry="" depth=0 char i
  local bracket='^([^[]*)\[([^],-]+)[^]]*\](.*)$'
  for ((i = 0; i < ${#list}; i++)); do
    char=${list:i:1}
    case $char in
      '[') depth=$((depth + 1)) ;;
      ']') depth=$((depth - 1)) ;;
      ',') ((depth == 0)) && break ;;
    esac
    entry+=$char
  done
  while [[ $entry =~ $bracket ]]; do
    entry="${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
  done
  printf '%s\n' "$entry"
}

first_host() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
  else
    first_host_of_nodelist "$1"
  fi
}

slurm_env() {
  local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
  if [[ -z $nodelist ]]; then
    echo "slurm_env.sh: SLURM_JOB_NODELIST is not set (not inside a SLURM job?)" >&2
    return 1
  fi
  local port=${COORDINATOR_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 50000))}
  COORDINATOR="$(first_host "$nodelist"):$port"
  NUM_PROCESSES=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
  PROCESS_ID=${SLURM_PROCID:-${SLURM_NODEID:-0}}
  export COORDINATOR NUM_PROCESSES PROCESS_ID
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then  # executed, not sourced
  set -euo pipefail
  case "${1:-}" in
    --print) slurm_env && echo "COORDINATOR=$COORDINATOR NUM_PROCESSES=$NUM_PROCESSES PROCESS_ID=$PROCESS_ID" ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0" ;;
    *) echo "usage: source launch/slurm_env.sh | bash launch/slurm_env.sh --print | --help" >&2; exit 2 ;;
  esac
else
  slurm_env
fi
