#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs them (extra arguments go to pytest:
# `bash scripts/test.sh -k unet -x`).
#   - .venv: scripts/install.sh where it is missing or lacks a module of the extras the tests use.
#   - Debian's chromium + chromium-driver (tests/test_serve_browser.py drives them): apt-get installs them where
#     they are missing and this runs as root with apt-get; elsewhere one line says what is missing and how to
#     install it, and the tests run anyway (the browser tests then fail with the same advice).
# install.sh itself installs no browser: the demo and launch/gpu_single.sh, which run it too, need none.
# FIREEDIT_TEST_DRY_RUN=1 prints the install and pytest commands instead of running them (tests/test_scripts.py);
# apt-get still runs.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
    if [[ "${FIREEDIT_TEST_DRY_RUN:-}" == 1 ]]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

# find_spec imports nothing (fast); -I keeps the checkout's own fireedit_jax/ off sys.path, so only an
# installed package counts
modules=(fireedit_jax torch torchvision diffusers transformers lpips selenium pytest chex gradio gcp_storage_emulator)
if ! [[ -x .venv/bin/python && -x .venv/bin/shellcheck ]] || ! .venv/bin/python -I -c "
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(name) is None for name in sys.argv[1:]))" "${modules[@]}" 2>/dev/null; then
    run bash scripts/install.sh
fi

browser_missing() {
    ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null
}
if browser_missing && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    packages=(chromium chromium-driver)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq "${packages[@]}"; } \
        || true  # a failed install ends in the one line below, not here
fi
if browser_missing; then
    missing=$(for tool in chromium chromedriver; do command -v "$tool" >/dev/null || printf '%s ' "$tool"; done)
    echo "scripts/test.sh: ${missing% } not found, so tests/test_serve_browser.py will fail; install Debian's" \
         "browser as root: apt-get update && apt-get install -y chromium chromium-driver" >&2
fi

run .venv/bin/python -m pytest tests --durations=15 -q "$@"
