#!/usr/bin/env bash
# Trains on one host with all its local GPUs (one process; JAX sees every GPU).
#
# Usage: launch/gpu_single.sh --config configs/X.py --workdir DIR [--config.field=value ...]
#   The arguments go unchanged to `fireedit-jax train` (see `fireedit-jax train --help`).
#   Installs the repository into .venv first if .venv is missing (scripts/install.sh,
#   then jax[$JAX_CUDA] at the installed jax version; JAX_CUDA [cuda12]).
#   PYTHON=/path/to/python or VENV=/path/to/venv: that interpreter (or $VENV/bin/python) runs
#   `-m fireedit_jax.cli train` with this checkout on PYTHONPATH, and nothing is installed (no
#   network needed: e.g. a machine's own Python with its jax, as benchmarks/gpu.sh runs it).
#   DRY_RUN=1 prints XLA_FLAGS and the command instead of running them.
#   launch/gpu_slurm.sh runs this script once per node.
#
# XLA_FLAGS set here (flags already in XLA_FLAGS come after them and win):
#   --xla_gpu_enable_latency_hiding_scheduler=true  lets XLA overlap collectives (FSDP
#       all-gathers, gradient reduce-scatters) with compute; the flag NVIDIA's JAX
#       containers set by default.
set -euo pipefail
case "${1:-}" in
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
if [[ -n ${VENV:-} ]]; then
  PYTHON=$VENV/bin/python
fi
if [[ -n ${PYTHON:-} ]]; then
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  command=("$PYTHON" -m fireedit_jax.cli train "$@")
else
  command=("$root/.venv/bin/fireedit-jax" train "$@")
fi

if [[ -n ${DRY_RUN:-} ]]; then
  echo "XLA_FLAGS=$XLA_FLAGS"
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
if [[ -n ${PYTHON:-} ]]; then
  command -v "$PYTHON" >/dev/null || { echo "gpu_single.sh: no interpreter $PYTHON" >&2; exit 2; }
elif [[ ! -x $root/.venv/bin/fireedit-jax ]]; then
  bash "$root/scripts/install.sh"
  # install.sh brings the CPU jaxlib; the CUDA plugin must match its version.
  jax_version=$("$root/.venv/bin/python" -c 'import jax; print(jax.__version__)')
  "$root/.venv/bin/python" -m pip install -q "jax[${JAX_CUDA:-cuda12}]==$jax_version"
fi
exec "${command[@]}"
