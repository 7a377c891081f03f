"""Attention backends, forward + backward, at the SiT-XL/2 256px shape on GPU.

FLOPs: 4·B·H·N²·d forward (two matmuls), 2.5× that backward.
"""
import pytest
import torch

from bench_utils import DEVICE, DTYPE, ON_GPU, timed
from repa_fast.ops import attention as A

# SiT-XL/2 at 256px: 256 tokens, 16 heads of 72; the CPU shape keeps the suite quick.
B, N, H, D = (32, 256, 16, 72) if ON_GPU else (2, 64, 4, 72)


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_attention_fwd_bwd(benchmark, backend):
    reason = A.unavailable_reason(backend, DEVICE, DTYPE, D)
    if reason:
        pytest.skip(reason)
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPE)

    def step():
        out = A.attention(q, k, v, backend)
        out.backward(grad)
        return out

    timed(benchmark, step, flops=3.5 * 4 * B * H * N * N * D)
