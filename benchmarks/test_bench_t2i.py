"""Text-to-image MMDiT (the official REPA ``train_t2i.py`` / ``generate_t2i.py``): one REPA
training step, and ODE sampling with classifier-free guidance, repa_fast against
official-style code in the same run. On GPU: MMDiT-d24/2 (the official model: depth 24, hidden
768, 24 heads of 32) on 256 px latents (32×32×4, 256 image tokens) with 77×768 caption
contexts (random, standing in for the CLIP ViT-L/14 features of MS-COCO captions) and a
DINOv2-B encoder (random weights: speed does not depend on them) on 256 px images. On the CPU
a tiny MMDiT-d4/4 on 32 px pixel space (64 image tokens) with 16×64 contexts and the demo
encoder, so the command always works; its numbers say nothing about GPU speed.

``test_t2i_train_step`` (images/s, MFU, peak memory):

* ``official_style``: ``train_t2i.py``'s step (one process): fp16 autocast (bf16 where fp16 is
  unsupported) with GradScaler, eager, attention by ``F.scaled_dot_product_attention`` (the
  official MMDiT's call: ``attn_backend="sdpa"``), the model called as ``model(x, t,
  context=context)`` returning ``(v, zs)``, SILoss's velocity MSE and loss.py's per-sample
  projection loop, ``loss + 0.5 · proj_loss``, AdamW (lr 1e-4, no weight decay), clipping at
  1.0, EMA per parameter; the encoder without grad in the same autocast. The contexts come
  from the host as its ``CFGDataset`` makes them: each row replaced by the empty caption's
  context with p = 0.1 (``random.random()``) and the batch pinned, in the untimed ``setup``
  (the DataLoader's workers do this beside the step); the step copies it to the device
  (``context.to(device)``, blocking). Latents and images are already on the device, as in
  test_bench_train.py's official step;
* ``repa_fast``: :class:`repa_fast.training.step.TrainStep`, the step ``repa_fast.train
  --model MMDiT-...`` runs, with the project's defaults (``TrainConfig(model="MMDiT-...")``:
  bf16 autocast on GPU, the auto attention backend, the fused alignment op, ``torch.compile``
  of MMDiT and encoder on CUDA, clipping, fused AdamW with the device-side non-finite skip, the
  foreach EMA, times, noise and the CFG dropout drawn on the device, the empty caption swapped
  in on the device, :meth:`~repa_fast.training.step.TrainStep.condition`), fed with VAE
  moments, images and contexts as the loader gives them (host tensors, pinned on CUDA).

MFU = images/s × FLOPs per image (``repa_fast.training.metrics.flops_per_image(model,
context_shape=(L, C))``: joint blocks over the T + L tokens, context embedder and projector,
forward + backward; the encoder's forward is not counted) / the card's measured bf16 matmul
peak. ``peak_mem_gib`` is the step's peak allocated memory. The batch can be changed with
``REPA_BENCH_TRAIN_BATCH`` (and ``REPA_BENCH_GRAD_CKPT=1``), as for test_bench_train.py. On the
CPU the demo encoder (a tiny random ViT, patch 8) runs on 64 px images so that its 8×8 grid
matches the model's and the official per-sample loop applies (the official code cannot pool).

``test_t2i_sampling`` (images/s of one batch from noise to latents; VAE decoding left out):
``generate_t2i.py``'s defaults, ODE (Euler) with 50 steps and CFG 1.5 on the whole interval
(``--mode ode --num-steps 50 --cfg-scale 1.5 --guidance-low 0 --guidance-high 1``; the 4.0 of
``train_t2i.py``'s sample grids is not a generation default), so every step runs the guided
batch ``[x; x]`` with ``context = [c; c_empty]``:

* ``official_style``: ``samplers_t2i.euler_sampler(model, z, context, y_null.repeat(N, 1, 1),
  num_steps=50, cfg_scale=1.5, ...)`` as ``generate_t2i.py`` calls it: eager fp32 model call
  (TF32 matmuls on GPU, its ``--tf32`` default), SDPA attention, the full forward with the
  REPA projector;
* ``repa_fast``: what ``python -m repa_fast.generate`` runs for an MMDiT checkpoint
  (``make_draw``): :class:`~repa_fast.generation.t2i_sampling.TextVelocity` (bf16 autocast on
  GPU, fp32 on the CPU; ``torch.compile`` on CUDA; projectors skipped), the auto attention
  backend, :func:`~repa_fast.generation.t2i_sampling.sample_t2i_latents` with
  :class:`~repa_fast.generation.sample_batch.SamplerConfig` and the empty caption given once
  as [L, D]; TF32 on, as generate's ``--tf32`` default.

Both start from the same initial noise (:func:`~repa_fast.generation.t2i_sampling.
initial_noise`, sample i's stream; the official draws ``z`` from the global RNG, which only
changes which noise, not the work) and the same contexts. A short untimed run first compiles
the (one, guided) graph and warms the libraries. TFLOP/s counts the model's forward without
the projector (the work a sampler needs), 2B rows per step.

The ODE is deterministic, so the repa_fast entry records in ``extra_info`` how far its samples
are from the official-style ones over the same 50 steps (``rel_l2``, ``max_abs``) and whether
that is within tolerance (``agree``). The tolerance (``agree_tolerance``) is the smaller of the
dtype's (bf16 against fp32 on GPU: 5%; the CPU runs fp32 both sides: 1e-4) and a quarter of
``control_rel_l2``, the distance between the official-style samples of the right captions and
of wrong ones (each row given the next row's context): agreement then also says that a wrong
context or guidance would have been caught. The sampling weights are random (PyTorch's default
initialisation, as the official trains from) with the q and k rows of every attention scaled
by ``QK_SCALE`` = 3: at the plain initialisation the joint attention is nearly uniform, the
text barely steers the image tokens and a wrong caption moves the samples by only ~0.25%
(MMDiT-d4/4, measured), less than bf16 rounding may; sharpened, ~2%.
"""
import copy
import os
import random

