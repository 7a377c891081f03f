"""The discrete Gaussian diffusion (DiT's ``diffusion`` package) against closed forms written
here independently, in float64."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from repa_fast.diffusion import (
    UniformSampler,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    extract_into_tensor,
    normal_kl,
    space_timesteps,
)


def cumprod(values):
    out, acc = [], 1.0
    for v in values:
        acc *= v
        out.append(acc)
    return np.array(out)


# -- schedules and tables ---------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1000, 250])
def test_linear_schedule(steps):
    d = create_diffusion("", diffusion_steps=steps)
    scale = 1000 / steps
    expected = [scale * (1e-4 + (0.02 - 1e-4) * i / (steps - 1)) for i in range(steps)]
    assert d.betas.dtype == np.float64 and d.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(d.betas, expected, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod, np.exp(np.cumsum(np.log1p(-np.array(expected)))),
                               rtol=1e-10)


def test_cosine_schedule():
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2", diffusion_steps=100)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = [min(1 - f((i + 1) / 100) / f(i / 100), 0.999) for i in range(100)]
    np.testing.assert_allclose(d.betas, expected, rtol=1e-12)
    assert d.betas[-1] == 0.999  # the cap bites at the end
    # away from the cap ᾱ_t follows f(t)/f(0)
    np.testing.assert_allclose(d.alphas_cumprod[:90], [f((i + 1) / 100) / f(0) for i in range(90)],
                               rtol=1e-9)


def test_posterior_is_the_product_of_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; √α_t x_{t-1}, β_t) · N(x_{t-1}; √ᾱ_{t-1} x_0, 1-ᾱ_{t-1})."""
    d = create_diffusion("", diffusion_steps=1000)
    betas = d.betas
    abar = cumprod(1 - betas)
    for t in [1, 2, 10, 500, 999]:
        alpha, abar_prev = 1 - betas[t], abar[t - 1]
        precision = alpha / betas[t] + 1 / (1 - abar_prev)
        var = 1 / precision
        assert math.isclose(d.posterior_variance[t], var, rel_tol=1e-9)
        assert math.isclose(d.posterior_mean_coef2[t], var * math.sqrt(alpha) / betas[t], rel_tol=1e-9)
        assert math.isclose(d.posterior_mean_coef1[t], var * math.sqrt(abar_prev) / (1 - abar_prev),
                            rel_tol=1e-9)
    # at the first step x_{t-1} = x_0 exactly; its log variance takes β̃ of the second step
    assert d.posterior_variance[0] == 0
    assert math.isclose(d.posterior_mean_coef1[0], 1.0) and d.posterior_mean_coef2[0] == 0
    assert d.posterior_log_variance_clipped[0] == math.log(d.posterior_variance[1])
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))


def test_q_sample_and_posterior_tensors(seed):
    d = create_diffusion("")
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 123, 999])
    abar = cumprod(1 - d.betas)
    a = torch.tensor([math.sqrt(abar[i]) for i in t], dtype=torch.float32).view(3, 1, 1, 1)
    s = torch.tensor([math.sqrt(1 - abar[i]) for i in t], dtype=torch.float32).view(3, 1, 1, 1)
    xt = d.q_sample(x0, t, noise=noise)
    assert xt.dtype == torch.float32
    torch.testing.assert_close(xt, a * x0 + s * noise, rtol=1e-6, atol=1e-6)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    c1 = torch.tensor(d.posterior_mean_coef1[t.numpy()], dtype=torch.float32).view(3, 1, 1, 1)
    c2 = torch.tensor(d.posterior_mean_coef2[t.numpy()], dtype=torch.float32).view(3, 1, 1, 1)
    torch.testing.assert_close(mean, c1 * x0 + c2 * xt)
    assert var.shape == x0.shape and var[0].abs().max() == 0
    torch.testing.assert_close(logvar[1, 0, 0, 0], torch.tensor(math.log(d.posterior_variance[123]),
                                                                dtype=torch.float32))


# -- likelihood pieces ------------------------------------------------------------------------

