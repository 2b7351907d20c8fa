#!/usr/bin/env bash
# One GPU session in one command: environment, the CUDA tests, then the benchmarks. Everything is logged; the
# result tables and logs are tarred into $OUT (or ./gpu_out) so they come back in one file.
#
#   bash benchmarks/gpu_session.sh [tests|bench|all] [pytest -k expression for the benchmarks]
#
# Peer libraries (liger-kernel, cut-cross-entropy) are installed from ./.whl when that folder exists.
set -u
what=${1:-all}
kexpr=${2:-}
out=${OUT:-./gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export VPGEA_BENCH_RESULTS=$PWD/gpu_results
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  which nvcc && nvcc --version | tail -2
} 2>&1 | tee "$out/env.txt"

if [[ $what == tests || $what == all ]]; then
  VPGEA_TEST_NVCC=1 timeout 200 python3 -m pytest tests -q -rs --timeout 120 -p no:cacheprovider 2>&1 \
    | tee "$out/tests.log" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
  args=(benchmarks -s -q -rs -p no:cacheprovider --timeout 300)
  [[ -n $kexpr ]] && args+=(-k "$kexpr")
  timeout 370 python3 -m pytest "${args[@]}" 2>&1 | tee "$out/bench.log" | grep -E '^\||passed|failed|error|Error' | tail -60
fi
tar -cf "$out/results.tar" gpu_results 2>/dev/null || true
