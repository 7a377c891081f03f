"""Sampling throughput (images/s): SDE (Euler-Maruyama) with CFG and a guidance interval, one
batch from noise to samples, repa_fast against an official-style sampler on the same inputs.

* ``official_style``: what the official ``generate.py`` runs by default: eager, fp32 model call
  (TF32 matmuls on GPU), timm's explicit attention (``fused_attn=False``), the full forward with
  the REPA projectors, step noise from the global RNG;
* ``repa_fast``: :mod:`repa_fast.generation`: bf16 autocast around the model call, the auto
  attention backend, projectors skipped, per-sample noise streams, and ``torch.compile`` on GPU.

Both use ``repa_fast.sampling.euler_maruyama_sampler`` (float64 sampler state). The repa_fast
entry also runs the official-style model once more on its per-sample noise and records in
``extra_info`` how far the two sets of samples are apart (``rel_l2``, ``max_abs``) and whether
that is within bf16 tolerance (``agree_bf16``). SiT-XL/2 at 256px (4×32×32 latents, batch 64,
guidance on t ≤ 0.7 as in the paper's recipe) on GPU; on the CPU a tiny model, so the command
always works; its numbers say nothing about GPU speed.
"""
import pytest
import torch

from bench_utils import DEVICE, ON_GPU, timed
from repa_fast.generation import SamplerConfig, Velocity, initial_draws, sample_latents
from repa_fast.models import SiT_models
from repa_fast.sampling import euler_maruyama_sampler

# name: (batch, input size, channels, classes, steps)
CASES = {"SiT-XL/2": (64, 32, 4, 1000, 20)} if ON_GPU else {"SiT-T/4": (4, 16, 3, 10, 6)}
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
        model = SiT_models[case](input_size=size, in_channels=channels, num_classes=classes,
                                 z_dims=[768], encoder_depth=ENCODER_DEPTH)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0.0, 0.02)
        _STATE[case] = model.state_dict()
    return _STATE[case]


def build(case: str, official: bool) -> torch.nn.Module:
    batch, size, channels, classes, _ = CASES[case]
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

        def run():
            return euler_maruyama_sampler(model, latents, labels, num_steps=steps, **SAMPLER)
    else:
        velocity = Velocity(build(case, official=False), autocast_dtype=torch.bfloat16,
                            compile=ON_GPU)
        config = SamplerConfig(mode="sde", num_steps=steps, **SAMPLER)

        def run():
            return sample_latents(velocity, latents, labels, fresh(generators), config)

    samples = timed(benchmark, run, rounds=3 if ON_GPU else 2, warmup=1)
    info = benchmark.extra_info
    info.update(case=case, provider=provider, mode="sde", batch=batch, num_steps=steps,
                images_per_s=batch / benchmark.stats.stats.median,
                dtype="fp32 (TF32 on GPU)" if official else "bf16 autocast",
                compiled=not official and ON_GPU, **SAMPLER)
    if not official:
        info.update(agreement(case, samples, latents, labels, generators, steps))
    torch.backends.cuda.matmul.allow_tf32 = False


def agreement(case, samples, latents, labels, generators, steps) -> dict:
    """The official-style fp32 model call on the same per-sample noise, against ``samples``."""
    reference = sample_latents(Velocity(build(case, official=True)), latents, labels,
                               fresh(generators), SamplerConfig(mode="sde", num_steps=steps,
                                                                **SAMPLER))
    diff = (samples - reference).float()
    rel = float(diff.norm() / reference.float().norm())
    return dict(rel_l2=rel, max_abs=float(diff.abs().max()), agree_bf16=rel < BF16_REL_TOL)
