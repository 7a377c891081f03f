"""DiT (facebookresearch/DiT) on its Gaussian diffusion: one training step, and DDPM sampling
with 250 respaced steps and classifier-free guidance, repa_fast against original-style code in
the same run. On GPU: DiT-XL/2 (and DiT-B/2 for training) on 256 px latents (32×32×4); the
REPA rows use a DINOv2-B encoder (random weights: speed does not depend on them) on 256 px
images. On the CPU a tiny DiT (DiT-T/4) with the demo encoder, so the command always works; its
numbers say nothing about GPU speed.

The original-style rows run on :class:`OriginalStyleDiffusion`, repa_fast's ``SpacedDiffusion``
made to move data as the original's does: every table look-up copies its numpy table to the
device and materialises the broadcast (``_extract_into_tensor``), every model call builds the
timestep map from a Python list (``_WrappedModel``) and every sampling step its timesteps
(``p_sample_loop_progressive``): about 10 copies per sampling step and 16 per training step,
each of which, on a GPU, makes the host wait until the work queued before it is done (a
blocking copy from pageable memory), so the host cannot run ahead of the GPU. repa_fast keeps
the tables on the device.

``test_dit_train_step`` (images/s, MFU, peak memory):

* ``original``: DiT's ``train.py`` step (one process, no DDP): fp32 with TF32 matmuls, eager,
  explicit attention (``fused_attn=False``: the timm of DiT's release; timm's ``Attention``
  calls SDPA since 0.9), ``t = randint(0, 1000)``, ``training_losses`` of
  ``create_diffusion(timestep_respacing="")`` (ε-MSE + the bound's term of the learned σ),
  AdamW(lr 1e-4, no weight decay), EMA per parameter (decay 0.9999), ``loss.item()`` every step
  as its running loss does; no REPA. The VAE encoding ``train.py`` runs per step is left out
  (every provider starts from latents);
* ``original_repa``: the same step plus REPA as the official REPA code adds it: the model
  returns the projections of the hidden states after block 8 (2 on the CPU), the encoder runs
  without grad in fp16 autocast (test_bench_train.py's official step), loss.py's per-sample
  projection loop, ``loss = diffusion loss + 0.5 · proj_loss``;
* ``repa_fast``: :class:`repa_fast.training.step.TrainStep`, the step ``repa_fast.train
  --model DiT-...`` runs, with the project's defaults (``TrainConfig(model="DiT-...")``: bf16
  autocast on GPU, the auto attention backend, the fused alignment op, ``torch.compile`` of
  DiT and encoder on CUDA, clipping, fused AdamW with the device-side non-finite skip, the
  foreach EMA, timesteps and noise drawn on the device), fed with VAE moments, images and
  labels as the loader gives them.

MFU = images/s × FLOPs per image (``repa_fast.training.metrics.flops_per_image``, SiT's count,
which fits DiT: blocks and projectors, forward + backward; the encoder's forward, DiT's doubled
output layer and the diffusion's elementwise terms are not counted) / the card's measured bf16
matmul peak, the same ceiling for every row (the original rows run TF32).

``test_dit_ddpm_sampling`` (images/s of one batch from noise to latents; VAE decoding left out):

* ``original``: DiT's ``sample_ddp.py``: fp32 with TF32, eager, explicit attention, a batch of
  32 samples doubled for guidance (labels ``[y; null]``), ``create_diffusion("250")``,
  ``p_sample_loop(model.forward_with_cfg, ..., clip_denoised=False, cfg_scale=1.5)``, step
  noise from the global RNG;
* ``repa_fast``: what ``python -m repa_fast.generate --model DiT-XL/2 --num-sampling-steps 250
  --cfg-scale 1.5`` runs: :func:`repa_fast.generation.dit_sampling.sample_dit_latents` with
  :class:`~repa_fast.generation.dit_sampling.DiTOutput` (fp32 with TF32 as the original, the
  auto attention backend, ``torch.compile`` on CUDA) and per-sample noise streams.

A short untimed run first compiles the graph and warms the libraries. The two samplers draw
their step noise from different streams, so their DDPM samples cannot agree by construction;
the repa_fast entry records in ``extra_info`` whether the two agree in a deterministic setting
instead: DDIM with η = 0 over ``AGREE_STEPS`` respaced steps (``"ddim25"``), where only the
initial noise (the same for both) matters — the original-style ``ddim_sample_loop`` on the
explicit-attention eager model against repa_fast's sampler and call (``rel_l2``, ``max_abs``,
``agree``). That repa_fast's DDPM loop equals ``p_sample_loop`` fed the same noise is checked
by ``tests/test_generate_dit.py``.
"""
import contextlib
import copy