def test_normal_kl(seed):
    m, lv = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-12
    assert torch.allclose(normal_kl(m, lv, 0.0, 0.0), normal_kl(m, lv, torch.zeros(5, dtype=torch.float64),
                                                                torch.zeros(5, dtype=torch.float64)))
    # Monte Carlo: E_{x~p1}[log p1(x) - log p2(x)]
    gen = torch.Generator().manual_seed(0)
    m1, s1, m2, s2 = 0.3, 0.7, -0.4, 1.3
    x = m1 + s1 * torch.randn(400_000, generator=gen, dtype=torch.float64)
    p1, p2 = torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2)
    mc = (p1.log_prob(x) - p2.log_prob(x)).mean().item()
    kl = normal_kl(torch.tensor(m1, dtype=torch.float64), 2 * math.log(s1), m2, 2 * math.log(s2)).item()
    assert abs(kl - mc) < 5e-3
    assert kl > 0


def test_discretized_likelihood_sums_to_one(seed):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # uint8 0..255 mapped to [-1, 1]
    means = torch.rand(7, 1, dtype=torch.float64) * 2.4 - 1.2
    log_scales = torch.rand(7, 1, dtype=torch.float64) * 3 - 5  # σ from e^-5 to e^-2
    x = bins.expand(7, 256)
    logp = discretized_gaussian_log_likelihood(x, means=means.expand(7, 256),
                                               log_scales=log_scales.expand(7, 256))
    torch.testing.assert_close(logp.exp().sum(dim=1), torch.ones(7, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # an inner bin's probability is about Φ(b+) - Φ(b-) with the exact CDF
    normal = torch.distributions.Normal(means, log_scales.exp())
    exact = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    assert (logp.exp() - exact)[:, 1:-1].abs().max() < 2e-3


# -- training loss ----------------------------------------------------------------------------

class TinyModel(torch.nn.Module):
    """1x1 conv to 2C channels plus a per-timestep bias (so the model depends on t)."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, 2 * c, 1)
        self.hidden = torch.nn.Conv2d(c, c, 1)
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        h = torch.tanh(self.hidden(x))
        return self.conv(h) + (t.float() / 1000).view(-1, 1, 1, 1)


def reference_hybrid_loss(d, out, x0, noise, t):
    """mse + vb in bits per dimension, from the formulas, with the exact Normal KL."""
    abar = cumprod(1 - d.betas)
    C = x0.shape[1]
    eps, v = out[:, :C].double(), out[:, C:].double()
    x0, noise = x0.double(), noise.double()
    mse, vb = [], []
    for n, i in enumerate(t.tolist()):
        a, ap, b = abar[i], (abar[i - 1] if i else 1.0), d.betas[i]
        xt = math.sqrt(a) * x0[n] + math.sqrt(1 - a) * noise[n]
        mse.append(((noise[n] - eps[n]) ** 2).mean())
        x0_hat = (xt - math.sqrt(1 - a) * eps[n]) / math.sqrt(a)
        c1, c2 = b * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - b) / (1 - a)
        j = max(i, 1)  # β̃ is 0 at the first step: its log is clipped to the second's
        beta_tilde = d.betas[j] * (1 - abar[j - 1]) / (1 - abar[j])
        frac = (v[n] + 1) / 2
        log_var = frac * math.log(b) + (1 - frac) * math.log(beta_tilde)
        model_mean = c1 * x0_hat + c2 * xt
        if i == 0:
            cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
            inv = torch.exp(-0.5 * log_var)
            plus, minus = cdf(inv * (x0[n] - model_mean + 1 / 255)), cdf(inv * (x0[n] - model_mean - 1 / 255))
            prob = torch.where(x0[n] < -0.999, plus, torch.where(x0[n] > 0.999, 1 - minus, plus - minus))
            vb.append(-torch.log(prob.clamp(min=1e-12)).mean() / math.log(2))
        else:
            true_mean = c1 * x0[n] + c2 * xt
            p = torch.distributions.Normal(true_mean, math.sqrt(beta_tilde))
            q = torch.distributions.Normal(model_mean, torch.exp(0.5 * log_var))
            vb.append(torch.distributions.kl_divergence(p, q).mean() / math.log(2))
    return torch.stack(mse), torch.stack(vb)


def test_training_losses_match_the_formulas(seed):
    d = create_diffusion("")
    model = TinyModel(3)
    x0 = torch.rand(4, 3, 5, 5) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 400, 999])
    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    xt = d.q_sample(x0, t, noise=noise)
    mse, vb = reference_hybrid_loss(d, model(xt, t).detach(), x0, noise, t)
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["vb"].double(), vb, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_trains_only_the_variance(seed):
    d = create_diffusion("")
    model = TinyModel(2)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    d.training_losses(model, x0, torch.tensor([0, 5, 700]))["vb"].sum().backward()
    assert model.conv.weight.grad[:2].abs().max() == 0  # the ε channels get nothing
    assert model.conv.weight.grad[2:].abs().max() > 0
    assert model.hidden.weight.grad.abs().max() > 0  # shared layers still learn the variance


def test_rescaled_and_kl_losses(seed):
    x0, noise, t = torch.rand(2, 2, 3, 3) * 2 - 1, torch.randn(2, 2, 3, 3), torch.tensor([3, 90])
    model = TinyModel(2)
    plain = create_diffusion("", diffusion_steps=100).training_losses(model, x0, t, noise=noise)
    scaled = create_diffusion("", diffusion_steps=100, rescale_learned_sigmas=True).training_losses(
        model, x0, t, noise=noise)
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.1)
    kl = create_diffusion("", diffusion_steps=100, use_kl=True).training_losses(model, x0, t, noise=noise)
    assert set(kl) == {"loss"}
    torch.testing.assert_close(kl["loss"], plain["vb"] * 100)


def test_learned_range_and_fixed_variances(seed):
    d = create_diffusion("", diffusion_steps=50)
    x, t = torch.randn(2, 1, 2, 2), torch.tensor([0, 30])
    for v, table in [(-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))]:
        out = d.p_mean_variance(lambda x_, t_: torch.cat([x_, torch.full_like(x_, v)], 1), x, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0],
                                   torch.tensor(table[[0, 30]], dtype=torch.float32))
    large = create_diffusion("", diffusion_steps=50, learn_sigma=False)
    out = large.p_mean_variance(lambda x_, t_: x_, x, t)
    assert out["variance"][0, 0, 0, 0].item() == pytest.approx(d.posterior_variance[1], rel=1e-6)
    assert out["variance"][1, 0, 0, 0].item() == pytest.approx(d.betas[30], rel=1e-6)
    small = create_diffusion("", diffusion_steps=50, learn_sigma=False, sigma_small=True)
    out = small.p_mean_variance(lambda x_, t_: x_, x, t)
    assert out["variance"][1, 0, 0, 0].item() == pytest.approx(d.posterior_variance[30], rel=1e-6)


# -- respacing --------------------------------------------------------------------------------

def strided(start, size, count):
    """Section of ``size`` steps from ``start`` evenly strided to ``count`` (exact fractions)."""
    if count == 1:
        return {start}
    return {start + round(Fraction(k * (size - 1), count - 1)) for k in range(count)}


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    got = space_timesteps(1000, "250")
    assert got == strided(0, 1000, 250) and len(got) == 250
    assert {0, 4, 8, 12, 999} <= got
    assert space_timesteps(1000, "10,10") == strided(0, 500, 10) | strided(500, 500, 10)
    # uneven split: the first section gets the extra step
    assert space_timesteps(21, "10,10") == {0, 1, 2, 3, 4, 6, 7, 8, 9, 10} | set(range(11, 21))
    assert space_timesteps(1000, [1000]) == set(range(1000))


def test_respaced_diffusion_keeps_alphas_cumprod_and_maps_timesteps(seed):
    base = create_diffusion("")
    for spacing in ["250", "ddim50", "10,10"]:
        d = create_diffusion(spacing)
        kept = sorted(space_timesteps(1000, spacing))
        assert d.timestep_map == kept and d.num_timesteps == len(kept)
        np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    d = create_diffusion("ddim50")
    model = TinyModel(1)
    d.training_losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([1, 49]))
    assert model.seen[-1].tolist() == [20, 980]  # original timesteps, not rescaled


# -- sampling ---------------------------------------------------------------------------------

def eps_identity(x, t):
    return torch.cat([x, torch.zeros_like(x)], dim=1)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_is_deterministic(loop):
    d = create_diffusion("ddim10")
    model = TinyModel(2)
    run = lambda **kw: getattr(d, loop)(model, (2, 2, 3, 3), **kw)  # noqa: E731
    a = run(generator=torch.Generator().manual_seed(3))
    b = run(generator=torch.Generator().manual_seed(3))
    c = run(generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    e = run()
    torch.manual_seed(5)
    assert torch.equal(e, run())


def test_p_sample_loop_draws_as_dit(seed):
    """Start noise, then per step: the model, then one randn_like; none added at t = 0."""
    d = create_diffusion("ddim5")
    model = TinyModel(2)
    torch.manual_seed(11)
    got = d.p_sample_loop(model, (2, 2, 3, 3))
    torch.manual_seed(11)
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        for i in reversed(range(d.num_timesteps)):
            t = torch.full((2,), i)
            out = d.p_mean_variance(model, x, t)
            z = torch.randn_like(x)
            x = out["mean"] + (i != 0) * torch.exp(0.5 * out["log_variance"]) * z
    torch.testing.assert_close(got, x, rtol=0, atol=0)


def test_ddim_eta0_closed_form(seed):
    """With ε̂(x_t) = x_t each step scales x by
    √(ᾱ_prev/ᾱ)(1 - √(1-ᾱ)) + √(1-ᾱ_prev)."""
    d = create_diffusion("ddim20")
    abar = create_diffusion("").alphas_cumprod[d.timestep_map]
    factor = 1.0
    for k in reversed(range(len(abar))):
        a, ap = abar[k], (abar[k - 1] if k else 1.0)
        factor *= math.sqrt(ap / a) * (1 - math.sqrt(1 - a)) + math.sqrt(1 - ap)
    noise = torch.randn(2, 3, 4, 4)
    got = d.ddim_sample_loop(eps_identity, noise.shape, noise=noise, clip_denoised=False, eta=0.0)
    torch.testing.assert_close(got, noise * factor, rtol=1e-4, atol=1e-6)


def test_ddim_eta0_recovers_the_data_the_model_knows(seed):
    target = torch.rand(1, 2, 3, 3) * 2 - 1
    d = create_diffusion("ddim25")
    # the model sees original timesteps: its ᾱ table is the full diffusion's
    abar = torch.tensor(create_diffusion("").alphas_cumprod, dtype=torch.float32)

    def exact(x, t):  # the ε that makes x̂_0 = target
        a = abar[t].view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * target) / (1 - a).sqrt(), torch.zeros_like(x)], 1)
    got = d.ddim_sample_loop(exact, (2, 2, 3, 3), device="cpu")
    torch.testing.assert_close(got, target.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)


def test_p_sample_adds_no_noise_at_t0(seed):
    d = create_diffusion("ddim10")
    x = torch.randn(2, 2, 2, 2)
    t = torch.zeros(2, dtype=torch.long)
    out = d.p_sample(eps_identity, x, t)
    torch.testing.assert_close(out["sample"], d.p_mean_variance(eps_identity, x, t)["mean"])


def test_uniform_sampler():
    d = create_diffusion("", diffusion_steps=100)
    sampler = UniformSampler(d)
    np.random.seed(0)
    t, w = sampler.sample(64, "cpu")
    np.random.seed(0)
    assert torch.equal(t, sampler.sample(64, "cpu")[0])
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < 100
    assert torch.equal(w, torch.ones(64))


# -- arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name,value", [
    ({"timestep_respacing": "", "noise_schedule": "quadratic"}, "noise_schedule", "'quadratic'"),
    ({"timestep_respacing": "abc"}, "timestep_respacing", "'abc'"),
    ({"timestep_respacing": "ddimx"}, "timestep_respacing", "'ddimx'"),
    ({"timestep_respacing": "ddim2000"}, "timestep_respacing", "'ddim2000'"),
    ({"timestep_respacing": "2000"}, "timestep_respacing", "2000"),
    ({"timestep_respacing": "10,0"}, "timestep_respacing", "0"),
    ({"timestep_respacing": "", "diffusion_steps": 0}, "diffusion_steps", "0"),
])
def test_bad_arguments(kwargs, name, value):
    with pytest.raises(ValueError) as info:
        create_diffusion(**kwargs)
    assert name in str(info.value) and value in str(info.value)


# -- tables on the device ---------------------------------------------------------------------

TABLES = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
          "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
          "one_minus_alphas_cumprod", "log_betas", "recip_posterior_mean_coef1",
          "posterior_mean_coef2_over_coef1", "fixed_large_variance", "fixed_large_log_variance"]


def test_derived_tables_are_the_originals_expressions():
    d = create_diffusion("")
    same = lambda a, b: np.testing.assert_array_equal(a, b)  # noqa: E731
    same(d.one_minus_alphas_cumprod, 1.0 - d.alphas_cumprod)
    same(d.log_betas, np.log(d.betas))
    same(d.recip_posterior_mean_coef1, 1.0 / d.posterior_mean_coef1)
    same(d.posterior_mean_coef2_over_coef1, d.posterior_mean_coef2 / d.posterior_mean_coef1)
    same(d.fixed_large_variance, np.append(d.posterior_variance[1], d.betas[1:]))
    same(d.fixed_large_log_variance, np.log(np.append(d.posterior_variance[1], d.betas[1:])))


@pytest.mark.parametrize("name", TABLES)
def test_extract_equals_the_originals_lookup(name):
    """Bitwise the original's ``_extract_into_tensor`` (float64 gather, then float32), kept."""
    d = create_diffusion("")
    t = torch.tensor([0, 1, 500, 998, 999, 7])
    shape = (6, 3, 2, 2)
    original = torch.from_numpy(getattr(d, name))[t].float()[:, None, None, None] \
        + torch.zeros(shape)
    assert torch.equal(d.extract(name, t, shape), original)
    assert torch.equal(extract_into_tensor(getattr(d, name), t, shape), original)
    assert (name, t.device) in d._device_tables  # noqa: SLF001 (the cache under test)


def test_steps_make_no_host_copies_after_the_first(monkeypatch):
    """Tables and the respaced timestep map are copied to the device once: later training
    losses and sampling loops call neither ``torch.from_numpy`` nor ``torch.tensor`` (on a GPU
    each such copy is a host sync). Fails if any look-up copies the numpy table again."""
    d = create_diffusion("25")
    model = TinyModel(2)
    x0 = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 12, 24])
    d.training_losses(model, x0, t)
    d.p_sample_loop(model, (3, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    d.ddim_sample_loop(model, (3, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    cached = dict(d._device_tables)  # noqa: SLF001

    def refuse(*args, **kwargs):
        raise AssertionError("a host-to-device copy inside a diffusion step")
    monkeypatch.setattr(torch, "from_numpy", refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
    d.training_losses(model, x0, t)
    d.p_sample_loop(model, (3, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    d.ddim_sample_loop(model, (3, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    assert d._device_tables.keys() == cached.keys()  # noqa: SLF001


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_and_loss_never_sync():
    """On a GPU a DDPM loop and the hybrid loss run with CUDA's sync debug mode set to error."""
    d = create_diffusion("10")
    model = TinyModel(2).cuda()
    x0 = torch.randn(3, 2, 4, 4, device="cuda")
    t = torch.tensor([0, 5, 9], device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    d.training_losses(model, x0, t)
    d.p_sample_loop(model, (3, 2, 4, 4), generator=gen)  # first use copies the tables
    model.seen.clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d.training_losses(model, x0, t)["loss"].sum().backward()
        d.p_sample_loop(model, (3, 2, 4, 4), generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
