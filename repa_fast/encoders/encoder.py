"""The frozen encoder module: raw uint8 images -> patch tokens [B, grid², embed_dim].

``forward`` = official ``preprocess_raw_image`` + the official feature extraction:
patch embed, position embedding (prefix tokens concatenated), ``norm_pre`` (CLIP's ``ln_pre``),
the blocks, the final norm for the families whose official features use it, then the
``num_prefix_tokens`` CLS/register tokens removed. That is ``x_norm_patchtokens`` for DINOv2,
``forward_features(x)[:, 1:]`` for MoCo v3, the un-normed last block minus CLS for MAE and CLIP,
all normed tokens for I-JEPA (no CLS).
"""
from __future__ import annotations

import torch
from torch import nn

from .preprocess import input_side, preprocess_raw_image
from .registry import EncoderSpec


class FrozenEncoder(nn.Module):
    """Eval-mode, ``requires_grad=False`` wrapper of a timm ViT matching one official encoder."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, resolution: int) -> None:
        super().__init__()
        if not spec.final_norm:
            # Checkpoint norm weights were loaded strictly; the official features skip them.
            backbone.norm = nn.Identity()
        self.backbone = backbone
        self.spec = spec
        self.name = spec.name
        self.resolution = resolution
        self.embed_dim = spec.embed_dim
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.grid = input_side(spec.family, resolution) // spec.patch_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Stays in eval mode even inside a parent's .train(): it is a fixed feature extractor.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.patch_embed.proj.weight.device

    def _check(self, x: torch.Tensor) -> None:
        want = (3, self.resolution, self.resolution)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"raw_images: expected a [B, {want[0]}, {want[1]}, {want[2]}] tensor "
                             f"(resolution={self.resolution}), got {got}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"raw_images: expected uint8 (or float in [0, 255]), got {x.dtype}")

    # no_grad rather than inference_mode: the tokens are loss targets, and inference tensors
    # cannot be saved for the backward of the loss that uses them.
    @torch.no_grad()
    def forward(self, raw_images: torch.Tensor) -> torch.Tensor:
        """[B, 3, r, r] raw pixels in [0, 255] -> [B, grid², embed_dim] tokens (module dtype)."""
        self._check(raw_images)
        # Preprocess in float32 on the input's device, then compute in the module's dtype.
        x = preprocess_raw_image(raw_images, self.spec.family)
        x = x.to(device=self.device, dtype=self.dtype)
        tokens = self.backbone.forward_features(x)
        return tokens[:, self.num_prefix_tokens:]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, resolution={self.resolution}, grid={self.grid}, "
                f"embed_dim={self.embed_dim}, num_prefix_tokens={self.num_prefix_tokens}")
