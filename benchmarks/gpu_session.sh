#!/usr/bin/env bash
# A GPU session, one mode per call (each fits one 10-minute device call). Everything is logged under $OUT (or
# ./gpu_out), and the result tables go to $OUT/results (VPGEA_BENCH_RESULTS) so they come back with the call.
#
#   bash benchmarks/gpu_session.sh tests          # the CUDA tests: kernels vs float64, CUDA C++ vs Triton, Liger
#                                                 # parity, packed attention backends, AOT lowering
#   bash benchmarks/gpu_session.sh token          # token_logprobs: 7 providers x 2 heads x 2 N, fwd and fwd+bwd
#   bash benchmarks/gpu_session.sh losses         # fused VPG-EA loss, FusedLinearGRPOLoss vs Liger, loss reduction
#   bash benchmarks/gpu_session.sh packed         # packed vs padded training step on a 1.5B-shaped model
#   bash benchmarks/gpu_session.sh compile        # token_logprobs inside torch.compile (inductor) fwd+bwd
#
# Peer libraries (liger-kernel, cut-cross-entropy) are installed from ./.whl when that folder exists (carry it).
set -u
what=${1:-tests}
out=${OUT:-./gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export VPGEA_BENCH_RESULTS=$out/results
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  which nvcc && nvcc --version | tail -2
} 2>&1 | tee "$out/env.txt"

bench() {  # one benchmark file, its tables under $out/results (written after every row); exits with pytest's code
  timeout 560 python3 -m pytest "benchmarks/$1" -s -q -rs -p no:cacheprovider > "$out/$2.log" 2>&1
  local rc=$?
  grep -E '^\||passed|failed|error|Error' "$out/$2.log" | tail -60
  if [ $rc -eq 124 ]; then echo "bench $1: TIMED OUT after 560 s (tables hold the rows finished so far)"; fi
  return $rc
}
case $what in
  tests)
    # The files with CUDA tests (the rest is CPU-only and needs math-verify, which the device lacks).
    VPGEA_TEST_NVCC=1 timeout 560 python3 -m pytest -q -rs -p no:cacheprovider tests/test_token_logprobs.py \
      tests/test_losses.py tests/test_grpo.py tests/test_policy.py tests/test_packing.py tests/test_kernels_compile.py \
      > "$out/tests.log" 2>&1; rc=$?; tail -40 "$out/tests.log"; exit $rc ;;
  token) bench test_bench_token_logprobs.py token; exit $? ;;
  losses) bench test_bench_losses.py losses; exit $? ;;
  packed) bench test_bench_packed.py packed; exit $? ;;
  compile)
    set -o pipefail
    timeout 560 python3 - <<'EOF' 2>&1 | tee "$out/compile.log"
import torch, vpgea
h = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(151936, 1536, device="cuda", dtype=torch.bfloat16) * 0.03).requires_grad_()
y = torch.randint(0, 151936, (4096,), device="cuda")
f = torch.compile(lambda h, w: vpgea.token_logprobs(h, w, y, impl="triton").sum())
f(h, w).backward()
ref = torch.log_softmax((h.detach() @ w.detach().t()).float(), -1).gather(-1, y[:, None]).sum()
print("inductor ok: loss", float(f(h, w)), "eager", float(ref), "grad dtypes", h.grad.dtype, w.grad.dtype)
EOF
    ;;
  *) echo "unknown mode $what (tests | token | losses | packed | compile)"; exit 2 ;;
esac
