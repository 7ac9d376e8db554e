#!/usr/bin/env bash
# Every GPU row of BENCHMARKS.md in one command, on one GPU, with no network (about 8 minutes on an H100):
#   edit      the 512 x 512, 100-step IP2P edit at SD1.5's sizes: ours (bfloat16) against diffusers
#             (float16) in one process, in turn (benchmarks/edit_vs_diffusers.py --sizes sd15)
#   train     the SD1.5 IP2P train step's model FLOP utilisation at 256 px in bfloat16, from a run
#             started as launch/gpu_single.sh starts one (benchmarks/train_mfu.py)
#   grounded  the grounded edit's overhead over the plain edit, and DiffEdit's (benchmarks/grounded_edit.py
#             --random configs/shapes_grounded.py: random weights, the same programs)
#
# Usage: benchmarks/gpu.sh [--small] [--python PATH] [--out DIR] [--only edit|train|grounded]...
#        benchmarks/gpu.sh --prepare-wheels      (here, with the package index: fills benchmarks/wheels)
#   --python PATH  the interpreter (default: $PYTHON, else .venv/bin/python). The modules in WHEELS
#                  that it lacks (a GPU image's Python has jax, flax, optax, orbax, torch and
#                  transformers, but no diffusers, grain or ml_collections) are installed from
#                  benchmarks/wheels with pip --no-index (no network) into a folder ($GPU_SITE, default
#                  one per interpreter under $TMPDIR or /tmp) that goes on PYTHONPATH, with the checkout.
#   --small        every piece at the test model's sizes on the CPU, side by side, in a minute or two
#                  (tests/test_gpu_script.py runs it so that this script cannot rot)
#   --out DIR      each piece's whole output as DIR/<piece>.log (default: $OUT if set, else a temporary folder)
#   --only PIECE   run only these pieces (repeatable)
# On the GPU the pieces run one after another, each within a time limit (EDIT_TIMEOUT 250, TRAIN_TIMEOUT
# 200, GROUNDED_TIMEOUT 90 seconds: 9 minutes at most, inside a 10-minute call); with --small side by side,
# 1800 s each (a shared CPU's load is no GPU's budget). A piece that fails or runs out prints its log's
# tail and the others still run; the exit code is 1 if any failed.
# The wheels are for CPython 3.12 on x86-64 Linux (the GPU image's); --prepare-wheels pins each to the
# version installed in .venv, where there is one, so the GPU runs what the tests here run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels=$root/benchmarks/wheels
# import name:distribution, for every module the three pieces import that the GPU image may lack
WHEELS=(diffusers:diffusers importlib_metadata:importlib-metadata zipp:zipp grain:grain array_record:array-record
        cloudpickle:cloudpickle portpicker:portpicker psutil:psutil ml_collections:ml-collections yaml:PyYAML
        tensorboardX:tensorboardX chex:chex toolz:toolz PIL:pillow)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p}' "$0"; }