import numpy as np
import pytest
import torch

from bench_utils import (DEVICE, ON_GPU, loader_step, official_projection_loss,
                         record_memory_and_mfu, timed)
from test_bench_train import make_encoder
from repa_fast.diffusion import (SpacedDiffusion, create_diffusion, extract_into_tensor,
                                 get_named_beta_schedule)
from repa_fast.generation.dit_sampling import DiTOutput, DiTSamplerConfig, sample_dit_latents
from repa_fast.generation.seeding import initial_draws
from repa_fast.models import DiT_models
from repa_fast.training.build import build_model
from repa_fast.training.config import TrainConfig
from repa_fast.training.metrics import flops_per_image
from repa_fast.training.step import TrainStep

# training: name: (batch, latent size, channels)
CASES = {"DiT-B/2": (64, 32, 4), "DiT-XL/2": (32, 32, 4)} if ON_GPU else {"DiT-T/2": (8, 16, 4)}
ENCODER_DEPTH = 8 if ON_GPU else 2
PROJ_COEFF = 0.5
EMA_DECAY = 0.9999
# sampling: name: (samples per batch, latent size, channels, classes); sample_ddp.py's
# --per-proc-batch-size 32, doubled for guidance
SAMPLE_CASES = {"DiT-XL/2": (32, 32, 4, 1000)} if ON_GPU else {"DiT-T/4": (2, 16, 4, 10)}
SAMPLING_STEPS = 250  # sample_ddp.py's --num-sampling-steps, on the CPU as well
CFG_SCALE = 1.5
WARMUP_STEPS = 4      # untimed: compiles the (one) guided graph
AGREE_STEPS = 25      # the agreement check's DDIM run (see the module docstring)
ROUNDS = 1 if ON_GPU else 2  # one 250-step run is 250 model calls: time enough on its own
# Relative L2 distance taken as agreement. Both samplers run fp32 model calls; on GPU with TF32
# matmuls (10-bit mantissa, relative rounding 2⁻¹¹ ≈ 5e-4) and different attention kernels and
# summation orders: over 25 steps that stays well below 1%, where a wrong table, timestep or
# guidance gives O(1). On the CPU (plain fp32) the two differ by rounding only.
AGREE_REL_TOL = 1e-2 if ON_GPU else 1e-4


class OriginalStyleDiffusion(SpacedDiffusion):
    """The respaced diffusion moving data as DiT's does (see the module docstring); the
    arithmetic is repa_fast's, so both give the same numbers."""

    def extract(self, name, t, shape):
        # _extract_into_tensor: the table copied to the device at every look-up, the broadcast
        # materialised by adding zeros of the full shape
        return extract_into_tensor(getattr(self, name), t, shape) + torch.zeros(shape,
                                                                                device=t.device)

    def original_timesteps(self, ts):
        # _WrappedModel.__call__: the map built from a Python list at every model call
        return torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)[ts]

    def _loop(self, model, shape, noise, device, progress, generator, step):
        # p_sample_loop_progressive: t = tensor([i] * N, device=device) at every step
        indices = iter(reversed(range(self.num_timesteps)))

        def step_with_host_timesteps(x, t):
            return step(x, torch.tensor([next(indices)] * shape[0], device=t.device))
        return super()._loop(model, shape, noise, device, progress, generator,
                             step_with_host_timesteps)


