#!/usr/bin/env bash
# The prepared device check: one command that fits a short GPU lease (about 6-9 minutes on an
# H100/H200 with 16 cores) and leaves every log under $OUT (default benchmarks/results/gpu-check):
#   1. build repa_fast._C with its CUDA kernels for this card      -> build.log, info.txt
#   2. the kernel tests (Triton, native, attention; -m gpu ones too) -> tests.log, tests.xml
#   3. the alignment-op suites: Triton, native CUDA, reference,
#      torch.compile of the reference, official-style loop          -> bench.json, bench.txt
# Run on a machine whose python3 (or $PYTHON) has torch with CUDA, timm and
# pytest-benchmark (no install needed: the checkout is put on PYTHONPATH). Each step has its own
# time limit and a failed step does not stop the next; the exit status is the number of
# failed steps. Commit bench.json/bench.txt under benchmarks/results/ with the card's name.
#   PYTHON         the interpreter (default python3)
#   STEP_LIMIT_S   seconds per step (default 200)
#   GPU_CHECK_BENCH  benchmark files to run (default: the two alignment-op suites)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$out"
limit="${STEP_LIMIT_S:-200}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
step() {  # step NAME COMMAND...: run with the time limit, log the outcome
    local name=$1; shift
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== ${name}: exit ${rc} after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ "$py" -c "import platform, torch; print('python', platform.python_version(), 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name()
if torch.cuda.is_available() else 'NO CUDA DEVICE')"; nvcc --version | tail -n 1; } \
    2>&1 | tee "$out/env.txt"

arch=$("$py" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" \
       2>/dev/null || echo "9.0")
# the toolkit root: $CUDA_HOME, /usr/local/cuda, or where the real nvcc (not a wrapper) lives
cuda_home="${CUDA_HOME:-}"
if [ -z "$cuda_home" ]; then
    for candidate in /usr/local/cuda \
        "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
        if [ -f "$candidate/include/cuda_runtime.h" ]; then cuda_home=$candidate; break; fi
    done
fi
echo "CUDA_HOME=${cuda_home:-not found}" | tee -a "$out/env.txt"
step build env CUDA_HOME="$cuda_home" REPA_FAST_BUILD_EXT=1 REPA_FAST_BUILD_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
    "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1
"$py" -m repa_fast.info > "$out/info.txt" 2>&1

# the kernel test files whole: on a CUDA machine their CPU-interpreter cases run on the GPU too
step tests "$py" -m pytest tests/test_alignment_triton.py tests/test_alignment_native.py \
    tests/test_attention.py -q -p no:cacheprovider --junitxml="$out/tests.xml" \
    > "$out/tests.log" 2>&1

# shellcheck disable=SC2086
step bench "$py" -m pytest ${GPU_CHECK_BENCH:-benchmarks/test_bench_alignment.py \
    benchmarks/test_bench_native.py} --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/bench.json" > "$out/bench.log" 2>&1
[ -s "$out/bench.json" ] && "$py" benchmarks/summarize.py "$out/bench.json" > "$out/bench.txt"
cat "$out/steps.txt"
tail -n 3 "$out/tests.log" "$out/bench.log" 2>/dev/null
exit "$failed"
