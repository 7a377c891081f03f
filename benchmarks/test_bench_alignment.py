"""The REPA alignment op (projector MLP + pooling + cosine loss): fused Triton kernels against
the official-style loop, the vectorised eager reference and ``torch.compile`` of it.

FLOPs are the op's useful matmul work, the same for every provider (recomputation not counted)::

    forward  = 2·M·(D·P + P·P) + 2·R·P·Z      M = B·T SiT tokens, R = pooled tokens
    fwd+bwd  = 3 × forward

``extra_info`` holds TFLOP/s, its fraction of the card's measured bf16 matmul peak, and the
peak memory one call adds (``peak_extra_mem_mib``). Run ``python benchmarks/summarize.py
results.json`` for the ratios against the baselines.
"""
import pytest
import torch

from bench_utils import (DEVICE, DTYPE, ON_GPU, bf16_matmul_peak_tflops,
                         official_projection_loss, timed)
from repa_fast.ops import repa_alignment_loss, repa_alignment_loss_reference
from repa_fast.ops.alignment_reference import avg_pool_tokens, project

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
    recompute = provider == "fused"
    return lambda *args: repa_alignment_loss(*args, backend="triton", recompute=recompute)


def op_flops(b, t, t_target, d, p, z):
    m, r = b * t, b * min(t, t_target)
    return 2 * m * (d * p + p * p) + 2 * r * p * z


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_alignment_op(benchmark, provider, case, mode):
    if provider == "compiled_reference" and not ON_GPU:
        pytest.skip("torch.compile of the reference is benchmarked on GPU only (a CPU compile "
                    "takes longer than this suite should)")
    b, t, t_target, d, p, z = CASES[case]
    torch.manual_seed(0)
    h = torch.randn(b, t, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    target = torch.randn(b, t_target, z, device=DEVICE, dtype=DTYPE)
    shapes = [(p, d), (p,), (p, p), (p,), (z, p), (z,)]
    ws = [(torch.randn(s, device=DEVICE) / s[-1] ** 0.5).to(DTYPE).requires_grad_() for s in shapes]
    fn = make_fn(provider)

    def step():
        loss = fn(h, target, *ws)
        if mode == "fwd_bwd":
            loss.backward()
        return loss

    flops = op_flops(*CASES[case]) * (3 if mode == "fwd_bwd" else 1)
    timed(benchmark, step, flops=flops, rounds=20 if ON_GPU else 3, warmup=3 if ON_GPU else 1)
    info = benchmark.extra_info
    info.update(case=case, provider=provider, mode=mode, shape=dict(B=b, T=t, T_target=t_target,
                                                                   D=d, P=p, Z=z))
    peak = bf16_matmul_peak_tflops()
    if peak:
        info["bf16_matmul_peak_tflops"] = peak
        info["fraction_of_matmul_peak"] = info["tflops_per_s"] / peak
