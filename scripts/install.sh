#!/usr/bin/env bash
# Creates .venv and installs fireedit_jax with its test, convert and ui (web page) extras. Not the `tpu` extra
# (libtpu, for `plan --topology`): with it every JAX start probes for TPUs and holds libtpu's lockfile.
# torch is pinned and installed first: torchvision (RoIAlign reference) and lpips need this pair.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,convert,ui]"