def original_diffusion(respacing: str) -> OriginalStyleDiffusion:
    """``create_diffusion(respacing)`` (DiT's defaults: linear betas, 1000 steps, learned
    range σ, MSE loss) as an :class:`OriginalStyleDiffusion`."""
    spaced = create_diffusion(respacing)
    diffusion = OriginalStyleDiffusion(
        use_timesteps=spaced.use_timesteps,
        betas=get_named_beta_schedule("linear", spaced.original_num_steps),
        model_mean_type=spaced.model_mean_type, model_var_type=spaced.model_var_type,
        loss_type=spaced.loss_type)
    assert np.array_equal(diffusion.betas, spaced.betas), "create_diffusion's defaults changed"
    return diffusion


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions on (DiT's train.py and sample_ddp.py) or off, restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def update_ema(ema_model, model, decay=EMA_DECAY):
    """DiT's train.py update_ema: one mul_/add_ pair per parameter, in a Python loop."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


# --------------------------------------------------------------------------- training step

def original_step(case, encoder, image_size):
    """DiT's train.py step (with REPA when ``encoder`` is given) and the model it trains."""
    batch, size, channels = CASES[case]
    model = DiT_models[case](input_size=size, in_channels=channels,
                             z_dims=[encoder.embed_dim] if encoder is not None else [],
                             encoder_depth=ENCODER_DEPTH, fused_attn=False,
                             validate_inputs=False).to(DEVICE).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    diffusion = original_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch, channels, size, size, device=DEVICE)
    y = torch.randint(0, 1000, (batch,), device=DEVICE)
    if encoder is not None:
        images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                               device=DEVICE)

    def diffusion_loss(eps_model):
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=DEVICE)
        return diffusion.training_losses(eps_model, x, t, dict(y=y))["loss"].mean()

    def repa_loss():
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.float16, enabled=ON_GPU):
            zs = [encoder(images)]
        found = {}

        def eps_model(x_t, t, **kwargs):
            # the diffusion takes one tensor; the projections leave through ``found``
            out, found["zs_tilde"] = model(x_t, t, **kwargs)
            return out
        loss = diffusion_loss(eps_model)
        return loss + PROJ_COEFF * official_projection_loss(zs, found["zs_tilde"])

    def step():
        loss = repa_loss() if encoder is not None else diffusion_loss(model.predict)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model)
        return loss.item()  # train.py: running_loss += loss.item(), every step

    return model, step


def repa_fast_step(case, encoder, image_size):
    """``TrainStep`` with the project's defaults for a DiT; inputs as the loader hands them
    over (host tensors, pinned on CUDA)."""
    batch, size, channels = CASES[case]
    config = TrainConfig(model=case, encoder_depth=ENCODER_DEPTH,
                         mixed_precision="bf16" if ON_GPU else "no", batch_size=batch)
    model = build_model(config, channels, size, [encoder.embed_dim]).to(DEVICE).train()
    train_step = TrainStep.build(config, model, [encoder], DEVICE, x_shape=(channels, size, size),
                                 latents_scale=0.18215)
    labels = torch.randint(0, 1000, (batch,), pin_memory=ON_GPU)
    return model, loader_step(train_step, labels, image_size)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["original", "original_repa", "repa_fast"])
def test_dit_train_step(benchmark, provider, case):
    batch = CASES[case][0]
    encoder, image_size = make_encoder() if provider != "original" else (None, None)
    if encoder is not None:
        encoder = encoder.to(DEVICE)
    original = provider != "repa_fast"
    # DiT's train.py turns TF32 on; repa_fast.train leaves it off (--allow-tf32) and runs bf16
    with tf32(original):
        if original:
            model, step = original_step(case, encoder, image_size)
        else:
            model, step = repa_fast_step(case, encoder, image_size)
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
        timed(benchmark, step, flops=flops_per_image(model) * batch,
              rounds=20 if ON_GPU else 3, warmup=3 if ON_GPU else 1)
    info = benchmark.extra_info
    info.update(case=case, provider=provider, batch=batch, repa=provider != "original",
                images_per_s=batch / benchmark.stats.stats.median,
                dtype=("fp32 (TF32 on GPU)" if original
                       else "bf16 autocast" if ON_GPU else "fp32"),
                compiled=not original and ON_GPU)
    record_memory_and_mfu(info)


# --------------------------------------------------------------------------- DDPM sampling

_WEIGHTS: dict = {}


def weights(case: str) -> dict:
    """Random DiT weights with the zero-initialised layers (adaLN, final layer) filled in, so
    the output depends on x, t and y as a trained model's does; made once per case."""
    if case not in _WEIGHTS:
        _, size, channels, classes = SAMPLE_CASES[case]
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised where it runs: seconds less for DiT-XL on GPU
            model = DiT_models[case](input_size=size, in_channels=channels,
                                     num_classes=classes)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0.0, 0.02)
        _WEIGHTS[case] = model.state_dict()
    return _WEIGHTS[case]