import pytest
import torch

from bench_utils import (DEVICE, ON_GPU, loader_step, official_projection_loss,
                         record_memory_and_mfu, timed)
from test_bench_dit import tf32
from test_bench_train import ema_official, make_encoder
from repa_fast.generation.sample_batch import SamplerConfig
from repa_fast.generation.t2i_sampling import TextVelocity, initial_noise, sample_t2i_latents
from repa_fast.models import MMDiT_models
from repa_fast.training.build import build_model
from repa_fast.training.config import TrainConfig
from repa_fast.training.metrics import flops_per_image
from repa_fast.training.step import TrainStep
from repa_fast.transport import SILoss
from repa_fast.transport.samplers_t2i import euler_sampler

# training: name: (batch, latent size, channels, (context length, width))
CASES = ({"MMDiT-d24/2": (32, 32, 4, (77, 768))} if ON_GPU
         else {"MMDiT-d4/4": (8, 32, 3, (16, 64))})
if os.environ.get("REPA_BENCH_TRAIN_BATCH"):
    CASES = {k: (int(os.environ["REPA_BENCH_TRAIN_BATCH"]), *v[1:]) for k, v in CASES.items()}
GRAD_CKPT = os.environ.get("REPA_BENCH_GRAD_CKPT") == "1"
ENCODER_DEPTH = 8 if ON_GPU else 2
LATENTS_SCALE = 0.18215 if ON_GPU else 1.0  # SD-VAE latents; the CPU case is pixel space
P_UNCOND = 0.1     # MSCOCO256Features' CFGDataset (train_t2i.py's --cfg-prob too)
PROJ_COEFF = 0.5   # train_t2i.py's --proj-coeff
# sampling: name: (batch, latent size, channels, (context length, width))
SAMPLE_CASES = ({"MMDiT-d24/2": (64, 32, 4, (77, 768))} if ON_GPU
                else {"MMDiT-d4/4": (2, 32, 3, (16, 64))})
