"""SD-VAE helpers: load from a local path, encode to moments, sample, decode.

REPA trains on the latents of Stable Diffusion's VAE (``sd-vae-ft-ema`` or ``sd-vae-ft-mse``):

    moments = concat(mean, std)            per image, [8, H/8, W/8], what preparation stores
    z       = (mean + std · ε) · 0.18215    sampled fresh every training step (ε ~ N(0, I))
    image   = decode(z / 0.18215)

Weights come from a local path only (no hub at run time): a diffusers folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``) or a single ``.safetensors`` /
``.ckpt`` / ``.pt`` file in either the diffusers or the original LDM key layout.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch

SD_SCALE = 0.18215
SD_VAE_URLS = ("https://huggingface.co/stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse): download "
               "the folder (config.json + diffusion_pytorch_model.safetensors)")
# The SD VAE's architecture, for single files that carry no config.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                     down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4,
                     block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                     scaling_factor=SD_SCALE)


def _diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError("the VAE needs diffusers: pip install 'repa_fast[data]'") from error
    return diffusers


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def load_vae(path: str, device=None, dtype: Optional[torch.dtype] = None):
    """A diffusers ``AutoencoderKL`` in eval mode from a local folder or file (see module doc)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE weights not found: {path!r}. Get them from {SD_VAE_URLS}")
    diffusers = _diffusers()
    if os.path.isdir(path):
        # low_cpu_mem_usage=False: the same weights without diffusers' "install accelerate"
        # notice (that path needs accelerate and falls back to this one without it)
        vae = diffusers.AutoencoderKL.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=False,
            **({} if dtype is None else dict(torch_dtype=dtype)))
    else:
        state = _read_state_dict(path)
        if any(k.startswith(("encoder.down.", "first_stage_model.encoder.down.")) for k in state):
            # the original LDM layout (VAE-only files, or a whole SD checkpoint)
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
            state = convert_ldm_vae_checkpoint(state, SD_VAE_CONFIG)
        vae = diffusers.AutoencoderKL(**SD_VAE_CONFIG)
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{path!r} is not an SD-VAE checkpoint: missing {missing[:5]}...")
    vae.requires_grad_(False).eval()
    if device is not None:
        vae = vae.to(device=device)
    # .to(dtype) only when asked: diffusers warns about casting on every .to(dtype=None) call
    param = next(vae.parameters(), None)
    return vae if dtype is None or param is None or param.dtype == dtype else vae.to(dtype=dtype)


def vae_identity(vae, path: str) -> dict:
    """What identifies the latents: where the VAE came from, its scale, and a fingerprint of
    its weights (sha256 of the encoder's first convolution)."""
    weight = vae.encoder.conv_in.weight.detach().float().cpu().contiguous()
    return dict(path=os.path.abspath(path),
                scaling_factor=float(getattr(vae.config, "scaling_factor", SD_SCALE)),
                latent_channels=int(vae.config.latent_channels),
                fingerprint=hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16])


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> float32 moments [B, 2·C, H/8, W/8] = concat(mean, std)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W]; got {images.dtype} "
                         f"{list(images.shape)}")
    param = next(vae.parameters())
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(param.device, torch.float32) / 127.5 - 1
        dist = vae.encode(x.to(param.dtype)).latent_dist
        out.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
    return torch.cat(out)


def sample_posterior(moments: torch.Tensor, latents_scale=SD_SCALE, latents_bias=0.0,
                     generator: Optional[torch.Generator] = None,
                     noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(mean + std·ε)·scale + bias`` from moments [B, 2·C, h, w], as the official train.py;
    ε is ``noise`` when given, else drawn (from ``generator`` when given)."""
    mean, std = torch.chunk(moments, 2, dim=1)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    noise = noise.to(mean.device, mean.dtype)
    return (mean + std * noise) * latents_scale + latents_bias


@torch.no_grad()
def decode(vae, latents: torch.Tensor, latents_scale=SD_SCALE, latents_bias=0.0) -> torch.Tensor:
    """Latents [B, C, h, w] (scaled as in training) -> uint8 images [B, 3, 8h, 8w]."""
    param = next(vae.parameters())
    z = (latents.to(param.device, param.dtype) - latents_bias) / latents_scale
    x = vae.decode(z).sample
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
