#!/usr/bin/env bash
# The GPU session: everything the project checks on a CUDA machine, in one command that fits one device call.
#
#   bash benchmarks/gpu_session.sh all       # all of the below in order of value, each with its own time budget
#                                            # (ALL_BUDGET_S, default 470 s in all), so one ~8-minute call suffices;
#                                            # VPGEA_GPU_SECTIONS="token:150 losses:75" picks the sections after the
#                                            # tests, VPGEA_GPU_TEST_FILES the test files
#   bash benchmarks/gpu_session.sh tests     # the CUDA tests: kernels vs float64 with gradients, fused losses, CUDA C++
#                                            # vs Triton, packed attention backends, AOT lowering, the trainer's bf16
#                                            # autocast steps and exact resume, the HF engine
#   bash benchmarks/gpu_session.sh token     # token_logprobs vs eager, compile, F.linear_cross_entropy, Liger, CCE, TRL
#   bash benchmarks/gpu_session.sh losses    # fused VPG-EA loss, FusedLinearGRPOLoss vs Liger, loss reduction
#   bash benchmarks/gpu_session.sh packed    # packed vs padded training step on a 1.5B-shaped model
#   bash benchmarks/gpu_session.sh step      # one VPG-EA step by stage (generate, score, train), both loss routes
#   bash benchmarks/gpu_session.sh compile   # token_logprobs inside torch.compile (inductor) fwd+bwd
#
# Outputs go under $OUT (or ./gpu_out): env.txt, summary.txt, tests.log and gpu.tar (every log and the result tables,
# refreshed after each section, so a call cut short still returns what finished). The device call returns at most 8
# files, hence the tarball. Peer wheels (liger-kernel, cut-cross-entropy, trl and what it imports, math-verify) are
# installed from ./.whl when that folder exists (carry it).
#
# Dry run on a CPU machine: VPGEA_GPU_DRY_RUN=1 runs the same sections with tiny budgets; the CUDA cases skip.
set -u
what=${1:-all}
out=${OUT:-./gpu_out}
work=${VPGEA_GPU_WORK:-/tmp/vpgea_gpu}
mkdir -p "$out" "$work/results"
export PYTHONUNBUFFERED=1
if [ -z "${VPGEA_GPU_DRY_RUN:-}" ]; then unset TRITON_INTERPRET; fi
if ls .whl/*.whl >/dev/null 2>&1; then  # all at once; if one does not fit this Python, each on its own
  pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
  pipi .whl/*.whl 2>/dev/null || for w in .whl/*.whl; do pipi "$w" || echo "wheel not installed: $w"; done
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export VPGEA_BENCH_RESULTS=$work/results
t_start=$(date +%s)
budget_all=${ALL_BUDGET_S:-480}

pack() {  # refresh $out/gpu.tar with every log and table so far
  tar -C "$work" -cf "$out/gpu.tar.tmp" . 2>/dev/null && mv "$out/gpu.tar.tmp" "$out/gpu.tar"
}
note() { echo "$*" | tee -a "$out/summary.txt"; }

env_info() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    python3 -m pip list 2>/dev/null | grep -iE '^(liger|cut|trl|datasets|math|flash|numpy|pytest|xdist|pytest-xdist) ' || true
    which nvcc && nvcc --version | tail -2
  } > "$out/env.txt" 2>&1
  cp "$out/env.txt" "$work/env.txt"
  cat "$out/env.txt"
}

# run_section NAME BUDGET_S CMD...: runs CMD with a deadline (VPGEA_BENCH_DEADLINE) a little before the hard timeout,
# logs to $work/NAME.log, records the exit code and time in summary.txt.
run_section() {
  local name=$1 budget=$2; shift 2
  local t0 rc
  t0=$(date +%s)
  export VPGEA_BENCH_DEADLINE=$(( t0 + budget - 15 ))
  timeout --kill-after=10 "$budget" bash -c "$*" > "$work/$name.log" 2>&1
  rc=$?
  unset VPGEA_BENCH_DEADLINE
  note "== $name: rc=$rc ($(( $(date +%s) - t0 )) s of $budget s budget)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
  grep -E '^\||passed|failed|error|Error|skipped' "$work/$name.log" | tail -40
  pack
  return $rc
}

bench() {  # one benchmark file under pytest, its tables in $work/results (written after every row)
  python3 -m pytest "benchmarks/$1" -s -q -rs -p no:cacheprovider
}

cuda_tests() {
  # The test files with CUDA cases or CUDA-dependent paths (device "auto" puts the trainer tests on the GPU).
  local xdist=()
  if python3 -c "import xdist" 2>/dev/null; then xdist=(-n "${VPGEA_TEST_WORKERS:-8}" --dist loadfile); fi
  local files=${VPGEA_GPU_TEST_FILES:-tests/test_token_logprobs.py tests/test_losses.py tests/test_grpo.py \
    tests/test_policy.py tests/test_packing.py tests/test_kernels_compile.py tests/test_train.py tests/test_engine.py \
    tests/test_step.py tests/test_integrations_trl.py tests/test_integrations_verl.py tests/test_integrations_openrlhf.py}
  # shellcheck disable=SC2086
  VPGEA_TEST_NVCC=1 python3 -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" $files
}

compile_check() {
  python3 - <<'EOF'
import torch, vpgea
if not torch.cuda.is_available():
    print("compile check: skipped (no CUDA)"); raise SystemExit(0)
h = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(151936, 1536, device="cuda", dtype=torch.bfloat16) * 0.03).requires_grad_()
y = torch.randint(0, 151936, (4096,), device="cuda")
f = torch.compile(lambda h, w: vpgea.token_logprobs(h, w, y, impl="triton").sum())
f(h, w).backward()
got = float(f(h, w))
ref = float(torch.log_softmax((h.detach() @ w.detach().t()).float(), -1).gather(-1, y[:, None]).sum())
print("inductor: loss", got, "eager", ref, "rel diff", abs(got - ref) / abs(ref), "grad dtypes", h.grad.dtype, w.grad.dtype)
assert abs(got - ref) <= 1e-3 * abs(ref), "compiled loss differs from eager"
EOF
}

export -f bench cuda_tests compile_check

left() { echo $(( budget_all - ($(date +%s) - t_start) )); }
cap() { local want=$1 l; l=$(left); if [ "$l" -lt "$want" ]; then echo "$l"; else echo "$want"; fi; }

: > "$out/summary.txt"
if [ -n "${VPGEA_GPU_DRY_RUN:-}" ]; then note "DRY RUN (no GPU): CUDA cases skip"; fi
env_info
if command -v nvcc >/dev/null 2>&1 && [ -z "${VPGEA_GPU_DRY_RUN:-}" ]; then  # build the CUDA C++ twin meanwhile
  (python3 -c "from vpgea._ext import load_loss_ext, load_error; load_loss_ext(); print('cuda ext:', load_error() or 'built')" \
    > "$work/ext_build.log" 2>&1 &)
fi

status=0
case $what in
  all)
    run_section tests "$(cap ${TESTS_S:-130})" cuda_tests || status=1
    cp "$work/tests.log" "$out/tests.log" 2>/dev/null
    for s in ${VPGEA_GPU_SECTIONS:-token:120 losses:60 step:80 packed:50 compile:20}; do
      name=${s%%:*}; want=${s##*:}
      b=$(cap "$want")
      if [ "$b" -lt 20 ]; then note "== $name: not run (session budget spent)"; continue; fi
      case $name in
        token) run_section token "$b" bench test_bench_token_logprobs.py || status=1 ;;
        losses) run_section losses "$b" bench test_bench_losses.py || status=1 ;;
        packed) run_section packed "$b" bench test_bench_packed.py || status=1 ;;
        step) run_section step "$b" bench test_bench_step.py || status=1 ;;
        compile) run_section compile "$b" compile_check || status=1 ;;
      esac
    done ;;
  tests) run_section tests 560 cuda_tests || status=1; cp "$work/tests.log" "$out/tests.log" ;;
  token) run_section token 560 bench test_bench_token_logprobs.py || status=1 ;;
  losses) run_section losses 560 bench test_bench_losses.py || status=1 ;;
  packed) run_section packed 560 bench test_bench_packed.py || status=1 ;;
  step) run_section step 560 bench test_bench_step.py || status=1 ;;
  compile) run_section compile 300 compile_check || status=1 ;;
  *) echo "unknown mode $what (all | tests | token | losses | packed | step | compile)"; exit 2 ;;
esac
cp "$work/ext_build.log" "$work/results/" 2>/dev/null
pack
note "== total $(( $(date +%s) - t_start )) s"
for f in "$work"/results/*.md; do [ -f "$f" ] && { echo; cat "$f"; }; done | tail -c 9000
exit $status