# generate_t2i.py's defaults (and repa_fast.generate's): ODE, 50 steps, CFG 1.5 on [0, 1]
SAMPLER = dict(num_steps=50, heun=False, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0,
               path_type="linear")
WARMUP_STEPS = 2   # untimed: every step is guided, so this compiles the one (2B) graph
ROUNDS = 3 if ON_GPU else 2
# Relative L2 distance of the two samples taken as agreement: below the dtype's tolerance and
# below AGREE_FRACTION of the distance a wrong caption makes (``control_rel_l2``: the
# official-style samples with every row given the next row's context), so the check can tell a
# wrong context or guidance from rounding. GPU: bf16 (8-bit mantissa, relative rounding 2⁻⁹ per
# operation) against fp32/TF32, as test_bench_generate.py; CPU: both fp32 with the same maths.
DTYPE_REL_TOL = 5e-2 if ON_GPU else 1e-4
AGREE_FRACTION = 0.25
# Attention sharpening of the random sampling weights (module docstring): q and k rows of
# every qkv scaled by this, the attention logits by its square.
QK_SCALE = 3.0


def make_t2i_encoder():
    """DINOv2-B at 256 px on GPU (test_bench_train.py's); on the CPU the demo encoder at 64 px,
    whose 8×8 grid matches the MMDiT-d4/4's on 32 px (module docstring)."""
    if ON_GPU:
        return make_encoder()
    from repa_fast.training.demo_encoder import demo_encoder
    return demo_encoder(64, "random"), 64  # speed only: untrained weights will do


def empty_context(length: int, width: int) -> torch.Tensor:
    """A stand-in for the empty caption's [L, D] features (fixed, so every row shares it)."""
    return torch.randn(length, width, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- training step

class OfficialT2ILoss(SILoss):
    """SILoss calling the model as ``train_t2i.py`` does (``model(x, t, context=context)`` ->
    ``(v, zs_tilde)``), with loss.py's per-sample projection loop."""

    def __init__(self):
        super().__init__(fused=False)

    def __call__(self, model, images, model_kwargs=None, zs=None):
        out = {}

        def capture(*args, **kwargs):
            v, out["zs_tilde"] = model(*args, **kwargs)
            return v, out["zs_tilde"]

        # no zs here: SILoss would compute its own (vectorised) projection loss as well
        loss, _ = super().__call__(capture, images, model_kwargs)
        return loss, official_projection_loss(zs, out["zs_tilde"])


def official_step(case, encoder, image_size):
    """``train_t2i.py``'s step, the model it trains and the untimed ``setup`` that makes each
    step's contexts as its data loader does."""
    batch, size, channels, (length, width) = CASES[case]
    model = MMDiT_models[case](input_size=size, in_channels=channels,
                               z_dims=[encoder.embed_dim], encoder_depth=ENCODER_DEPTH,
                               context_dim=width, attn_backend="sdpa",
                               validate_inputs=False).to(DEVICE).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    loss_fn = OfficialT2ILoss()
    half = torch.float16 if ON_GPU else torch.bfloat16
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=half == torch.float16)
    x = torch.randn(batch, channels, size, size, device=DEVICE)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                           device=DEVICE)
    captions = torch.randn(batch, length, width)  # the data set's stored caption features
    empty = empty_context(length, width)
    rng = random.Random(0)
    loaded = {}

    def load_batch():
        # CFGDataset.__getitem__ per sample, then default_collate and pin_memory=True
        rows = [empty if rng.random() < P_UNCOND else row for row in captions]
        context = torch.stack(rows)
        loaded["context"] = context.pin_memory() if ON_GPU else context

    def step():
        context = loaded["context"].to(DEVICE)
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=half, enabled=ON_GPU):
            zs = [encoder(images)]
        with torch.autocast(DEVICE.type, dtype=half, enabled=ON_GPU):
            loss, proj = loss_fn(model, x, dict(context=context), zs=zs)
            total = loss.mean() + PROJ_COEFF * proj.mean()
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema_official(ema, model)

    return model, step, load_batch


