#!/usr/bin/env bash
# The kernel tests again under other triton releases than the venv's: each given version is installed into a
# folder of its own, put in front of the venv's on PYTHONPATH, with numpy < 2.3 beside it (the interpreters
# of triton < 3.7 call int() on one-element arrays, which numpy 2.3 refuses). scripts/test.sh runs it for the
# triton of the Docker image's torch (2.7.1: triton 3.3.1) and of torch 2.11 (3.6.0).
#
#     bash scripts/test_kernels_on_triton.sh 3.3.1 3.6.0      # after scripts/test.sh made .venv
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 TRITON_VERSION..." >&2; exit 2; }
cache="${VRAMLITE_TRITON_DIR:-.venv/other-triton}"
numpy="$cache/numpy-2.2"
[ -d "$numpy" ] || .venv/bin/pip install -q --no-deps --target "$numpy" "numpy>=2,<2.3"
for version in "$@"; do
    dir="$cache/triton-$version"
    [ -d "$dir" ] || .venv/bin/pip install -q --no-deps --target "$dir" "triton==$version"
    echo "== kernel tests under triton $version"
    export PYTHONPATH="$PWD/$dir:$PWD/$numpy"
    .venv/bin/python -c "import sys, triton; sys.exit(triton.__version__ != '$version')" \
        || { echo "triton $version was not the one imported" >&2; exit 1; }
    # no cache: these runs must not change which tests a later plain pytest run picks first
    .venv/bin/python -m pytest tests/kernels -q -p no:cacheprovider
done
