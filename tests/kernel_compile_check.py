"""Compile the Triton kernels for a Hopper (sm_90) target with Triton's real compiler.

Run as ``python tests/kernel_compile_check.py [--all]`` in a process *without*
``TRITON_INTERPRET`` (under the interpreter @triton.jit makes interpreted functions, which
cannot be compiled). Default: each kernel variant at its largest tile in bf16; ``--all``: every
autotune config in bf16, fp16 and fp32. Prints one line per compile; exit status 1 on failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from repa_fast.kernels import cosine, linear_silu, tuning  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90

# kernel -> (pointer dtypes, constexpr variants); "c" is the compute dtype
KERNELS = {
    "linear_bias_silu": (linear_silu.linear_bias_silu_kernel,
                         dict(x_ptr="c", w_ptr="c", b_ptr="c", pre_ptr="c", act_ptr="c"),
                         [dict(STORE_PRE=p, STORE_ACT=a) for p, a in
                          [(False, True), (True, True), (True, False)]]),
    "linear_grad_silu": (linear_silu.linear_grad_silu_kernel,
                         dict(g_ptr="c", w_ptr="c", pre_ptr="c", dpre_ptr="c", dbias_ptr="fp32"),
                         [dict(POOL=1), dict(POOL=2)]),
    "project_cosine_fwd": (cosine.project_cosine_fwd_kernel,
                           dict(s_ptr="c", w_ptr="c", b_ptr="c", t_ptr="c", part_ptr="fp32"),
                           [dict(POOL=1, POOL_T=1), dict(POOL=2, POOL_T=1),
                            dict(POOL=1, POOL_T=2)]),
    "project_cosine_bwd": (cosine.project_cosine_bwd_kernel,
                           dict(s_ptr="c", w_ptr="c", b_ptr="c", t_ptr="c", stats_ptr="fp32",
                                grad_ptr="fp32", dp_ptr="c", dbias_ptr="fp32", dt_ptr="c"),
                           [dict(POOL=1, POOL_T=1, TARGET_GRAD=True),
                            dict(POOL=2, POOL_T=1, TARGET_GRAD=False),
                            dict(POOL=1, POOL_T=3, TARGET_GRAD=True)]),
}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class SharedMemoryTooLarge(Exception):
    pass


def gpu_configs(kernel):
    configs = cosine.COSINE_CONFIGS if "cosine" in kernel else tuning.GEMM_CONFIGS
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
    return triton.compile(source, target=H100,
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def check(kernel, variant, config, dtype):
    autotuned, pointers, _ = KERNELS[kernel]
    config = dict(config)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    precision = "ieee" if dtype == torch.float32 else "tf32"
    compiled = compile_for_h100(autotuned.fn, pointers,
                                {**variant, **config, "PRECISION": precision}, dtype, warps, stages)
    assert "cubin" in compiled.asm
    if compiled.metadata.shared > H100_SHARED_BYTES:
        raise SharedMemoryTooLarge(f"{compiled.metadata.shared} bytes")
    if dtype != torch.float32:  # tensor cores: Hopper's warpgroup MMA (or mma.sync)
        ptx = compiled.asm["ptx"]
        assert "wgmma" in ptx or "mma.sync" in ptx



def main(argv):
    """Every variant compiles; in bf16/fp16 every config fits the card's shared memory. fp32
    tiles are twice as large, so some configs may not fit there (the autotuner skips a config
    that runs out of resources), but at least one per variant must."""
    everything = "--all" in argv
    failures = 0
    for kernel in KERNELS:
        configs = gpu_configs(kernel)
        if not everything:
            configs = [max(configs, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"])]
        for dtype in (DTYPES if everything else [torch.bfloat16]):
            for variant in KERNELS[kernel][2]:
                fitting = 0
                for config in configs:
                    try:
                        check(kernel, variant, config, dtype)
                        status, fitting = "ok", fitting + 1
                    except SharedMemoryTooLarge as error:
                        status = f"too large for sm_90 shared memory ({error})"
                        if dtype != torch.float32:
                            failures += 1
                            status = "FAILED " + status
                    except Exception as error:  # report every failure, not just the first
                        failures += 1
                        status = f"FAILED {type(error).__name__}: {error}"
                    print(f"{kernel} {DTYPES[dtype]} {variant} {config}: {status}", flush=True)
                if not fitting:
                    failures += 1
                    print(f"{kernel} {DTYPES[dtype]} {variant}: FAILED no config fits")
    finish = compile_for_h100(cosine.cosine_finish_kernel,
                              dict(part_ptr="fp32", stats_ptr="fp32", loss_ptr="fp32"),
                              dict(BLOCK=1024), torch.float32, 4, 1)
    print("cosine_finish: ok" if "cubin" in finish.asm else "cosine_finish: FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
