"""Interpolants, time sampling, the denoising loss and the projection-loss reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from repa_fast.transport import (
    SILoss,
    denoising_loss,
    interpolant,
    interpolate,
    projection_loss,
    sample_time,
)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_endpoints(seed, path_type):
    x0, noise = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    xt0, _ = interpolate(x0, noise, torch.zeros(3, 1, 1, 1, dtype=torch.float64), path_type)
    xt1, _ = interpolate(x0, noise, torch.ones(3, 1, 1, 1, dtype=torch.float64), path_type)
    assert torch.allclose(xt0, x0, atol=1e-12)
    assert torch.allclose(xt1, noise, atol=1e-12)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_derivatives_match_finite_differences(seed, path_type):
    t = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    h = 1e-6
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    a_p, s_p, _, _ = interpolant(t + h, path_type)
    a_m, s_m, _, _ = interpolant(t - h, path_type)
    assert torch.allclose(d_alpha, (a_p - a_m) / (2 * h), atol=1e-8)
    assert torch.allclose(d_sigma, (s_p - s_m) / (2 * h), atol=1e-8)
    # and the velocity target is d/dt of x_t
    x0, noise = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    _, v = interpolate(x0, noise, t, path_type)
    fd = (interpolate(x0, noise, t + h, path_type)[0] - interpolate(x0, noise, t - h, path_type)[0]) / (2 * h)
    assert torch.allclose(v, fd, atol=1e-7)


def test_cosine_path_is_variance_preserving(seed):
    t = torch.rand(100, dtype=torch.float64)
    alpha, sigma, _, _ = interpolant(t, "cosine")
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t))


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sample_time_official_draws(weighting, path_type):
    g = torch.Generator().manual_seed(3)
    t = sample_time(1000, weighting, path_type, generator=g)
    assert t.shape == (1000, 1, 1, 1) and ((t > 0) & (t < 1)).all()
    g.manual_seed(3)
    if weighting == "uniform":
        expect = torch.rand((1000, 1, 1, 1), generator=g)
    else:
        s = torch.randn((1000, 1, 1, 1), generator=g).exp()
        expect = s / (1 + s) if path_type == "linear" else 2 / math.pi * torch.atan(s)
    assert torch.equal(t, expect)
    if weighting == "lognormal":  # median noise level exp(0) = 1
        mid = 0.5
        assert abs(t.median().item() - mid) < 0.06


def per_sample_projection_loss(zs, zs_tilde):
    """The loss as written in the paper and the official loss.py: a loop over samples."""
    total, bsz = 0.0, zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            cos = [(F.normalize(z_j[i], dim=-1) * F.normalize(z_tilde_j[i], dim=-1)).sum()
                   for i in range(z_j.shape[0])]
            total = total + (-torch.stack(cos)).mean()
    return total / (len(zs) * bsz)


def test_projection_loss_equals_per_sample_loop(seed):
    zs = [torch.randn(3, 25, 40, dtype=torch.float64), torch.randn(3, 25, 7, dtype=torch.float64)]
    zt = [torch.randn(3, 25, 40, dtype=torch.float64), torch.randn(3, 25, 7, dtype=torch.float64)]
    ref = per_sample_projection_loss(zs, zt)
    got = projection_loss(zs, zt)
    assert abs(got.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    # and it can tell a different alignment apart
    assert abs(projection_loss(zs, zs).item() + 1.0) < 1e-6
    single = projection_loss(zs[0], zt[0])
    assert abs(single.item() - per_sample_projection_loss(zs[:1], zt[:1]).item()) < 1e-6


def test_projection_loss_gradient_matches_loop(seed):
    z = torch.randn(3, 9, 12, dtype=torch.float64)
    a = torch.randn(3, 9, 12, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    projection_loss([z], [a]).backward()
    per_sample_projection_loss([z], [b]).backward()
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
def test_projection_loss_under_autocast(seed, dtype, tol):
    zs = [torch.randn(4, 16, 32)]
    proj = torch.nn.Linear(24, 32)
    h = torch.randn(4, 16, 24)
    with torch.no_grad():
        ref = projection_loss(zs, [proj(h)])
        with torch.autocast("cpu", dtype=dtype):
            zt = proj(h)
            assert zt.dtype == dtype
            got = projection_loss([z.to(dtype) for z in zs], [zt])
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= tol * abs(ref.item()) + 1e-3


def test_projection_loss_bad_input():
    with pytest.raises(ValueError, match="same length"):
        projection_loss([torch.randn(2, 3, 4)], [])
    with pytest.raises(ValueError, match=r"zs\[0\] and zs_tilde\[0\].*\[2, 3, 4\] and \[2, 3, 5\]"):
        projection_loss([torch.randn(2, 3, 4)], [torch.randn(2, 3, 5)])


def test_denoising_loss_is_per_sample_mse(seed):
    out, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expect = torch.stack([((o - t) ** 2).mean() for o, t in zip(out, target)])
    assert torch.allclose(denoising_loss(out, target), expect)
    with pytest.raises(ValueError, match="same shape"):
        denoising_loss(out, target[:2])


class _LinearVelocityModel(torch.nn.Module):
    """v(x, t) = a·x + b·t; zs_tilde = a fixed projection of x."""

    def __init__(self):
        super().__init__()
        self.a, self.b = 0.7, -0.3

    def forward(self, x, t, y=None):
        z = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        return self.a * x + self.b * t.view(-1, 1, 1, 1), [z]


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_siloss_matches_hand_computation(path_type):
    images = torch.randn(3, 4, 2, 2)
    zs = [torch.randn(3, 4, 4)]
    model = _LinearVelocityModel()
    torch.manual_seed(11)
    loss, proj = SILoss(path_type=path_type, fused=False)(model, images, {}, zs)
    torch.manual_seed(11)
    t = torch.rand((3, 1, 1, 1))
    noise = torch.randn_like(images)
    if path_type == "linear":
        xt, v = (1 - t) * images + t * noise, noise - images
    else:
        xt = torch.cos(t * math.pi / 2) * images + torch.sin(t * math.pi / 2) * noise
        v = (-math.pi / 2 * torch.sin(t * math.pi / 2) * images
             + math.pi / 2 * torch.cos(t * math.pi / 2) * noise)
    out = model.a * xt + model.b * t
    assert torch.allclose(loss, ((out - v) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(proj, per_sample_projection_loss(zs, [xt.flatten(2).transpose(1, 2)]),
                          atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prediction="eps"), "prediction must be 'v'"),
    (dict(path_type="edm"), "path_type must be one of linear, cosine; got 'edm'"),
    (dict(weighting="cosmap"), "weighting must be one of uniform, lognormal; got 'cosmap'"),
])
def test_siloss_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SILoss(**kwargs)


def test_projection_loss_of_large_finite_features_matches_float64():
    # |x|^2 of rows near 1e20 overflows float32: the loss must not silently become 0
    from repa_fast.transport.losses import projection_loss
    torch.manual_seed(0)
    z, z_tilde = torch.randn(2, 5, 16) * 1e20, torch.randn(2, 5, 16) * 1e20
    exact = projection_loss([z.double()], [z_tilde.double()])
    assert projection_loss([z], [z_tilde]).item() == pytest.approx(exact.item(), rel=1e-5)
    assert exact.abs() > 1e-3
