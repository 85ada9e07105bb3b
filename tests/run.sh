#!/usr/bin/env bash
# Set up a fresh machine for the test suite and run it: `bash tests/run.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# A CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt -r requirements-test.txt
# Triton for the fused sampling kernel's tests (run by its CPU interpreter); a GPU build of torch brings its own.
python -c "import triton" 2>/dev/null || python -m pip install -q triton==3.5.0
# youtokentome cannot be built in one pip command (its setup needs Cython first); optional for the app itself.
python -c "import youtokentome" 2>/dev/null || { python -m pip install -q Cython && python -m pip install -q --no-build-isolation youtokentome; } || echo "youtokentome not installed: the tests that need it will be skipped (which fails the run under CI=true)"
# Debian's Chromium for the browser tests (never `playwright install`).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the browser tests will be skipped (which fails the run under CI=true)"
fi
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
python -m pytest -q tests "$@"
