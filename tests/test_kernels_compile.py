"""Every Triton kernel compiles to a Hopper (sm_90) cubin with Triton's real compiler.

No GPU is needed: Triton lowers to PTX and runs its bundled ptxas for a named target. This
catches what the CPU interpreter cannot (non-constexpr globals, type rules of the GPU
lowering, shared memory beyond the card, no tensor-core MMA, register spills) in CI. The
compiles run in a subprocess without ``TRITON_INTERPRET`` (see ``kernel_compile_check.py``).
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
SCRIPT = pathlib.Path(__file__).with_name("kernel_compile_check.py")


def run_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


# "<kernel> <dtype> <variant> <config>: ok: <R> registers, <S> bytes spilled"
RESULT = re.compile(r"^(\w+) (bf16|fp16|fp32) (\{.*?\}) (\{.*\}): (ok|FAILED[^:]*|too large"
                    r"[^:]*)(?:: (\d+) registers, (\d+) bytes spilled)?")
VARIANTS = {"linear_bias_silu": 3, "linear_grad_silu": 2, "project_cosine_fwd": 4,
            "project_cosine_bwd": 4}


def parse(out):
    lines = out.splitlines()
    results = [RESULT.match(line) for line in lines]
    assert all(results), [line for line, r in zip(lines, results) if not r]
    return results


def test_every_kernel_variant_compiles_for_h100_in_bf16_without_spills():
    """Each kernel variant at its largest tiles (the most registers) compiles, and ptxas spills
    no register."""
    results = parse(run_check())
    assert all(r[5] == "ok" and r[7] == "0" for r in results), [r[0] for r in results]
    kernels = [r[1] for r in results]
    assert set(kernels) == {*VARIANTS, "cosine_finish"} and kernels.count("cosine_finish") == 1
    for kernel, variants in VARIANTS.items():  # every variant, at each of the largest tiles
        assert kernels.count(kernel) % variants == 0, kernel


@pytest.mark.slow
def test_every_autotune_config_compiles_for_h100_in_every_dtype_without_spills():
    """Every autotune config in bf16, fp16 and fp32 compiles without spilling a register; only
    fp32 tiles may exceed the card's shared memory (the autotuner skips those)."""
    from repa_fast.kernels.alignment_cosine import COSINE_CONFIGS
    from repa_fast.kernels.tuning import GEMM_CONFIGS

    results = parse(run_check("--all"))
    too_large = [r for r in results if r[5].startswith("too large for sm_90 shared memory")]
    assert not [r[0] for r in results if r[5] != "ok" and r not in too_large]
    assert all(r[7] == "0" for r in results if r[5] == "ok")
    assert all(r[2] == "fp32" for r in too_large)
    for kernel, variants in VARIANTS.items():
        configs = COSINE_CONFIGS if "cosine" in kernel else GEMM_CONFIGS
        for dtype in ("bf16", "fp16", "fp32"):
            done = [r for r in results if r[1] == kernel and r[2] == dtype]
            assert len(done) == variants * len(configs), (kernel, dtype)
