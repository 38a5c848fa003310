#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one bounded run (under 10 minutes): the `-m gpu` tests, the kernel
# benchmark, the offload benchmark and the kernel tests on the real kernels. Needs torch, triton, transformers,
# accelerate, safetensors and pytest; not the server's packages. Logs and JSON go to $OUT (default
# benchmarks/results), each JSON as soon as its step ends; each step has its own time limit, and a step that fails
# or runs out of time does not stop the next one. Exits non-zero if any step failed. Names given run those steps
# only, in the order given; `sweep` (every config of a wide space per kernel, about 4 minutes) and
# `decode_attention` (the decode attention kernel against the engine's matmuls, under a minute) run only by name.
# The default steps take about 8 minutes on an H200.
#
#     bash scripts/gpu_checks.sh            # or: OUT=/some/dir PYTHON=.venv/bin/python bash scripts/gpu_checks.sh
#     bash scripts/gpu_checks.sh sweep decode_attention
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out" benchmarks/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" = 0 ] || status=1
    [ "$out" -ef benchmarks/results ] || cp benchmarks/results/*.json "$out/" 2>/dev/null || true
}

run_step() {
    case $1 in
        gpu_tests) step gpu_tests 150 "$python" -m pytest -m gpu -q -rs -p no:cacheprovider ;;
        kernels) step kernels 120 "$python" -m benchmarks.bench_kernels ;;
        kernels_bf16) step kernels_bf16 120 "$python" -m benchmarks.bench_kernels --dtype bf16 ;;  # Ampere+ default
        decode_attention) step decode_attention 90 "$python" -m benchmarks.decode_attention ;;  # bf16
        offload) step offload 240 "$python" -m benchmarks.offload --steps 8 --profile ;;
        # the kernel tests at odd shapes, which a GPU runs on the real kernels rather than in Triton's interpreter
        kernel_tests) step kernel_tests 100 "$python" -m pytest tests/kernels -m "not gpu" -q -rs -p no:cacheprovider ;;
        sweep) step sweep 300 "$python" -m benchmarks.sweep_kernels ;;  # bf16; --dtype fp16 by hand
        *) echo "unknown step: $1 (gpu_tests, kernels, kernels_bf16, decode_attention, offload, kernel_tests, sweep)"; status=1 ;;
    esac
}

nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv \
    | tee "$out/gpu.txt"
steps=("$@")
[ $# -gt 0 ] || steps=(gpu_tests kernels kernels_bf16 offload kernel_tests)
for name in "${steps[@]}"; do run_step "$name"; done
exit $status
