"""Compile the Triton kernels for a Hopper (sm_90) target with Triton's real compiler.

Run as ``python tests/kernel_compile_check.py [--all]`` in a process *without*
``TRITON_INTERPRET`` (under the interpreter @triton.jit makes interpreted functions, which
cannot be compiled). Default: each kernel variant in bf16 at its configs with the largest tile
(the most registers); ``--all``: every autotune config in bf16, fp16 and fp32 (about 2 min on
two cores). ``--jobs N`` compiles in N processes (default: one per CPU). Prints one line per
compile; exit status 1 on failure.

A compile fails if ptxas spills registers (any spill-store or spill-load bytes in its ``-v``
report), in every dtype: a spilling config is slow on the card and must not be offered to the
autotuner. Triton 3.8 fills ``n_regs``/``n_spills`` only when a GPU loads the cubin, so the
numbers come from ptxas's own report (``knobs.nvidia.dump_ptxas_log``), and every compile runs
ptxas (``always_compile``: a cache hit would print no report).
"""
import contextlib
import io
import multiprocessing
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from repa_fast.kernels import alignment_cosine, alignment_linear_silu, tuning  # noqa: E402
from repa_fast.ops import alignment_triton  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90

# ptxas -v: "Function properties for K / N bytes stack frame, S bytes spill stores, L bytes spill
# loads" and "Used R registers"; printed by Triton's make_cubin when dump_ptxas_log is set.
triton.knobs.nvidia.dump_ptxas_log = True
triton.knobs.compilation.always_compile = True
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")

# kernel -> (pointer dtypes, constexpr variants); "c" is the compute dtype. A variant's
# TARGET (not a constexpr) gives the target features' dtype where it differs: under bf16
# autocast, encoders ending in a LayerNorm (DINOv2, the default) hand the op fp32 features.
KERNELS = {
    "linear_bias_silu": (alignment_linear_silu.linear_bias_silu_kernel,
                         dict(x_ptr="c", w_ptr="c", b_ptr="c", pre_ptr="c", act_ptr="c"),
                         [dict(STORE_PRE=p, STORE_ACT=a) for p, a in
                          [(False, True), (True, True), (True, False)]]),
    "linear_grad_silu": (alignment_linear_silu.linear_grad_silu_kernel,
                         dict(g_ptr="c", w_ptr="c", pre_ptr="c", dpre_ptr="c", dbias_ptr="fp32"),
                         [dict(POOL=1), dict(POOL=2)]),
    "project_cosine_fwd": (alignment_cosine.project_cosine_fwd_kernel,
                           dict(s_ptr="c", w_ptr="c", b_ptr="c", t_ptr="c", part_ptr="fp32"),
                           [dict(POOL=1, POOL_T=1), dict(POOL=2, POOL_T=1),
                            dict(POOL=1, POOL_T=2), dict(POOL=1, POOL_T=1, TARGET="fp32")]),
    "project_cosine_bwd": (alignment_cosine.project_cosine_bwd_kernel,
                           dict(s_ptr="c", w_ptr="c", b_ptr="c", t_ptr="c", stats_ptr="fp32",
                                grad_ptr="fp32", dp_ptr="c", dbias_ptr="fp32", dt_ptr="c"),
                           [dict(POOL=1, POOL_T=1, TARGET_GRAD=True),
                            dict(POOL=2, POOL_T=1, TARGET_GRAD=False),
                            dict(POOL=1, POOL_T=3, TARGET_GRAD=True),
                            dict(POOL=1, POOL_T=1, TARGET_GRAD=False, TARGET="fp32")]),
}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class SharedMemoryTooLarge(Exception):
    pass


def gpu_configs(kernel):
    configs = alignment_cosine.COSINE_CONFIGS if "cosine" in kernel else tuning.GEMM_CONFIGS
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)
            for m, n, k, w, s in configs]


# Contiguous last dimensions: a launch passes these strides as 1, which Triton specialises
# into constants (vectorised, pipelined loads); the AOT compile must do the same.
UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_on", "stride_gk", "stride_wn", "stride_pn",
                "stride_dn", "stride_sk", "stride_tz", "stride_dpz", "stride_dtz"}