def repa_fast_step(case, encoder, image_size):
    """``TrainStep`` with the project's defaults for an MMDiT; inputs as the loader hands them
    over (host tensors, pinned on CUDA)."""
    batch, size, channels, (length, width) = CASES[case]
    config = TrainConfig(model=case, encoder_depth=ENCODER_DEPTH,
                         mixed_precision="bf16" if ON_GPU else "no",
                         grad_checkpointing=GRAD_CKPT, batch_size=batch)
    model = build_model(config, channels, size, [encoder.embed_dim],
                        context_dim=width).to(DEVICE).train()
    train_step = TrainStep.build(config, model, [encoder], DEVICE, x_shape=(channels, size, size),
                                 latents_scale=LATENTS_SCALE,
                                 empty_context=empty_context(length, width).to(DEVICE))
    contexts = torch.randn(batch, length, width, pin_memory=ON_GPU)
    return model, loader_step(train_step, contexts, image_size), None


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["official_style", "repa_fast"])
def test_t2i_train_step(benchmark, provider, case):
    batch, _, _, context_shape = CASES[case]
    encoder, image_size = make_t2i_encoder()
    encoder = encoder.to(DEVICE)
    official = provider == "official_style"
    build = official_step if official else repa_fast_step
    model, step, setup = build(case, encoder, image_size)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    timed(benchmark, step, flops=flops_per_image(model, context_shape=context_shape) * batch,
          rounds=20 if ON_GPU else 3, warmup=3 if ON_GPU else 1, setup=setup)
    info = benchmark.extra_info
    info.update(case=case, provider=provider, batch=batch, context_shape=list(context_shape),
                grad_checkpointing=GRAD_CKPT, images_per_s=batch / benchmark.stats.stats.median,
                dtype=("fp16 autocast + GradScaler" if official and ON_GPU
                       else "bf16 autocast" if ON_GPU else "fp32"),
                attention="sdpa" if official else "auto", compiled=not official and ON_GPU)
    record_memory_and_mfu(info)


# --------------------------------------------------------------------------- ODE sampling

_WEIGHTS: dict = {}


