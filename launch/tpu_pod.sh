#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates the TPU VM unless it exists, copies this
# checkout (tracked files, uncommitted edits included) onto every worker, installs it
# there once, and runs the same `fireedit-jax train` on all hosts (jax.distributed finds
# the other hosts by itself on TPU).
#
# Usage: [NAME=... ZONE=... ...] launch/tpu_pod.sh --config configs/X.py --workdir gs://BUCKET/DIR [--config.field=value ...]
#   The arguments go unchanged to `fireedit-jax train`; give a gs:// workdir (or one on
#   a disk all workers share): every host writes its part of the checkpoints.
#
# Environment [default]:
#   NAME [fireedit-tpu]  ZONE [us-west4-a]  ACCELERATOR_TYPE [v5litepod-16]
#   RUNTIME_VERSION [v2-alpha-tpuv5-lite]  PROJECT [gcloud's default project]
#   SPOT=1           create a Spot TPU VM
#   REPO_URL, REF    git clone REPO_URL at REF [main] on the workers instead of copying
#   REMOTE_DIR       checkout path on the workers [fireedit_jax, under the home directory]
#   REINSTALL=1      run the installer again although .venv exists
#   DETACH=1         start training in the background (nohup) and return; default: stay
#                    attached and stream every worker's output here
#   DRY_RUN=1        print the gcloud commands (create included) instead of running them
# Logs: REMOTE_DIR/logs/worker-HOSTNAME.log on each worker. Delete the VM when done:
#   gcloud compute tpus tpu-vm delete NAME --zone ZONE
set -euo pipefail
case "${1:-}" in
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac

NAME=${NAME:-fireedit-tpu}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
remote_dir=$(printf %q "${REMOTE_DIR:-fireedit_jax}")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})

run() {
  if [[ -n ${DRY_RUN:-} ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {  # one bash command line, run on every worker at once
  run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$1"
}

if [[ -n ${DRY_RUN:-} ]] || ! "${tpu[@]}" describe "$NAME" "${where[@]}" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
    --version "$RUNTIME_VERSION" ${SPOT:+--spot}
fi

if [[ -n ${REPO_URL:-} ]]; then
  on_all_workers "set -e; [ -d $remote_dir/.git ] || git clone -q $(printf %q "$REPO_URL") $remote_dir;
    cd $remote_dir && git fetch -q origin $(printf %q "${REF:-main}") && git checkout -q FETCH_HEAD"
else
  archive=$(mktemp -t fireedit_jax.XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT
  git -C "$root" ls-files -z | tar -C "$root" --null -T - -czf "$archive"
  run "${tpu[@]}" scp "$archive" "$NAME:fireedit_jax.tar.gz" "${where[@]}" --worker=all
  on_all_workers "mkdir -p $remote_dir && tar -xzf fireedit_jax.tar.gz -C $remote_dir"
fi

# TPU VM images ship Python 3.10; fireedit_jax needs 3.11, which install.sh finds as
# `python3` first on PATH. jax[tpu] adds libtpu at the jax version install.sh chose.
on_all_workers "set -e; cd $remote_dir
  if [ -x .venv/bin/fireedit-jax ] && [ -z '${REINSTALL:-}' ]; then exit 0; fi
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv
    mkdir -p ~/.python311 && ln -sf /usr/bin/python3.11 ~/.python311/python3
    export PATH=~/.python311:\$PATH
  fi
  bash scripts/install.sh
  .venv/bin/python -m pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""

train=".venv/bin/fireedit-jax train$(printf ' %q' "$@")"
log="logs/worker-\$(hostname).log"
if [[ -n ${DETACH:-} ]]; then
  on_all_workers "cd $remote_dir && mkdir -p logs && nohup $train > $log 2>&1 < /dev/null &"
else
  on_all_workers "set -o pipefail; cd $remote_dir && mkdir -p logs && $train 2>&1 | tee $log"
fi