def compile_for_h100(fn, pointers, constexprs, dtype, num_warps, num_stages):
    """Compile as a launch at real shapes would: unit strides constant, pointers and other
    integers (768, 2048, 8192, ...) known to be multiples of 16."""
    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in UNIT_STRIDES and name not in constexprs:
            constexprs[name] = 1
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in pointers:
            kind = pointers[name]
            signature[name] = "*" + (DTYPES[dtype] if kind == "c" else kind)
        else:
            signature[name] = "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    report = io.StringIO()
    with contextlib.redirect_stdout(report):  # Triton prints the ptxas -v report
        compiled = triton.compile(source, target=H100,
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled, ptxas_usage(report.getvalue())


def ptxas_usage(report):
    """``(registers, spilled bytes)`` from the ptxas -v report of one kernel (stores + loads)."""
    spills, registers = SPILLS.findall(report), REGISTERS.findall(report)
    if len(spills) != 1 or len(registers) != 1:
        raise RuntimeError(f"no ptxas -v report of one kernel in the compile output:\n{report}")
    return int(registers[0]), sum(int(n) for n in spills[0])


class Spills(Exception):
    pass


def check(kernel, variant, config, dtype):
    """Compile one config; returns its register count, raises if it spills or cannot run."""
    autotuned, pointers, _ = KERNELS[kernel]
    variant = dict(variant)
    target = variant.pop("TARGET", None)
    if target:
        pointers = {**pointers, **{k: target for k in ("t_ptr", "dt_ptr") if k in pointers}}
    config = dict(config)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    precision = "ieee" if dtype == torch.float32 else "tf32"
    compiled, (registers, spilled) = compile_for_h100(
        autotuned.fn, pointers, {**variant, **config, "PRECISION": precision}, dtype, warps,
        stages)
    assert "cubin" in compiled.asm
    if compiled.metadata.shared > H100_SHARED_BYTES:
        raise SharedMemoryTooLarge(f"{compiled.metadata.shared} bytes")
    if spilled:
        raise Spills(f"{registers} registers, {spilled} bytes spilled")
    if dtype != torch.float32:  # tensor cores: Hopper's warpgroup MMA (or mma.sync)
        ptx = compiled.asm["ptx"]
        assert "wgmma" in ptx or "mma.sync" in ptx
    return registers


def run_one(job):
    """``(line, failed, fits)`` of one compile (run in a worker process)."""
    kernel, variant, config, dtype = job
    fits, failed = False, True
    try:
        registers = check(kernel, variant, config, dtype)
        status, fits, failed = f"ok: {registers} registers, 0 bytes spilled", True, False
    except SharedMemoryTooLarge as error:
        status = f"too large for sm_90 shared memory ({error})"
        failed = dtype != torch.float32
    except Spills as error:
        status = f"spills ({error})"
    except Exception as error:  # report every failure, not just the first
        status = f"{type(error).__name__}: {error}"
    line = f"{kernel} {DTYPES[dtype]} {variant} {config}: {'FAILED ' if failed else ''}{status}"
    return line, failed, fits


def largest(configs):
    """The configs with the largest accumulator tile (ties included): the most registers."""
    area = max(c["BLOCK_M"] * c["BLOCK_N"] for c in configs)
    return [c for c in configs if c["BLOCK_M"] * c["BLOCK_N"] == area]


def finish_line(_=None):
    """The finish kernel (no autotuning) at the block size the op launches it with."""
    block = alignment_triton.FINISH_BLOCK
    compiled, (registers, spilled) = compile_for_h100(
        alignment_cosine.cosine_finish_kernel,
        dict(part_ptr="fp32", stats_ptr="fp32", block_sum_ptr="fp32"), dict(BLOCK=block),
        torch.float32, 4, 1)
    failed = "cubin" not in compiled.asm or spilled > 0
    return (f"cosine_finish fp32 {{'BLOCK': {block}}} {{'num_warps': 4}}: "
            f"{'FAILED spills' if failed else 'ok'}: {registers} registers, "
            f"{spilled} bytes spilled", failed, not failed)


def run_job(job):
    return finish_line() if job is None else run_one(job)


def main(argv):
    """Every variant compiles without spilling; in bf16/fp16 every config fits the card's
    shared memory. fp32 tiles are twice as large, so some configs may not fit there (the
    autotuner skips a config that runs out of resources), but at least one per variant must."""
    everything = "--all" in argv
    jobs_count = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else os.cpu_count()
    jobs, groups = [], []
    for kernel in KERNELS:
        configs = gpu_configs(kernel)
        if not everything:
            configs = largest(configs)
        for dtype in (DTYPES if everything else [torch.bfloat16]):
            for variant in KERNELS[kernel][2]:
                groups.append((f"{kernel} {DTYPES[dtype]} {variant}", len(jobs), len(configs)))
                jobs += [(kernel, variant, config, dtype) for config in configs]
    jobs.append(None)  # the finish kernel
    # fp32 (FMA dot, no tensor cores) compiles take several times longer: start them first
    order = sorted(range(len(jobs)), key=lambda i: jobs[i] is None or jobs[i][3] != torch.float32)
    results = [None] * len(jobs)
    with multiprocessing.Pool(max(1, min(jobs_count, len(jobs)))) as pool:
        for i, result in zip(order, pool.imap(run_job, [jobs[i] for i in order])):
            results[i] = result
    failures = 0
    for name, start, count in groups:
        for line, failed, _ in results[start:start + count]:
            print(line, flush=True)
            failures += failed
        if not any(fits for _, _, fits in results[start:start + count]):
            failures += 1
            print(f"{name}: FAILED no config fits")
    line, failed, _ = results[-1]
    print(line)
    return 1 if failures + failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