def sampling_model(case: str, official: bool) -> torch.nn.Module:
    """The MMDiT of a train_t2i.py checkpoint (one DINOv2-B projector) in eval mode without
    gradients: SDPA for the official style, the auto backend (``generate``'s default) else.
    Random weights, made once per case: PyTorch's default initialisation (the official trains
    from it; no zero layers), with the attention sharpened by ``QK_SCALE`` so that the text
    steers the image tokens (module docstring)."""
    _, size, channels, (_, width) = SAMPLE_CASES[case]
    kwargs = dict(input_size=size, in_channels=channels, z_dims=[768],
                  encoder_depth=ENCODER_DEPTH, context_dim=width, validate_inputs=False)
    if case not in _WEIGHTS:
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised where it runs: seconds less on GPU
            model = MMDiT_models[case](**kwargs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
                    p[:2 * model.hidden_size].mul_(QK_SCALE)  # the q and k rows
        _WEIGHTS[case] = model.state_dict()
    with torch.device(DEVICE):
        model = MMDiT_models[case](**kwargs, attn_backend="sdpa" if official else None)
    model.load_state_dict(_WEIGHTS[case])
    return model.eval().requires_grad_(False)


def sampling_flops(case: str, batch: int) -> float:
    """Forward FLOPs of one sampling run: 2B guided rows per step, the model without its
    projector (``flops_per_image`` counts forward + backward)."""
    _, size, channels, (length, width) = SAMPLE_CASES[case]
    with torch.device("meta"):
        bare = MMDiT_models[case](input_size=size, in_channels=channels, z_dims=[],
                                  encoder_depth=ENCODER_DEPTH, context_dim=width)
    return flops_per_image(bare, context_shape=(length, width)) / 3 * 2 * batch * \
        SAMPLER["num_steps"]


def sampling_inputs(case: str):
    """Initial noise and generators of samples 0 .. batch-1 (global seed 0), the batch's
    contexts and the empty caption's [L, D] context, on the device."""
    batch, size, channels, (length, width) = SAMPLE_CASES[case]
    latents, generators = initial_noise(range(batch), 0, (channels, size, size))
    contexts = torch.randn(batch, length, width, generator=torch.Generator().manual_seed(1))
    return (latents.to(DEVICE), generators, contexts.to(DEVICE),
            empty_context(length, width).to(DEVICE))


def official_sample(model, latents, contexts, empty, num_steps):
    """generate_t2i.py's call: ``y_null`` repeated to the batch, the sampler's float64 output
    cast to float32."""
    y_null = empty.unsqueeze(0).repeat(contexts.shape[0], 1, 1)
    kwargs = dict(SAMPLER, num_steps=num_steps)
    return euler_sampler(model, latents, contexts, y_null, **kwargs).to(torch.float32)


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
@pytest.mark.parametrize("provider", ["official_style", "repa_fast"])
def test_t2i_sampling(benchmark, provider, case):
    batch = SAMPLE_CASES[case][0]
    latents, generators, contexts, empty = sampling_inputs(case)
    official = provider == "official_style"
    model = sampling_model(case, official)
    if official:
        def sampler(steps):
            return lambda: official_sample(model, latents, contexts, empty, steps)
    else:
        # generate's make_draw: bf16 on CUDA (fp32 on the CPU), compiled on CUDA
        velocity = TextVelocity(model, autocast_dtype=torch.bfloat16 if ON_GPU else None,
                                compile=ON_GPU)

        def sampler(steps):
            config = SamplerConfig(mode="ode", **dict(SAMPLER, num_steps=steps))
            return lambda: sample_t2i_latents(velocity, latents, contexts, empty, generators,
                                              config)
    with tf32(True), torch.no_grad():  # generate_t2i.py's --tf32 default; generate's too
        sampler(WARMUP_STEPS)()
        samples = timed(benchmark, sampler(SAMPLER["num_steps"]),
                        flops=sampling_flops(case, batch), rounds=ROUNDS, warmup=0)
        info = benchmark.extra_info
        info.update(case=case, provider=provider, mode="ode", batch=batch,
                    model_batch=2 * batch, context_shape=list(contexts.shape[1:]),
                    images_per_s=batch / benchmark.stats.stats.median,
                    dtype=("fp32 (TF32 on GPU)" if official or not ON_GPU else "bf16 autocast"),
                    compiled=not official and ON_GPU,
                    attention="sdpa" if official else "auto", **SAMPLER)
        if not official:
            info.update(agreement(case, samples, latents, contexts, empty))


def agreement(case, samples, latents, contexts, empty) -> dict:
    """The official-style sampler on the same noise and contexts against ``samples`` (the same
    50 steps), and as the control the official-style samples of the wrong captions (each row
    given the next row's context) against its own."""
    model = sampling_model(case, official=True)
    steps = SAMPLER["num_steps"]
    reference = official_sample(model, latents, contexts, empty, steps)
    control = official_sample(model, latents, contexts.roll(1, dims=0), empty, steps)
    diff = samples.float() - reference
    rel = float(diff.norm() / reference.norm())
    control_rel = float((control - reference).norm() / reference.norm())
    tolerance = min(DTYPE_REL_TOL, AGREE_FRACTION * control_rel)
    return dict(rel_l2=rel, max_abs=float(diff.abs().max()), control_rel_l2=control_rel,
                agree_tolerance=tolerance, agree=rel < tolerance, agree_steps=steps)
