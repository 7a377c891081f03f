"""The REPA alignment op (projector MLP + pooling + cosine loss), every backend.

``test_alignment_op``: the fused Triton kernels against the official-style loop, the vectorised
eager reference and ``torch.compile`` of it. FLOPs are the op's useful matmul work, the same for
every provider (recomputation not counted)::

    forward  = 2·M·(D·P + P·P) + 2·R·P·Z      M = B·T SiT tokens, R = pooled tokens
    fwd+bwd  = 3 × forward

``extra_info`` holds TFLOP/s, its fraction of the card's measured bf16 matmul peak, and the
peak memory one call adds (``peak_extra_mem_mib``). Run ``python benchmarks/summarize.py
results.json`` for the ratios against the baselines.

``test_alignment_op_native``: the native C++/CUDA backend (``repa_fast._C``) against the eager
PyTorch reference, forward and forward + backward, at the SiT-B/2 width (D=768, P=2048, Z=768,
256 tokens); on a GPU also against the fused Triton kernels. CPU: small batches (2 and 4) in
float32, the dtype the CPU trains in, and batch 16 forward + backward, where the activations
(not the weight gradients) set the peak memory. GPU: batch 32 in bf16. Providers:
``eager_reference`` (the pure-PyTorch backend), ``native`` (recompute in the backward, the
default) and ``native_saved`` (``recompute=False``: pre-activations kept), on a GPU
``fused``/``fused_saved`` (Triton).

The op is matmul-bound: 3 GEMMs forward and 6 backward that no implementation at the same
precision avoids, so no backend can beat the reference by more than the reference's
``1 / fraction_of_matmul_peak`` (recorded for it as ``x_bound_at_matmul_peak``).

Before every forward + backward call of the native suite the ``.grad`` of the inputs are set to
None, as ``optimizer.zero_grad()`` does, so every provider allocates its weight gradients
itself; its forward runs under ``torch.no_grad()`` (inference: nothing kept for a backward).
Its ``extra_info`` holds TFLOP/s, ``fraction_of_matmul_peak`` (of the measured matmul ceiling:
8192³ bf16 on a GPU, 2048³ float32 on the CPU), ``x_vs_eager_reference`` (median time of the
reference over this provider's, measured in the same session), and ``peak_extra_mem_mib``: the
peak memory one call adds above what exists before it (inputs and weights; the weight gradients
it creates count). On a GPU that is torch.cuda's peak allocation counter. On the CPU it is
measured in one extra call under ``torch.profiler`` with ``profile_memory=True``: the peak of
the running sum of the CPU allocator's allocation and free events (RSS deltas are useless here:
glibc keeps freed blocks mapped). Scratch vectors of the C++ kernels that bypass torch's
allocator (column partial sums, ≤ 100 KiB) are not counted.
"""
import pytest
import torch

from bench_utils import (DEVICE, DTYPE, ON_GPU, bf16_matmul_peak_tflops,
                         cpu_fp32_matmul_peak_tflops, official_projection_loss, timed)
from repa_fast.ops import backend_problem, repa_alignment_loss, repa_alignment_loss_reference
from repa_fast.ops.alignment_common import avg_pool_tokens
from repa_fast.ops.alignment_reference import project

# name: (B, T, T_target, D, P, Z)
CASES = {
    "SiT-B/2": (32, 256, 256, 768, 2048, 768),
    "SiT-XL/2": (32, 256, 256, 1152, 2048, 768),
    "SiT-XL/2-enc512": (32, 256, 1024, 1152, 2048, 768),  # 32x32 DINOv2 grid pooled to 16x16
} if ON_GPU else {
    "tiny": (2, 64, 64, 64, 96, 64),
    "tiny-enc-pooled": (2, 16, 64, 64, 96, 64),
}
PROVIDERS = ["official_loop", "eager_reference", "compiled_reference", "fused", "fused_saved"]

NATIVE_CASES = {
    "SiT-B/2": (32, 256, 256, 768, 2048, 768),
    "SiT-B/2-enc512": (32, 256, 1024, 768, 2048, 768),  # 32x32 DINOv2 grid pooled to 16x16
} if ON_GPU else {
    "SiT-B/2-b2": (2, 256, 256, 768, 2048, 768),
    "SiT-B/2-b4": (4, 256, 256, 768, 2048, 768),
    "SiT-B/2-b16": (16, 256, 256, 768, 2048, 768),
}
# (case, mode) pairs run; batch 16 on the CPU only for the memory of forward + backward
NATIVE_RUNS = [(case, mode) for case in NATIVE_CASES for mode in ("fwd", "fwd_bwd")
               if ON_GPU or case != "SiT-B/2-b16" or mode == "fwd_bwd"]
NATIVE_PROVIDERS = ["eager_reference", "native", "native_saved"] + (
    ["fused", "fused_saved"] if ON_GPU else [])
# provider -> (backend, recompute) of the op's own dispatch
BACKEND_OF = {"eager_reference": ("reference", True), "fused": ("triton", True),
              "fused_saved": ("triton", False), "native": ("native", True),
              "native_saved": ("native", False)}
_MEDIANS: dict = {}


