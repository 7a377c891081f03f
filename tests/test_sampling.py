"""Samplers: step counts, guidance interval, known solutions, SDE noise order, a real SiT."""
import math

import pytest
import torch

from repa_fast.models import SiT
from repa_fast.transport.samplers import euler_maruyama_sampler, euler_sampler, get_score_from_velocity


class Recorder(torch.nn.Module):
    """v(x, t) = k·x, recording (batch size, t, labels) of every call."""

    def __init__(self, k=1.0, num_classes=1000):
        super().__init__()
        self.k, self.num_classes, self.calls = k, num_classes, []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0]), y.clone()))
        return self.k * x, []


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_ode_step_counts(steps):
    x = torch.randn(2, 1, 2, 2)
    euler = Recorder()
    euler_sampler(euler, x, torch.tensor([1, 2]), num_steps=steps)
    assert len(euler.calls) == steps
    assert [c[1] for c in euler.calls] == pytest.approx([1 - i / steps for i in range(steps)])
    heun = Recorder()
    euler_sampler(heun, x, torch.tensor([1, 2]), num_steps=steps, heun=True)
    assert len(heun.calls) == 2 * steps - 1
    sde = Recorder()
    euler_maruyama_sampler(sde, x, torch.tensor([1, 2]), num_steps=steps)
    assert len(sde.calls) == steps
    grid = torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist()
    assert [c[1] for c in sde.calls] == pytest.approx(grid)


def test_euler_and_heun_on_linear_field_known_solution(seed):
    """dx/dt = x from t=1 to t=0: exact x·e⁻¹; Euler gives x·(1-1/N)^N; Heun multiplies by
    (1 + dt + dt²/2) on every step but the last, which is a plain Euler step."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    n = 10
    dt = -1.0 / n
    euler = euler_sampler(Recorder(), x, y, num_steps=n)
    assert torch.allclose(euler, x * (1 + dt) ** n, rtol=1e-12)
    heun = euler_sampler(Recorder(), x, y, num_steps=n, heun=True)
    assert torch.allclose(heun, x * (1 + dt + dt * dt / 2) ** (n - 1) * (1 + dt), rtol=1e-12)
    exact = x * math.exp(-1)
    assert (heun - exact).abs().max() < (euler - exact).abs().max()


@pytest.mark.parametrize("heun", [False, True])
def test_cfg_only_inside_guidance_interval(heun):
    model = Recorder(num_classes=7)
    x = torch.randn(2, 1, 2, 2)
    y = torch.tensor([3, 4])
    euler_sampler(model, x, y, num_steps=10, heun=heun, cfg_scale=2.0, guidance_low=0.25,
                  guidance_high=0.65)
    t_grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    step = 0
    for i in range(10):
        guided = 0.25 <= t_grid[i] <= 0.65
        calls = [model.calls[step]] + ([model.calls[step + 1]] if heun and i < 9 else [])
        step += len(calls)
        for batch, _, labels in calls:
            # the Heun corrector follows the decision at t_cur, as the official sampler
            assert batch == (4 if guided else 2)
            if guided:
                assert labels.tolist() == [3, 4, 7, 7]  # the null class is model.num_classes


def test_no_cfg_when_scale_is_one():
    model = Recorder()
    euler_maruyama_sampler(model, torch.randn(2, 1, 2, 2), torch.tensor([1, 2]), num_steps=5,
                           cfg_scale=1.0)
    assert all(c[0] == 2 for c in model.calls)


def test_cfg_mixes_conditional_and_unconditional():
    class LabelShift(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):  # v = y (as a constant field)
            return y.to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone(), []

    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    out = euler_sampler(LabelShift(), x, torch.tensor([2]), num_steps=4, cfg_scale=3.0)
    # guided velocity: 10 + 3·(2 - 10) = -14 over total time -1
    assert torch.allclose(out, torch.full_like(out, 14.0))


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_euler_maruyama_against_explicit_loop(seed, path_type):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1])
    steps, k = 6, 0.5
    torch.manual_seed(seed)
    got = euler_maruyama_sampler(Recorder(k), x, y, num_steps=steps, path_type=path_type)
    torch.manual_seed(seed)
    grid = torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    cur = x.clone()

    def drift(xc, t):
        if path_type == "linear":
            a, s, da, ds = 1 - t, t, -1.0, 1.0
        else:
            a, s = math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)
            da, ds = -math.pi / 2 * s, math.pi / 2 * a
        v = k * xc
        r = a / da
        score = (r * v - xc) / (s ** 2 - r * ds * s)
        return v - 0.5 * (2 * t) * score

    for t, t_next in zip(grid[:-2], grid[1:-1]):
        eps = torch.randn_like(cur)  # drawn before the model call
        dt = t_next - t
        cur = cur + drift(cur, t) * dt + math.sqrt(2 * t) * eps * math.sqrt(abs(dt))
    cur = cur + (grid[-1] - grid[-2]) * drift(cur, grid[-2])
    assert torch.allclose(got, cur, rtol=1e-10, atol=1e-12)


def test_score_of_gaussian_data(seed):
    # data x0 = 0 (a point mass): x_t = σ ε, v = dσ/dt · ε, score = -x_t / σ².
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    eps = torch.randn(5, 3, dtype=torch.float64)
    xt = t[:, None] * eps
    score = get_score_from_velocity(eps, xt, t, "linear")
    assert torch.allclose(score, -xt / t[:, None] ** 2)


def test_sampling_a_sit_is_deterministic_for_a_seed(seed):
    model = SiT(input_size=8, hidden_size=32, depth=2, num_heads=2, encoder_depth=1,
                num_classes=5, z_dims=[8], projector_dim=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 4])
    torch.manual_seed(1)
    a = euler_maruyama_sampler(model, x, y, num_steps=4, cfg_scale=1.5, guidance_high=0.7)
    torch.manual_seed(1)
    b = euler_maruyama_sampler(model, x, y, num_steps=4, cfg_scale=1.5, guidance_high=0.7)
    assert a.dtype == torch.float64 and torch.equal(a, b)
    ode = euler_sampler(model, x, y, num_steps=4, heun=True, cfg_scale=1.5)
    assert ode.shape == x.shape and torch.isfinite(ode).all()


def test_bad_steps():
    with pytest.raises(ValueError, match="num_steps must be a positive integer; got 0"):
        euler_sampler(Recorder(), torch.randn(1, 1, 1, 1), torch.tensor([0]), num_steps=0)
    with pytest.raises(ValueError, match="path_type"):
        euler_maruyama_sampler(Recorder(), torch.randn(1, 1, 1, 1), torch.tensor([0]),
                               path_type="edm")
