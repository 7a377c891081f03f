#!/usr/bin/env bash
# The one command a GPU session runs (an H100/H200 lease of 15 minutes, machine start
# included): at most 10 minutes, every step time-boxed, 8 result files under $OUT (default
# benchmarks/results/gpu-check). In this order:
#   env       versions, nvidia-smi, python -m repa_fast.info            -> env.txt
#   train     benchmarks/test_bench_train.py, SiT-XL/2 + DINOv2-B, 256 px, bf16:
#             repa_fast's step vs the official-style step (img/s, MFU, peak memory)
#   align     benchmarks/test_bench_alignment.py (test_alignment_op), SiT-XL/2 width, fwd + bwd:
#             fused (recompute on) and fused_saved (off) vs torch.compile of the
#             reference, the eager reference and the official per-sample loop
#             (time, TFLOP/s, peak extra memory)
#   generate  benchmarks/test_bench_generate.py, SDE 250 steps with CFG (guidance
#             interval), SiT-XL/2 batch 64: repa_fast vs the official-style sampler (img/s)
#             -> the three suites merged into bench.json, ratios in bench.txt, logs in bench.log
#   tests     the Triton/attention tests on CUDA tensors (tests/test_alignment.py less its
#             native and reference cases)                  -> tests.log, tests.xml
#   build     (last, optional: runs only with >= 60 s of budget left) the native extension
#             with its CUDA kernels for this card, then its tests (test_alignment.py -k native)
#             -> build.log
# Every step's outcome, time and log tail go to steps.txt, with the budget line first.
# A step past its limit gets SIGINT (pytest then still writes its JSON and XML: the results
# so far are kept), SIGKILL GRACE s later. Limits in seconds; override one with
# GPU_CHECK_LIMIT_<STEP>=N (e.g. GPU_CHECK_LIMIT_TRAIN=200); the whole run stops at
# GPU_CHECK_TOTAL_S (default 580, so a 600 s device call still returns the files).
# The exit status is the number of failed steps plus missing result files (0: all good).
#
#   --dry-run   the same steps on the CPU with the suites' tiny CPU shapes, a subset of the
#               tests (Triton's interpreter) and no CUDA build; checks that every result file
#               was written (tests/test_gpu_check.py runs it, so this script cannot rot)
#   PYTHON      the interpreter (default python3); the checkout is put on PYTHONPATH, nothing
#               is installed. The GPU machine has torch, Triton, timm, pytest-benchmark; the
#               suites and tests used here need nothing else (optional packages skip).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
case "${1:-}" in
    --dry-run) dry=1 ;;
    "") ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

out="${OUT:-benchmarks/results/gpu-check}"
py="${PYTHON:-python3}"
FILES="env.txt steps.txt bench.json bench.txt bench.log tests.log tests.xml build.log"
mkdir -p "$out"
for f in $FILES; do rm -f "$out/$f"; done  # a stale file must not pass the final check
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the kernels' autotuning (done in the warm-up, before timing) is kept for the later steps
export REPA_FAST_TUNE_CACHE="${REPA_FAST_TUNE_CACHE:-$work/tune-cache}"
pytest_args=(-q -p no:cacheprovider -rfEs)

# seconds per step; "build" gets what is left of the total (skipped under 60 s)
declare -A limit=([env]=30 [train]=160 [align]=90 [generate]=130 [tests]=120)
total=${GPU_CHECK_TOTAL_S:-580}
grace=${GPU_CHECK_GRACE_S:-10}
if [ "$dry" = 1 ]; then
    # CPU: no GPU even where one is present; Triton on its interpreter (as tests/conftest.py);
    # the CPU is slower at the tiny shapes than the GPU at the real ones: twice the time
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    for s in "${!limit[@]}"; do limit[$s]=$((2 * limit[$s])); done
    total=${GPU_CHECK_TOTAL_S:-1200}
    train_k=() align_k=(-k "tiny-fwd_bwd")
    tests_k=(-k "not native and not [reference and (float32_loss_and_every_gradient and \
triton-equal-5x5-no-target-grad or test_bad_input or float16_db3 or triton_backend_choice or \
triton_refuses or sdpa)")
    native_k=(-k "native and (bad_input or float32)")
else
    unset TRITON_INTERPRET
    train_k=(-k "XL") align_k=(-k "SiT-XL/2-fwd_bwd")
    # test_alignment.py's cases of the reference backend ("[reference..." ids) and of the native
    # one (run by the build step, once the extension is built) are not this step's
    tests_k=(-k "not native and not [reference") native_k=(-k native)
fi
for s in "${!limit[@]}"; do
    var="GPU_CHECK_LIMIT_${s^^}"
    [ -n "${!var:-}" ] && limit[$s]=${!var}
done
t_start=$SECONDS
failed=0
{
    fixed=$((limit[env] + limit[train] + limit[align] + limit[generate] + limit[tests]))
    echo "budget: env ${limit[env]} + train ${limit[train]} + align ${limit[align]} +" \
         "generate ${limit[generate]} + tests ${limit[tests]} s (+${grace} s grace each) =" \
         "$((fixed + 5 * grace)) s of ${total} s; build gets the rest (>= 60 s or skipped)" \
         "$([ "$dry" = 1 ] && echo '[dry-run: CPU, tiny shapes]')"
} | tee "$out/steps.txt"