def sampling_model(case: str, original: bool) -> torch.nn.Module:
    """The DiT of an original checkpoint (no projectors), in eval mode without gradients:
    explicit attention for the original, the auto backend (``generate``'s default) else."""
    _, size, channels, classes = SAMPLE_CASES[case]
    with torch.device(DEVICE):
        model = DiT_models[case](input_size=size, in_channels=channels, num_classes=classes,
                                 fused_attn=not original, validate_inputs=False)
    model.load_state_dict(weights(case))
    return model.eval().requires_grad_(False)


def fresh(generators):
    """Copies of generators at their current state (each sampling run consumes its streams)."""
    return [torch.Generator().set_state(g.get_state()) for g in generators]


def original_sample(model, diffusion, latents, labels, loop="p_sample_loop"):
    """sample_ddp.py's batch: ``[z; z]`` with labels ``[y; null]`` through ``forward_with_cfg``;
    the guided half is kept."""
    n = latents.shape[0]
    z = torch.cat([latents, latents], 0)
    y = torch.cat([labels, torch.tensor([model.num_classes] * n, device=DEVICE)], 0)
    samples = getattr(diffusion, loop)(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                       model_kwargs=dict(y=y, cfg_scale=CFG_SCALE),
                                       progress=False, device=DEVICE)
    return samples.chunk(2, dim=0)[0]


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
@pytest.mark.parametrize("provider", ["original", "repa_fast"])
def test_dit_ddpm_sampling(benchmark, provider, case):
    batch, size, channels, classes = SAMPLE_CASES[case]
    latents, labels, generators = initial_draws(range(batch), 0, classes, (channels, size, size))
    latents, labels = latents.to(DEVICE), labels.to(DEVICE)
    original = provider == "original"
    model = sampling_model(case, original)
    if original:
        def sampler(steps):
            diffusion = original_diffusion(str(steps))
            return lambda: original_sample(model, diffusion, latents, labels)
    else:
        call = DiTOutput(model, cfg_scale=CFG_SCALE, compile=ON_GPU)

        def sampler(steps):
            config = DiTSamplerConfig(num_sampling_steps=steps, cfg_scale=CFG_SCALE)
            diffusion = config.diffusion()  # once per run, as generate makes it
            return lambda: sample_dit_latents(call, diffusion, latents, labels,
                                              fresh(generators), config)
    with tf32(True), torch.no_grad():  # sample_ddp.py's --tf32 default; generate's --tf32 too
        sampler(WARMUP_STEPS)()
        # forward FLOPs of the 2B guided rows per step (flops_per_image counts fwd + bwd)
        flops = flops_per_image(model) / 3 * 2 * batch * SAMPLING_STEPS
        timed(benchmark, sampler(SAMPLING_STEPS), flops=flops, rounds=ROUNDS, warmup=0)
        info = benchmark.extra_info
        info.update(case=case, provider=provider, mode="ddpm", batch=batch,
                    model_batch=2 * batch, num_steps=SAMPLING_STEPS, cfg_scale=CFG_SCALE,
                    images_per_s=batch / benchmark.stats.stats.median,
                    dtype="fp32 (TF32 on GPU)", compiled=not original and ON_GPU,
                    attention="math (explicit)" if original else "auto")
        if not original:
            info.update(agreement(case, call, latents, labels, generators),
                        agree_steps=AGREE_STEPS, agree_sampler="ddim (eta 0)")


def agreement(case, call, latents, labels, generators) -> dict:
    """The original-style DDIM (η = 0) sampler on the eager explicit-attention model against
    repa_fast's sampler and ``call`` from the same initial noise, ``AGREE_STEPS`` steps."""
    config = DiTSamplerConfig(sampler="ddim", num_sampling_steps=AGREE_STEPS,
                              cfg_scale=CFG_SCALE)
    mine = sample_dit_latents(call, config.diffusion(), latents, labels, fresh(generators),
                              config)
    reference = original_sample(sampling_model(case, original=True),
                                original_diffusion(config.respacing), latents, labels,
                                loop="ddim_sample_loop")
    diff = (mine - reference).float()
    rel = float(diff.norm() / reference.float().norm())
    return dict(rel_l2=rel, max_abs=float(diff.abs().max()), agree=rel < AGREE_REL_TOL)
