"""SD-VAE helpers: local loading in both key layouts, moments, posterior sampling, decode."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from repa_fast.vae import (SD_SCALE, decode, encode_moments, load_vae,  # noqa: E402
                           sample_posterior)


def tiny_sd_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=4,
                                   down_block_types=["DownEncoderBlock2D"] * 4,
                                   up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
                                   latent_channels=4, sample_size=32)


def test_moments_sampling_and_decode(tmp_path):
    vae = tiny_sd_vae()
    vae.save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    moments = encode_moments(vae, images, batch_size=2)
    assert moments.shape == (3, 8, 4, 4) and moments.dtype == torch.float32
    dist = vae.encode(images.float() / 127.5 - 1).latent_dist
    assert torch.allclose(moments, torch.cat([dist.mean, dist.std], 1), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    z = sample_posterior(moments, generator=g)
    mean, std = moments.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z, (mean + std * eps) * 0.18215)  # the official train.py formula
    out = decode(vae, z)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="images must be uint8"):
        encode_moments(vae, images.float())


def test_single_files_in_diffusers_and_ldm_layouts(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import repa_fast.vae as vae_module

    vae = tiny_sd_vae()
    tiny = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    monkeypatch.setattr(vae_module, "SD_VAE_CONFIG", tiny)  # the real one is 83.7M parameters
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, tmp_path / "vae.safetensors")
    loaded = load_vae(str(tmp_path / "vae.safetensors"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
    torch.save({"state_dict": {"first_stage_model.x": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="not an SD-VAE checkpoint"):
        load_vae(str(tmp_path / "bad.ckpt"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_vae(str(tmp_path / "missing.safetensors"))
    assert SD_SCALE == 0.18215


def to_ldm_layout(state):
    """diffusers AutoencoderKL keys -> the original LDM names (vae-ft-mse-840000 files)."""
    import re
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{3 - int(m[1])}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        for new, old in (("attentions.0.group_norm", "attn_1.norm"), ("attentions.0.to_q", "attn_1.q"),
                         ("attentions.0.to_k", "attn_1.k"), ("attentions.0.to_v", "attn_1.v"),
                         ("attentions.0.to_out.0", "attn_1.proj_out"), ("conv_shortcut", "nin_shortcut"),
                         ("conv_norm_out", "norm_out")):
            k = k.replace(new, old)
        k = k.replace("mid_block.", "mid.")
        if "attn_1" in k and k.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        out["first_stage_model." + k] = value
    return out


def test_original_ldm_checkpoint_converts(tmp_path, monkeypatch):
    import repa_fast.vae as vae_module

    vae = tiny_sd_vae()
    tiny = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    monkeypatch.setattr(vae_module, "SD_VAE_CONFIG", tiny)
    torch.save({"state_dict": to_ldm_layout(vae.state_dict())}, tmp_path / "sd.ckpt")
    loaded = load_vae(str(tmp_path / "sd.ckpt"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean,
                          atol=1e-6)
    assert torch.allclose(loaded.decode(vae.encode(x).latent_dist.mean).sample,
                          vae.decode(vae.encode(x).latent_dist.mean).sample, atol=1e-5)
