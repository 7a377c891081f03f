"""The projector's last bias gradient in float16, where the per-token gradients underflow.

With |p| ~ 16000 (a large b3, so p's own rounding error stays small) and R = 1024 pooled rows,
the per-token gradient dp (~1e-8) is below float16's smallest subnormal (6e-8). db3 = Σ_r dp_r
must be summed from the unrounded values, as the float64 reference does, and rounded once to
float16 at the end; summing dp after rounding it to float16 flushes everything to zero.
Checked for the fused backends that run float16 here (Triton on its CPU interpreter without a
GPU). The eager reference is plain autograd: its dp is float16, as in any eager float16 model,
and needs loss scaling (torch.amp.GradScaler) in this regime, as the official fp16 training has.
"""
import pytest
import torch
import torch.nn.functional as F

from repa_fast.ops import repa_alignment_loss
from repa_fast.ops.backends import REGISTRY

from alignment_cases import make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_float16_db3_sums_unrounded_dp(seed, backend):
    problem = REGISTRY[backend](torch.device(DEVICE), torch.float16)
    if problem is not None:
        pytest.skip(f"{backend} cannot run float16 on {DEVICE}: {problem}")
    h, z, ws = make_inputs(64, 16, 16, D=16, P=32, Z=64)
    ws[5] = torch.randn(64) * 2000
    h, z = h.detach().to(DEVICE, torch.float16), z.detach().to(DEVICE, torch.float16)
    ws = [w.detach().to(DEVICE, torch.float16).requires_grad_() for w in ws]
    loss = repa_alignment_loss(h, z, *ws, backend=backend)
    db3 = torch.autograd.grad(loss, ws[5])[0]
    assert db3.dtype == torch.float16

    w1, b1, w2, b2, w3, b3 = (w.detach().cpu().double() for w in ws)
    p = F.linear(F.silu(F.linear(F.silu(F.linear(h.cpu().double(), w1, b1)), w2, b2)), w3, b3)
    p.requires_grad_()
    ref_loss = -F.cosine_similarity(p, z.cpu().double(), dim=-1, eps=0).mean()
    dp = torch.autograd.grad(ref_loss, p)[0].reshape(-1, p.shape[-1])
    assert 1e-9 < dp.abs().median() < 3e-8  # the regime this test is about
    ref = dp.sum(0).half().double()  # the gradient of a float16 b3 is float16
    err = ((db3.cpu().double() - ref).norm() / ref.norm()).item()
    assert err <= 2e-2, f"db3: relative error {err:.2e}"
    # the test can fail: the sum of dp rounded to float16 is far off
    rounded = dp.half().double().sum(0).half().double()
    assert (rounded - ref).norm() / ref.norm() > 0.5