python=${PYTHON:-$root/.venv/bin/python} small="" out=${OUT:-} only=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --small) small=1 ;;
    --python) python=$2; shift ;;
    --out) out=$2; shift ;;
    --only) only+=("$2"); shift ;;
    --prepare-wheels)
      dists=()
      for pair in "${WHEELS[@]}"; do dists+=("${pair#*:}"); done
      # pinned to .venv's versions where it has the distribution
      mapfile -t specs < <("$root/.venv/bin/python" - "${dists[@]}" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
      )
      mkdir -p "$wheels"
      "$root/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$wheels" "${specs[@]}"
      ls "$wheels"/*.whl
      du -sh "$wheels"
      exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
((${#only[@]})) || only=(edit train grounded)
for name in "${only[@]}"; do
  [[ $name == @(edit|train|grounded) ]] || { echo "gpu.sh: unknown piece $name (edit, train, grounded)" >&2; exit 2; }
done
out=${out:-$(mktemp -d)}
mkdir -p "$out"
command -v "$python" >/dev/null || { echo "gpu.sh: no interpreter $python" >&2; exit 2; }

# The modules the interpreter lacks, from the wheel folder, never the network; one site folder per interpreter.
site=${GPU_SITE:-${TMPDIR:-/tmp}/fireedit_jax_gpu_site_$(printf %s "$python" | md5sum | cut -c1-8)}
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
mapfile -t missing < <("$python" - "${WHEELS[@]}" <<'EOF'
import importlib.util
import sys
for pair in sys.argv[1:]:
    module, dist = pair.split(":")
    if importlib.util.find_spec(module) is None:
        print(dist)
EOF
)
if ((${#missing[@]})); then
  echo "installing from $wheels into $site (no network): ${missing[*]}"
  if [[ ! -d $wheels ]]; then
    echo "gpu.sh: $wheels is missing: run benchmarks/gpu.sh --prepare-wheels where there is an index" >&2
    exit 2
  fi
  if "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --find-links "$wheels" --no-deps --target "$site" "${missing[@]}"
  else  # no pip in that Python: a wheel is a zip of the files that go into site-packages
    "$python" - "$wheels" "$site" "${missing[@]}" <<'EOF'
import glob, re, sys, zipfile
wheels, site, dists = sys.argv[1], sys.argv[2], sys.argv[3:]
for dist in dists:
    stem = re.sub(r"[-_.]+", "_", dist).lower()  # a wheel's file name: the normalised distribution name
    found = [path for path in glob.glob(f"{wheels}/*.whl") if path.rsplit("/", 1)[1].lower().startswith(stem + "-")]
    if not found:
        sys.exit(f"gpu.sh: no wheel for {dist} in {wheels}")
    zipfile.ZipFile(sorted(found)[-1]).extractall(site)
EOF
  fi
fi

if [[ -n $small ]]; then
  export JAX_PLATFORMS=cpu
  edit_args=(--sizes tiny --size 32 --steps 2 --repeats 1 --device cpu)
  train_args=(--small)
  grounded_args=(--batch 2 --steps 2 --repeats 1)
  # a shared CPU's load, not a GPU's budget
  : "${EDIT_TIMEOUT:=1800}" "${TRAIN_TIMEOUT:=1800}" "${GROUNDED_TIMEOUT:=1800}"
else
  edit_args=(--sizes sd15 --size 512 --steps 100 --repeats 3)
  train_args=()
  grounded_args=(--batch 16 --steps 20 --repeats 5)
fi
"$python" - "${small:+small}" <<'EOF' || exit 2
import platform, sys
import jax, torch
gpu = f" on {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
print(f"python {platform.python_version()} ({sys.executable}), jax {jax.__version__} on {jax.devices()[0].device_kind} "
      f"({jax.default_backend()}), torch {torch.__version__}{gpu}")
if sys.argv[1] != "small" and jax.default_backend() == "cpu":
    sys.exit("gpu.sh: jax finds no GPU (is its CUDA plugin installed?); --small runs on the CPU")
EOF

piece() {  # piece NAME LIMIT_S FIRST_RESULT_LINE_REGEX COMMAND...: runs it into $out/NAME.log, prints its results
  local name=$1 limit=$2 first=$3 start=$SECONDS status=0
  shift 3
  echo "== $name: $*"
  (cd "$root/benchmarks" && timeout "$limit" "$@") >"$out/$name.log" 2>&1 || status=$?
  if ((status == 0)); then
    sed -n "/$first/,\$p" "$out/$name.log"
    echo "   ($name: $((SECONDS - start)) s)"
  else
    echo "   $name FAILED (exit $status, after $((SECONDS - start)) s of at most $limit); the end of $out/$name.log:"
    tail -n 25 "$out/$name.log" | sed 's/^/   | /'
  fi
  return "$status"
}
run() {
  case $1 in
    # JAX takes 60% of the GPU's memory, leaving torch's side of the edit the rest
    edit) XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6} \
            piece edit "${EDIT_TIMEOUT:-250}" "^IP2P edit," "$python" edit_vs_diffusers.py "${edit_args[@]}" ;;
    train) piece train "${TRAIN_TIMEOUT:-200}" "^IP2P train step" "$python" train_mfu.py "${train_args[@]}" ;;
    grounded) piece grounded "${GROUNDED_TIMEOUT:-90}" "(random weights)" \
                "$python" grounded_edit.py --random "$root/configs/shapes_grounded.py" "${grounded_args[@]}" ;;
  esac
}
failed=()
if [[ -n $small ]]; then
  # On the CPU the pieces run side by side (XLA:CPU compiles each program on one core), each
  # printing when all are done; on the GPU one after another, so that none shares the device.
  scratch=$(mktemp -d)
  pids=()
  for name in "${only[@]}"; do
    run "$name" >"$scratch/$name" &
    pids+=($!)
  done
  for i in "${!only[@]}"; do
    wait "${pids[$i]}" || failed+=("${only[$i]}")
    cat "$scratch/${only[$i]}"
  done
  rm -r "$scratch"
else
  for name in "${only[@]}"; do
    run "$name" || failed+=("$name")
  done
fi
echo "logs in $out; total $SECONDS s"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
