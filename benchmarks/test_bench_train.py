"""One REPA training step (frozen encoder features of the images, SiT forward + backward with
the projection loss, clipping, AdamW, EMA): repa_fast against an official-style step in the
same run. On GPU: SiT-B/2 and SiT-XL/2 on 256 px latents (32×32×4) with a DINOv2-B encoder
(random weights: speed does not depend on them) on 256 px images.

* ``official_style``: fp16 autocast (bf16 where fp16 is unsupported), eager, timm's explicit
  attention (``fused_attn=False``), the projector as layers and loss.py's per-sample loop,
  GradScaler, AdamW(foreach), EMA per parameter, encoder in fp16 autocast;
* ``repa_fast``: :class:`repa_fast.training.step.TrainStep`, the very step ``repa_fast.train``
  runs, with the project's defaults (``TrainConfig()``: bf16 autocast, the auto attention
  backend, the fused alignment op, ``torch.compile`` of SiT and encoder on CUDA, fused AdamW
  with the device-side non-finite skip, the foreach EMA, random draws on the device), fed
  with VAE moments, images and labels as the loader gives them.

MFU = images/s × FLOPs per image (``repa_fast.training.metrics.flops_per_image``: SiT and
projector, forward + backward; the encoder's forward is not counted) / the card's measured
bf16 matmul peak. ``peak_mem_gib`` is the step's peak allocated memory. The batch per case can
be changed with ``REPA_BENCH_TRAIN_BATCH`` (e.g. 256 with ``REPA_BENCH_GRAD_CKPT=1``). On the
CPU a tiny model runs, so the command always works; its numbers say nothing about GPU speed.
"""
import os

import pytest
import torch

from bench_utils import (DEVICE, ON_GPU, loader_step, official_projection_loss,
                         record_memory_and_mfu, timed)
from repa_fast.models import SiT_models
from repa_fast.training.build import build_model
from repa_fast.training.config import TrainConfig
from repa_fast.training.ema import EMA
from repa_fast.training.metrics import flops_per_image
from repa_fast.training.step import TrainStep
from repa_fast.transport import SILoss

CASES = {"SiT-B/2": (64, 32, 4), "SiT-XL/2": (32, 32, 4)} if ON_GPU else {"SiT-T/2": (8, 16, 4)}
if os.environ.get("REPA_BENCH_TRAIN_BATCH"):
    CASES = {k: (int(os.environ["REPA_BENCH_TRAIN_BATCH"]), *v[1:]) for k, v in CASES.items()}
GRAD_CKPT = os.environ.get("REPA_BENCH_GRAD_CKPT") == "1"


def make_encoder():
    """DINOv2-B at 256 px on GPU; on the CPU the training demo's tiny encoder (its 8×8 token
    grid is the CPU case's: SiT-T/2 on 16×16 inputs; the official-style loss needs equal
    grids)."""
    if ON_GPU:
        import warnings

        from repa_fast.encoders import load_encoder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "random weights" warning
            return load_encoder("dinov2-vit-b", "random", 256, device=DEVICE,
                                dtype=torch.bfloat16), 256
    from repa_fast.training.demo_encoder import demo_encoder
    return demo_encoder(32, "random"), 32  # speed only: untrained weights will do


class OfficialLoss(SILoss):
    """SILoss calling the model like the official code, with loss.py's per-sample loop."""

    def __init__(self):
        super().__init__(fused=False)

    def __call__(self, model, images, model_kwargs=None, zs=None):
        out = {}
        real = model

        def capture(*args, **kwargs):
            v, zs_tilde = real(*args, **kwargs)
            out["zs_tilde"] = zs_tilde
            return v, zs_tilde

        # no zs here: SILoss would compute its own (vectorised) projection loss as well
        loss, _ = super().__call__(capture, images, model_kwargs)
        return loss, official_projection_loss(zs, out["zs_tilde"])


def official_step(case, encoder, image_size):
    """The official-style step and the model it trains."""
    batch, size, channels = CASES[case]
    model = SiT_models[case](input_size=size, in_channels=channels, z_dims=[encoder.embed_dim],
                             encoder_depth=8 if ON_GPU else 2, fused_attn=False,
                             validate_inputs=False).to(DEVICE)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = OfficialLoss()
    half = torch.float16 if ON_GPU else torch.bfloat16
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=half == torch.float16)
    x = torch.randn(batch, channels, size, size, device=DEVICE)
    y = torch.randint(0, 1000, (batch,), device=DEVICE)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                           device=DEVICE)

    def step():
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=half, enabled=ON_GPU):
            zs = [encoder(images)]
        with torch.autocast(DEVICE.type, dtype=half, enabled=ON_GPU):
            loss, proj = loss_fn(model, x, dict(y=y), zs=zs)
            total = loss.mean() + 0.5 * proj.mean()
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        ema_official(ema.model, model)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return model, step


def repa_fast_step(case, encoder, image_size):
    """``TrainStep`` with the project's defaults; inputs as the loader hands them over (host
    tensors, pinned on CUDA)."""
    batch, size, channels = CASES[case]
    config = TrainConfig(model=case, encoder_depth=8 if ON_GPU else 2,
                         mixed_precision="bf16" if ON_GPU else "no",
                         grad_checkpointing=GRAD_CKPT, batch_size=batch)
    model = build_model(config, channels, size, [encoder.embed_dim]).to(DEVICE).train()
    train_step = TrainStep.build(config, model, [encoder], DEVICE, x_shape=(channels, size, size),
                                 latents_scale=0.18215)
    labels = torch.randint(0, 1000, (batch,), pin_memory=ON_GPU)
    return model, loader_step(train_step, labels, image_size)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["official_style", "repa_fast"])
def test_train_step(benchmark, provider, case):
    batch = CASES[case][0]
    encoder, image_size = make_encoder()
    encoder = encoder.to(DEVICE)
    build = official_step if provider == "official_style" else repa_fast_step
    model, step = build(case, encoder, image_size)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    timed(benchmark, step, flops=flops_per_image(model) * batch, rounds=20 if ON_GPU else 3,
          warmup=3 if ON_GPU else 1)
    info = benchmark.extra_info
    info.update(case=case, provider=provider, batch=batch, grad_checkpointing=GRAD_CKPT,
                images_per_s=batch / benchmark.stats.stats.median)
    record_memory_and_mfu(info)


@torch.no_grad()
def ema_official(ema_model, model, decay=0.9999):
    """The official train.py's update_ema: one mul_/add_ pair per parameter."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data.float(), alpha=1 - decay)
