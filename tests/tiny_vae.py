"""A random diffusers AutoencoderKL with the SD-VAE's layout (8x downsampling, 4 latent
channels) at a tiny width, saved as a local folder, for tests that need a VAE on disk."""
import torch


def save_tiny_vae(path, sample_size: int = 32) -> str:
    """Write the tiny VAE (seeded: the same weights every time) to ``path``; returns it."""
    import diffusers
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=sample_size)
    vae.save_pretrained(path)
    return str(path)