def official_loop(h, z, w1, b1, w2, b2, w3, b3):
    """The official code: projector as separate layers, then loss.py's per-sample loop (the
    target pooled first where the grids differ, as a user of the official code would)."""
    z_tilde = project(h, w1, b1, w2, b2, w3, b3)
    if z.shape[1] != z_tilde.shape[1]:
        tg, hg = int(z.shape[1] ** 0.5), int(z_tilde.shape[1] ** 0.5)
        z = avg_pool_tokens(z, tg, tg // hg)
    return official_projection_loss([z], [z_tilde])


def make_fn(provider):
    if provider == "official_loop":
        return official_loop
    if provider == "eager_reference":
        return repa_alignment_loss_reference
    if provider == "compiled_reference":
        return torch.compile(repa_alignment_loss_reference)
    backend, recompute = BACKEND_OF[provider]
    return lambda *args: repa_alignment_loss(*args, backend=backend, recompute=recompute)


def provider_problem(provider):
    """Why this provider cannot run here (None when it can)."""
    backend = BACKEND_OF.get(provider, ("reference",))[0]
    return backend_problem(backend, DEVICE, DTYPE)


def op_flops(b, t, t_target, d, p, z):
    m, r = b * t, b * min(t, t_target)
    return 2 * m * (d * p + p * p) + 2 * r * p * z


def make_args(b, t, t_target, d, p, z):
    """Hidden states (requiring grad), target and projector weights (requiring grad)."""
    torch.manual_seed(0)
    h = torch.randn(b, t, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    target = torch.randn(b, t_target, z, device=DEVICE, dtype=DTYPE)
    shapes = [(p, d), (p,), (p, p), (p,), (z, p), (z,)]
    ws = [(torch.randn(s, device=DEVICE) / s[-1] ** 0.5).to(DTYPE).requires_grad_()
          for s in shapes]
    return h, target, ws


def record(benchmark, provider, case, mode, shape):
    info = benchmark.extra_info
    b, t, t_target, d, p, z = shape
    info.update(case=case, provider=provider, mode=mode, shape=dict(B=b, T=t, T_target=t_target,
                                                                   D=d, P=p, Z=z))
    return info


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_alignment_op(benchmark, provider, case, mode):
    if provider == "compiled_reference" and not ON_GPU:
        pytest.skip("torch.compile of the reference is benchmarked on GPU only (a CPU compile "
                    "takes longer than this suite should)")
    h, target, ws = make_args(*CASES[case])
    fn = make_fn(provider)

    def step():
        loss = fn(h, target, *ws)
        if mode == "fwd_bwd":
            loss.backward()
        return loss

    flops = op_flops(*CASES[case]) * (3 if mode == "fwd_bwd" else 1)
    timed(benchmark, step, flops=flops, rounds=20 if ON_GPU else 3, warmup=3 if ON_GPU else 1)
    info = record(benchmark, provider, case, mode, CASES[case])
    peak = bf16_matmul_peak_tflops()
    if peak:
        info["bf16_matmul_peak_tflops"] = peak
        info["fraction_of_matmul_peak"] = info["tflops_per_s"] / peak


def cpu_peak_extra_mib(fn) -> float:
    """Peak bytes the CPU allocator holds during fn() above its level before, from the
    profiler's allocation events (see the module docstring)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak / 2 ** 20


@pytest.mark.parametrize("case, mode", NATIVE_RUNS, ids=[f"{c}-{m}" for c, m in NATIVE_RUNS])
@pytest.mark.parametrize("provider", NATIVE_PROVIDERS)
def test_alignment_op_native(benchmark, provider, case, mode):
    problem = provider_problem(provider)
    if problem is not None:
        pytest.skip(f"{provider} cannot run here: {problem}")
    h, target, ws = make_args(*NATIVE_CASES[case])

    def clear_grads():
        for tensor in (h, *ws):
            tensor.grad = None

    fn = make_fn(provider)

    def step():
        if mode == "fwd":
            with torch.no_grad():  # inference: nothing is kept for a backward
                return fn(h, target, *ws)
        loss = fn(h, target, *ws)
        loss.backward()
        return loss

    flops = op_flops(*NATIVE_CASES[case]) * (3 if mode == "fwd_bwd" else 1)
    rounds = 20 if ON_GPU else (3 if h.shape[0] >= 16 else 5)
    timed(benchmark, step, flops=flops, rounds=rounds, warmup=3 if ON_GPU else 1,
          setup=clear_grads)
    info = record(benchmark, provider, case, mode, NATIVE_CASES[case])
    peak = bf16_matmul_peak_tflops() if ON_GPU else cpu_fp32_matmul_peak_tflops()
    info["matmul_peak_tflops"] = peak
    info["fraction_of_matmul_peak"] = info["tflops_per_s"] / peak
    if provider == "eager_reference":
        info["x_bound_at_matmul_peak"] = peak / info["tflops_per_s"]
    if not ON_GPU:
        clear_grads()
        info["peak_extra_mem_mib"] = cpu_peak_extra_mib(step)
        info["peak_mem_method"] = ("torch.profiler CPU allocator events, one call, .grad set "
                                   "to None before it")
    median = benchmark.stats.stats.median
    _MEDIANS[(case, mode, provider)] = median
    reference = _MEDIANS.get((case, mode, "eager_reference"))
    if reference is not None:
        info["x_vs_eager_reference"] = reference / median
