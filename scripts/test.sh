#!/usr/bin/env bash
# The test suite as CI runs it (.ci/run): a fresh venv, lint, pytest; arguments go to pytest. Without arguments,
# the kernel tests then run again under two older triton releases (scripts/test_kernels_on_triton.sh).
# The browser tests drive Debian's Chromium (/usr/bin/chromium). As root on Debian this installs it; elsewhere
# install it yourself, or the browser tests skip (they fail instead when the CI variable is set).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
python3 -m venv .venv
.venv/bin/pip install torch==2.13.0
.venv/bin/pip install -e '.[test]'
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
if [ $# = 0 ]; then  # the whole suite: the kernels also under the triton the Docker image and torch 2.11 bring
    bash scripts/test_kernels_on_triton.sh 3.3.1 3.6.0
fi