# step NAME LOG COMMAND...: run with the step's limit (cut to what is left of the total),
# output appended to LOG; outcome and the log's tail to steps.txt. Returns the exit status.
step() {
    local name=$1 log=$2; shift 2
    local lim=${limit[$name]:-0} left=$((total - (SECONDS - t_start) - grace))
    [ "$lim" -gt "$left" ] && lim=$left
    if [ "$lim" -lt 10 ]; then
        echo "== ${name}: SKIPPED, ${left} s of the budget left" | tee -a "$out/steps.txt"
        failed=$((failed + 1))
        return 1
    fi
    echo "== ${name} (limit ${lim} s): $*" >> "$log"
    local t0=$SECONDS rc
    timeout -s INT -k "$grace" "$lim" "$@" >> "$log" 2>&1
    rc=$?
    local what="exit ${rc}"
    case $rc in
        0) what="ok" ;;
        124) what="TIMED OUT at ${lim} s (SIGINT; results up to then kept)" ;;
        137) what="KILLED ${grace} s after SIGINT at ${lim} s" ;;
        5) what="exit 5: no test selected" ;;
    esac
    echo "== ${name}: ${what} after $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
    tail -n 12 "$log" | cut -c1-240 | sed 's/^/   | /' >> "$out/steps.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    return "$rc"
}

# --- env: versions and the card -------------------------------------------------------
env_check() {
    "$py" - <<'EOF'
import platform, sys, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA",
      torch.version.cuda, "| triton", tv)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability",
          "%d.%d" % torch.cuda.get_device_capability())
else:
    print("NO CUDA DEVICE")
EOF
    command -v nvidia-smi > /dev/null && nvidia-smi --format=csv \
        --query-gpu=name,memory.total,driver_version,clocks.max.sm
    command -v nvcc > /dev/null && nvcc --version | tail -n 1
    "$py" -m repa_fast.info
}
export -f env_check
export py
step env "$out/env.txt" bash -c env_check
if [ "$dry" = 0 ] && ! grep -q "^device " "$out/env.txt"; then
    echo "no CUDA device: this is the GPU run; use --dry-run on a CPU" | tee -a "$out/steps.txt"
    exit 2
fi

# --- the three benchmark suites, one pytest each (a crash or timeout loses one suite) --
bench() {  # bench NAME FILE [pytest args]
    local name=$1 file=$2; shift 2
    step "$name" "$out/bench.log" "$py" -m pytest "$file" --benchmark-only "${pytest_args[@]}" \
        --benchmark-json="$work/$name.json" "$@"
}
bench train benchmarks/test_bench_train.py "${train_k[@]}"
bench align benchmarks/test_bench_alignment.py "${align_k[@]}"
bench generate benchmarks/test_bench_generate.py
"$py" benchmarks/summarize.py --merge "$out/bench.json" \
    "$work/train.json" "$work/align.json" "$work/generate.json" 2>> "$out/steps.txt"
"$py" benchmarks/summarize.py "$out/bench.json" > "$out/bench.txt" 2>&1 \
    || echo "summarize failed: see bench.txt" >> "$out/steps.txt"

# --- the kernel tests on CUDA tensors (the interpreter in --dry-run) -------------------
step tests "$out/tests.log" "$py" -m pytest tests/test_alignment.py \
    tests/test_attention.py tests/test_kernels_compile.py \
    tests/test_diffusion.py::test_cuda_sampling_and_loss_never_sync \
    "${pytest_args[@]}" --durations=10 --junitxml="$out/tests.xml" "${tests_k[@]}"

# --- last and optional: the native extension with its CUDA kernels, then its tests ------
left=$((total - (SECONDS - t_start) - grace))
if [ "$dry" = 1 ]; then
    echo "dry-run: no CUDA build; the native tests run on what is importable" >> "$out/build.log"
    limit[native]=$left
    step native "$out/build.log" "$py" -m pytest tests/test_alignment.py \
        "${pytest_args[@]}" "${native_k[@]}"
elif [ "$left" -lt 60 ]; then
    echo "build: SKIPPED, ${left} s of the budget left" | tee -a "$out/steps.txt" "$out/build.log"
else
    arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    # the toolkit root: $CUDA_HOME, /usr/local/cuda, or where the real nvcc lives
    cuda_home="${CUDA_HOME:-}"
    if [ -z "$cuda_home" ]; then
        for candidate in /usr/local/cuda \
            "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
            if [ -f "$candidate/include/cuda_runtime.h" ]; then cuda_home=$candidate; break; fi
        done
    fi
    echo "CUDA_HOME=${cuda_home:-not found} arch ${arch}" >> "$out/build.log"
    limit[build]=$((left * 2 / 3))
    if step build "$out/build.log" env CUDA_HOME="$cuda_home" REPA_FAST_BUILD_EXT=1 \
        REPA_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
        "$py" setup.py build_ext --inplace; then
        limit[native]=$left
        step native "$out/build.log" "$py" -m pytest tests/test_alignment.py \
            "${pytest_args[@]}" "${native_k[@]}"
    fi
fi

# --- what came out ---------------------------------------------------------------------
missing=0
for f in $FILES; do
    if [ ! -s "$out/$f" ]; then
        echo "MISSING result file: $f" | tee -a "$out/steps.txt"
        missing=$((missing + 1))
    fi
done
n_files=$(find "$out" -type f | wc -l)
[ "$n_files" -le 8 ] || echo "WARNING: ${n_files} files under ${out} (at most 8 come back)" \
    | tee -a "$out/steps.txt"
echo "total: $((SECONDS - t_start)) s of ${total} s; ${failed} failed step(s)," \
     "${missing} missing file(s)" | tee -a "$out/steps.txt"
exit $((failed + missing))
