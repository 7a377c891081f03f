"""Sampling throughput (images/s): SDE (Euler-Maruyama) with CFG and a guidance interval, one
batch from noise to samples, repa_fast against an official-style sampler on the same inputs.

* ``official_style``: what the official ``generate.py`` runs by default: eager, fp32 model call
  (TF32 matmuls on GPU), timm's explicit attention (``fused_attn=False``), the full forward with
  the REPA projectors, step noise from the global RNG;
* ``repa_fast``: :mod:`repa_fast.generation`: bf16 autocast around the model call, the auto
  attention backend, projectors skipped, per-sample noise streams, and ``torch.compile`` on GPU.

Both use ``repa_fast.transport.samplers.euler_maruyama_sampler`` (float64 sampler state). The repa_fast
entry also runs the official-style model once more on its per-sample noise and records in
``extra_info`` how far the two sets of samples are apart (``rel_l2``, ``max_abs``) and whether
that is within bf16 tolerance (``agree_bf16``), over the first ``AGREE_STEPS`` steps' grid
(a shorter run: bf16-vs-fp32 drift shows there as well, and a 250-step fp32 run would double
the suite's time). On GPU: SiT-XL/2 at 256px (4×32×32 latents, batch 64), 250 SDE steps with
CFG 1.8 on t ≤ 0.7, the paper's FID recipe, one timed run per provider (about 2 min in all,
most of it the two compiles and the official-style run). A short untimed run first compiles both graphs (guided 2B and
unguided B rows) and warms the libraries, so the timed rounds are sampling only. On the CPU a
tiny model, so the command always works; its numbers say nothing about GPU speed.
"""
import pytest
import torch

from bench_utils import DEVICE, ON_GPU, timed
from repa_fast.generation import SamplerConfig, Velocity, initial_draws, sample_latents
from repa_fast.models import SiT_models
from repa_fast.transport.samplers import euler_maruyama_sampler

# name: (batch, input size, channels, classes, steps)
CASES = {"SiT-XL/2": (64, 32, 4, 1000, 250)} if ON_GPU else {"SiT-T/4": (4, 16, 3, 10, 6)}
WARMUP_STEPS = 4    # untimed: t = 1 (unguided) and t ≤ 0.7 (guided) both run, so both compile
AGREE_STEPS = 25    # the agreement check's run (see the module docstring)
ROUNDS = 1 if ON_GPU else 2  # one 250-step run is 250 model calls: time enough on its own
ENCODER_DEPTH = 8 if ON_GPU else 2
SAMPLER = dict(cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)
# Relative L2 distance of bf16 and fp32 samples taken as agreement: bf16 keeps 8 bits of
# mantissa (relative rounding 2⁻⁹ ≈ 0.002 per operation); a few dozen layers and steps of such
# rounding stay well below 5%, while a wrong sampler or wrong noise gives O(1).
BF16_REL_TOL = 0.05

_STATE: dict = {}


def weights(case: str) -> dict:
    """Random SiT weights with the zero-initialised layers (adaLN, final layer) filled in, so
    the velocity depends on x, t and y as a trained model's does; made once per case."""
    if case not in _STATE:
        batch, size, channels, classes, _ = CASES[case]
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised where it runs: seconds less for SiT-XL on GPU
            model = SiT_models[case](input_size=size, in_channels=channels,
                                     num_classes=classes, z_dims=[768],
                                     encoder_depth=ENCODER_DEPTH)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0.0, 0.02)
        _STATE[case] = model.state_dict()
    return _STATE[case]


def build(case: str, official: bool) -> torch.nn.Module:
    batch, size, channels, classes, _ = CASES[case]
    with torch.device(DEVICE):
        model = SiT_models[case](input_size=size, in_channels=channels, num_classes=classes,
                                 z_dims=[768], encoder_depth=ENCODER_DEPTH,
                                 fused_attn=not official, validate_inputs=False)
    model.load_state_dict(weights(case))
    return model.to(DEVICE).eval().requires_grad_(False)


def inputs(case: str):
    """Latents, labels and per-sample generators of samples 0 .. batch-1 (global seed 0)."""
    batch, size, channels, classes, _ = CASES[case]
    latents, labels, generators = initial_draws(range(batch), 0, classes, (channels, size, size))
    return latents.to(DEVICE), labels.to(DEVICE), generators


def fresh(generators):
    """Copies of generators at their current state (each sampling run consumes its streams)."""
    return [torch.Generator().set_state(g.get_state()) for g in generators]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["official_style", "repa_fast"])
def test_sde_sampling(benchmark, provider, case):
    batch, _, _, _, steps = CASES[case]
    latents, labels, generators = inputs(case)
    official = provider == "official_style"
    torch.backends.cuda.matmul.allow_tf32 = official  # the official default for its fp32 call
    if official:
        model = build(case, official=True)

        def sample(num_steps):
            return euler_maruyama_sampler(model, latents, labels, num_steps=num_steps, **SAMPLER)
    else:
        velocity = Velocity(build(case, official=False), autocast_dtype=torch.bfloat16,
                            compile=ON_GPU)

        def sample(num_steps):
            return sample_latents(velocity, latents, labels, fresh(generators),
                                  SamplerConfig(mode="sde", num_steps=num_steps, **SAMPLER))

    sample(min(steps, WARMUP_STEPS))
    samples = timed(benchmark, lambda: sample(steps), rounds=ROUNDS, warmup=0)
    info = benchmark.extra_info
    info.update(case=case, provider=provider, mode="sde", batch=batch, num_steps=steps,
                images_per_s=batch / benchmark.stats.stats.median,
                dtype="fp32 (TF32 on GPU)" if official else "bf16 autocast",
                compiled=not official and ON_GPU, **SAMPLER)
    if not official:
        agree_steps = min(steps, AGREE_STEPS)
        mine = samples if agree_steps == steps else sample(agree_steps)
        info.update(agreement(case, mine, latents, labels, generators, agree_steps),
                    agree_steps=agree_steps)
    torch.backends.cuda.matmul.allow_tf32 = False


def agreement(case, samples, latents, labels, generators, steps) -> dict:
    """The official-style fp32 model call on the same per-sample noise, against ``samples``."""
    reference = sample_latents(Velocity(build(case, official=True)), latents, labels,
                               fresh(generators), SamplerConfig(mode="sde", num_steps=steps,
                                                                **SAMPLER))
    diff = (samples - reference).float()
    rel = float(diff.norm() / reference.float().norm())
    return dict(rel_l2=rel, max_abs=float(diff.abs().max()), agree_bf16=rel < BF16_REL_TOL)
