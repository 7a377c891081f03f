"""One REPA training step (encoder features, SiT forward + backward with the projection loss,
AdamW, EMA): repa_fast against an official-style step in the same run.

* ``official_style``: fp16 autocast (bf16 where fp16 is unsupported), eager, timm's explicit
  attention (``fused_attn=False``), the projector as layers and loss.py's per-sample loop;
* ``repa_fast``: bf16 autocast, the auto attention backend, the fused alignment op, and
  ``torch.compile`` on GPU.

MFU = images/s × FLOPs per image (``repa_fast.training.metrics.flops_per_image``, encoder not
counted) / the card's measured bf16 matmul peak. On the CPU a tiny model runs, so the command
always works; its numbers say nothing about GPU speed.
"""
import pytest
import torch

from bench_utils import DEVICE, ON_GPU, bf16_matmul_peak_tflops, official_projection_loss, timed
from repa_fast.models import SiT_models
from repa_fast.training.ema import EMA
from repa_fast.training.metrics import flops_per_image
from repa_fast.transport import SILoss

CASES = {"SiT-B/2": (64, 32, 4), "SiT-XL/2": (32, 32, 4)} if ON_GPU else {"SiT-T/4": (8, 16, 4)}


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

        loss, _ = super().__call__(capture, images, model_kwargs, zs)
        return loss, official_projection_loss(zs, out["zs_tilde"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["official_style", "repa_fast"])
def test_train_step(benchmark, provider, case):
    batch, size, channels = CASES[case]
    official = provider == "official_style"
    model = SiT_models[case](input_size=size, in_channels=channels, z_dims=[768],
                             encoder_depth=8 if ON_GPU else 2,
                             fused_attn=not official, validate_inputs=False).to(DEVICE)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ON_GPU)
    loss_fn = OfficialLoss() if official else SILoss()
    step_model = torch.compile(model) if ON_GPU and not official else model
    half = torch.float16 if official and ON_GPU else torch.bfloat16
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=half == torch.float16)
    x = torch.randn(batch, channels, size, size, device=DEVICE)
    y = torch.randint(0, 1000, (batch,), device=DEVICE)
    zs = [torch.randn(batch, (size // model.patch_size) ** 2, 768, device=DEVICE)]

    def step():
        with torch.autocast(DEVICE.type, dtype=half, enabled=ON_GPU):
            loss, proj = loss_fn(step_model, x, dict(y=y), zs=zs)
            total = loss.mean() + 0.5 * proj
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    timed(benchmark, step, flops=flops_per_image(model) * batch, rounds=20 if ON_GPU else 3,
          warmup=3 if ON_GPU else 1)
    info = benchmark.extra_info
    info.update(case=case, provider=provider, batch=batch,
                images_per_s=batch / benchmark.stats.stats.median)
    peak = bf16_matmul_peak_tflops()
    if peak:
        info["mfu_vs_measured_peak"] = info["tflops_per_s"] / peak
