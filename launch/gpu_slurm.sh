#!/usr/bin/env bash
#SBATCH --job-name=fireedit-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/slurm-%j.out
#
# Trains on several GPU nodes under SLURM: one process per node, each driving all of
# its GPUs, joined by jax.distributed (the first node of the job is the coordinator).
#
# Usage (from the repository root, on a filesystem all nodes share; logs/ must exist):
#   mkdir -p logs
#   sbatch [--nodes=4 --gpus-per-node=8 --time=48:00:00 ...] launch/gpu_slurm.sh \
#       --config configs/X.py --workdir DIR [--config.field=value ...]
#   The arguments go to `fireedit-jax train`. Each task runs launch/gpu_single.sh (same
#   XLA flags) with --config.distributed.{coordinator_address,num_processes,process_id}
#   from launch/slurm_env.sh, computed inside the task. COORDINATOR_PORT overrides the
#   port. Installs .venv once, before the tasks start, if it is missing.
#   Task output: logs/slurm-JOBID.out, each line prefixed with its task number.
#   DRY_RUN=1 (exported to the tasks) prints each task's command instead of training.
set -euo pipefail
case "${1:-}" in
  -h | --help) sed -n '/^# Trains/,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "gpu_slurm.sh: submit it with sbatch (see --help)" >&2
  exit 2
fi
# sbatch runs a copy of this script from its spool directory: work from the submit directory.
cd "$SLURM_SUBMIT_DIR"
if [[ ! -f launch/slurm_env.sh ]]; then
  echo "gpu_slurm.sh: submit from the repository root ($SLURM_SUBMIT_DIR is not)" >&2
  exit 2
fi
if [[ ! -x .venv/bin/fireedit-jax ]]; then
  bash scripts/install.sh
  jax_version=$(.venv/bin/python -c 'import jax; print(jax.__version__)')
  .venv/bin/python -m pip install -q "jax[${JAX_CUDA:-cuda12}]==$jax_version"
fi

# The one task per node gets all of the node's CPUs (input pipeline workers); srun would
# otherwise give it one. The single quotes are deliberate: each task reads its own PROCESS_ID.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" bash -c '
  source launch/slurm_env.sh
  exec bash launch/gpu_single.sh "$@" \
    --config.distributed.coordinator_address="$COORDINATOR" \
    --config.distributed.num_processes="$NUM_PROCESSES" \
    --config.distributed.process_id="$PROCESS_ID"
' gpu_slurm_task "$@"
