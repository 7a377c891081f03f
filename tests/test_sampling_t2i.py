"""Text-to-image samplers against the official ``samplers_t2i.py``; one t2i batch of
``generate`` (per-sample noise, the empty context, the model-call wrapper)."""
import pytest
import torch

from official_reference import official_t2i_euler_maruyama_sampler, official_t2i_euler_sampler
from repa_fast.generation.sample_batch import SamplerConfig
from repa_fast.generation.seeding import index_generator
from repa_fast.generation.t2i_sampling import (TextVelocity, initial_noise, null_context_batch,
                                               sample_t2i_latents)
from repa_fast.transport import samplers_t2i
from repa_fast.transport.samplers_t2i import euler_maruyama_sampler, euler_sampler

C, H, W, L, D = 2, 3, 3, 5, 4
TOL = 1e-5


class ToyText(torch.nn.Module):
    """``model(x, t, context=c) -> (v, [])``: a few fixed random linear maps, nonlinear in x and
    depending on t and on every token of the context. Records (batch, t, context) per call."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = C * H * W
        self.a = torch.nn.Parameter(torch.randn(n, n, generator=g) / n ** 0.5)
        self.b = torch.nn.Parameter(torch.randn(L * D, n, generator=g) / (L * D) ** 0.5)
        self.c = torch.nn.Parameter(torch.randn(n, generator=g))
        self.calls = []

    def forward(self, x, t, context):
        self.calls.append((x.shape[0], float(t[0]), context.clone()))
        h = x.flatten(1)
        ctx = context.flatten(1).to(x.dtype) @ self.b.to(x.dtype)
        v = torch.tanh(h @ self.a.to(x.dtype)) * (1 + t[:, None]) + ctx * t[:, None] \
            + self.c.to(x.dtype) * (1 - t[:, None]) - h
        return v.view_as(x), []


def inputs(n=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, C, H, W, generator=g).to(dtype)
    context = torch.randn(n, L, D, generator=g)
    empty = torch.randn(1, L, D, generator=g)
    return latents, context, empty.repeat(n, 1, 1)


# (cfg_scale, guidance_low, guidance_high): off; on everywhere; an interval that includes some
# steps and excludes others (with 8 steps, t = 0.75 and 0.25 lie on the ODE grid)
GUIDANCE = [(1.0, 0.0, 1.0), (1.8, 0.0, 1.0), (2.5, 0.25, 0.75), (4.0, 0.3, 0.6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("heun", [False, True])
def test_ode_equals_official(heun, guidance, dtype):
    cfg, low, high = guidance
    latents, y, y_null = inputs(dtype=dtype)
    kwargs = dict(num_steps=8, heun=heun, cfg_scale=cfg, guidance_low=low, guidance_high=high)
    got = euler_sampler(ToyText(), latents, y, y_null, **kwargs)
    ref = official_t2i_euler_sampler(ToyText(), latents, y, y_null, **kwargs)
    assert got.dtype == torch.float64
    assert (got - ref).abs().max() <= TOL


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_sde_equals_official(seed, guidance, path_type):
    cfg, low, high = guidance
    latents, y, y_null = inputs()
    kwargs = dict(num_steps=8, cfg_scale=cfg, guidance_low=low, guidance_high=high,
                  path_type=path_type)
    torch.manual_seed(seed)
    got = euler_maruyama_sampler(ToyText(), latents, y, y_null, **kwargs)
    torch.manual_seed(seed)
    ref = official_t2i_euler_maruyama_sampler(ToyText(), latents, y, y_null, **kwargs)
    assert (got - ref).abs().max() <= TOL


def test_guided_calls_pass_the_context_pair():
    latents, y, y_null = inputs()
    model = ToyText()
    euler_sampler(model, latents, y, y_null, num_steps=8, heun=True, cfg_scale=2.0,
                  guidance_low=0.3, guidance_high=0.6)
    t_grid = torch.linspace(1, 0, 9, dtype=torch.float64)
    step = 0
    for i in range(8):
        guided = 0.3 <= t_grid[i] <= 0.6
        calls = model.calls[step:step + (2 if i < 7 else 1)]
        step += len(calls)
        for batch, _, context in calls:  # the corrector follows t_cur's decision
            assert batch == (6 if guided else 3)
            assert torch.equal(context, torch.cat([y, y_null]) if guided else y)
    assert step == len(model.calls) == 15


@pytest.mark.parametrize("case", ["interval", "swapped null", "heun", "seed", "last step"])
def test_comparison_can_fail(case):
    """Near-misses of the official behaviour lie far outside the tolerance."""
    latents, y, y_null = inputs()
    kwargs = dict(num_steps=8, cfg_scale=2.5, guidance_low=0.25, guidance_high=0.75)
    torch.manual_seed(0)
    if case in ("seed", "last step"):
        got = euler_maruyama_sampler(ToyText(), latents, y, y_null, **kwargs)
    else:
        got = euler_sampler(ToyText(), latents, y, y_null, heun=True, **kwargs)
    torch.manual_seed(1 if case == "seed" else 0)
    if case == "interval":  # one grid point (t = 0.75) left out of the interval
        ref = official_t2i_euler_sampler(ToyText(), latents, y, y_null, heun=True,
                                         **dict(kwargs, guidance_high=0.74))
    elif case == "swapped null":
        ref = official_t2i_euler_sampler(ToyText(), latents, y_null, y, heun=True, **kwargs)
    elif case == "heun":
        ref = official_t2i_euler_sampler(ToyText(), latents, y, y_null, heun=False, **kwargs)
    elif case == "seed":
        ref = official_t2i_euler_maruyama_sampler(ToyText(), latents, y, y_null, **kwargs)
    else:  # one more step (the last step's grid and noise differ)
        ref = official_t2i_euler_maruyama_sampler(ToyText(), latents, y, y_null,
                                                  **dict(kwargs, num_steps=9))
    assert (got - ref).abs().max() > 1e3 * TOL


def test_bad_inputs_name_the_argument():
    latents, y, y_null = inputs()
    model = ToyText()
    for sampler in (euler_sampler, euler_maruyama_sampler):
        with pytest.raises(ValueError, match="num_steps must be a positive integer; got 0"):
            sampler(model, latents, y, y_null, num_steps=0)
        with pytest.raises(ValueError, match=r"^y \(the text context\).*N=3; got shape \[2"):
            sampler(model, latents, y[:2], y_null)
        with pytest.raises(ValueError, match=r"^y \(the text context\).*got 'list'"):
            sampler(model, latents, [0, 1, 2], y_null)
        with pytest.raises(ValueError, match=r"^y_null .*\[3, 5, 4\].*got shape \[1, 5, 4\]"):
            sampler(model, latents, y, y_null[:1], cfg_scale=2.0)
        with pytest.raises(ValueError, match=r"^y_null .*required with cfg_scale > 1"):
            sampler(model, latents, y, None, cfg_scale=2.0)
        with pytest.raises(ValueError, match=r"^latents must be a tensor"):
            sampler(model, latents.numpy(), y, y_null)
        sampler(model, latents, y, None, num_steps=2)  # no guidance: no null context needed
    with pytest.raises(ValueError, match="path_type"):
        euler_maruyama_sampler(model, latents, y, y_null, path_type="edm")
    assert not model.calls or all(batch == 3 for batch, _, _ in model.calls)


def test_exports():
    import repa_fast.transport as transport
    assert transport.samplers_t2i is samplers_t2i
    assert samplers_t2i.euler_sampler is euler_sampler


# ------------------------------------------------------------------ one batch of generate

def batch_config(mode, **kw):
    base = dict(mode=mode, num_steps=6, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.7)
    return SamplerConfig(**dict(base, **kw))


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_batch_equals_sampler_fed_the_same_noise(mode):
    """Sample i of a batch = the t2i sampler run on sample i alone, with z and the SDE noise of
    sample i's stream (for a batch of one, the global RNG holding that stream's state gives
    ``randn_like`` exactly those numbers), and the empty context repeated."""
    seed, indices = 123, [4, 5, 6]
    latents, generators = initial_noise(indices, seed, (C, H, W))
    _, context, empty = inputs(len(indices))
    config = batch_config(mode, heun=mode == "ode")
    got = sample_t2i_latents(TextVelocity(ToyText()), latents, context, empty[0], generators,
                             config)
    assert got.dtype == torch.float64 and got.shape == latents.shape
    sampler = euler_sampler if mode == "ode" else euler_maruyama_sampler
    state = torch.get_rng_state()
    try:
        for row, index in enumerate(indices):
            gen = index_generator(seed, index)
            z = torch.randn((1, C, H, W), generator=gen)
            assert torch.equal(z, latents[row:row + 1])
            torch.set_rng_state(gen.get_state())
            ref = sampler(ToyText(), z, context[row:row + 1], empty[:1], num_steps=6,
                          heun=config.heun, cfg_scale=2.0, guidance_high=0.7)
            assert (got[row] - ref[0]).abs().max() <= TOL
    finally:
        torch.set_rng_state(state)


def test_batch_sde_does_not_depend_on_the_batch():
    seed, shape = 7, (C, H, W)
    _, context, empty = inputs(4)
    config = batch_config("sde")
    velocity = TextVelocity(ToyText())
    lat, gens = initial_noise([0, 1, 2, 3], seed, shape)
    whole = sample_t2i_latents(velocity, lat, context, empty[:1], gens, config)
    lat, gens = initial_noise([2, 3], seed, shape)
    part = sample_t2i_latents(velocity, lat, context[2:], empty[:1], gens, config)
    assert (whole[2:] - part).abs().max() <= TOL
    assert (whole[0] - whole[1]).abs().max() > 1e-2  # different streams, different samples


def test_text_velocity_wraps_the_model_call():
    model = ToyText()
    latents, y, _ = inputs(dtype=torch.float32)
    t = torch.full((3,), 0.3)
    (v,) = TextVelocity(model)(latents, t, y)
    assert torch.equal(v, model(latents, t, context=y)[0])
    (low,) = TextVelocity(model, autocast_dtype=torch.bfloat16)(latents, t, y)
    # the matmuls ran in bf16: close to, not equal to, the float32 output
    assert not torch.equal(low.float(), v) and torch.allclose(low.float(), v, atol=0.1)
    assert text_velocity_num_classes_is_none(model)


def text_velocity_num_classes_is_none(model) -> bool:
    """A model without ``num_classes`` (MMDiT) builds: no CFG null label is read."""
    return not hasattr(model, "num_classes") and TextVelocity(model).num_classes is None


def test_text_velocity_skips_the_projectors_when_it_can():
    class WithHidden(ToyText):
        def forward(self, x, t, context):  # (v, zs): the projectors would run here
            raise AssertionError("forward called")

        def forward_with_hidden(self, x, t, y=None, context=None):
            return ToyText.forward(self, x, t, context)[0], None

    latents, y, _ = inputs(dtype=torch.float32)
    t = torch.full((3,), 0.6)
    (v,) = TextVelocity(WithHidden())(latents, t, y)
    assert torch.equal(v, ToyText()(latents, t, context=y)[0])


def test_null_context_batch_shapes():
    _, context, empty = inputs(3)
    for null in (empty[0], empty[:1], empty):
        out = null_context_batch(null, context)
        assert out.shape == context.shape and torch.equal(out, empty)
    with pytest.raises(ValueError, match=r"^null_context .*\[3, 5, 4\]; got shape \[2, 5, 4\]"):
        null_context_batch(empty[:2], context)
    with pytest.raises(ValueError, match=r"^null_context .*got 'NoneType'"):
        null_context_batch(None, context)
    with pytest.raises(ValueError, match=r"^context must be a tensor \[N, L, D\]"):
        null_context_batch(empty[0], context[0])


def test_batch_bad_inputs():
    latents, generators = initial_noise([0, 1, 2], 0, (C, H, W))
    _, context, empty = inputs(3)
    velocity = TextVelocity(ToyText())
    with pytest.raises(ValueError, match=r"^mode must be one of ode, sde; got 'edm'"):
        sample_t2i_latents(velocity, latents, context, empty, generators, batch_config("edm"))
    with pytest.raises(ValueError, match=r"^generators .* 3; got 2"):
        sample_t2i_latents(velocity, latents, context, empty, generators[:2],
                           batch_config("sde"))
    with pytest.raises(ValueError, match=r"^null_context"):
        sample_t2i_latents(velocity, latents, context, None, generators, batch_config("ode"))
    out = sample_t2i_latents(velocity, latents, context, None, generators,
                             batch_config("ode", cfg_scale=1.0, num_steps=2))
    assert out.shape == latents.shape
