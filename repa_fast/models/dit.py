"""DiT (Diffusion Transformer) with optional REPA projectors, as in facebookresearch/DiT.

Same constructor arguments (in the same order), parameter names and forward maths as the
original ``models.py``, so its state dicts (the bare ``DiT-XL-2-256x256.pt``, or ``model`` /
``ema`` of its ``train.py`` checkpoints) load with ``strict=True`` when ``z_dims=[]`` (the
default). The network is SiT's (same blocks, embeddings and final layer); DiT differs in

* the output: ``learn_sigma=True`` predicts ε and the variance interpolation ``v``, so the final
  layer maps to ``2·in_channels`` channels;
* the calling convention of the original: :meth:`DiT.predict` (the original ``forward``, one
  tensor) and :meth:`DiT.forward_with_cfg` (guidance on the first 3 channels, as the original).

``forward`` follows this repo's SiT (``(out, zs)``, or ``(out, proj_loss)`` with ``align_to``)
so the REPA training step and DDP/DeepSpeed wrappers treat both families alike; the return
type never depends on whether projectors are attached (``zs`` is then ``[]``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .sit import FinalLayer, SiT, _ModelRegistry, register_sizes


class DiT(SiT):
    """Class-conditional DiT on latents ``x`` [N, C, H, W]: ``model.predict(x, t, y)`` is the
    original output [N, out_channels, H, W], ``out_channels = 2·C`` if ``learn_sigma`` else C.

    REPA: ``zs[k]`` = projector k applied to the hidden states after block ``encoder_depth``
    (1-based; None means ``min(8, depth)``, SiT's default where the depth allows it).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        encoder_depth: Optional[int] = None,
        z_dims: Sequence[int] = (),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        fused_attn: bool = True,
        attn_backend: Optional[str] = None,
        validate_inputs: bool = True,
        grad_checkpointing: bool = False,
    ):
        if encoder_depth is None:
            encoder_depth = min(8, depth) if isinstance(depth, int) and depth > 0 else 8
        super().__init__(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, encoder_depth=encoder_depth, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, z_dims=z_dims, projector_dim=projector_dim,
            qk_norm=qk_norm, fused_attn=fused_attn, attn_backend=attn_backend,
            validate_inputs=validate_inputs, grad_checkpointing=grad_checkpointing,
        )
        self.path_type = None  # DiT trains on the discrete diffusion of its own code, not a path
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        # SiT built its final layer for in_channels outputs; the replacement takes the same slot
        # in the state dict. All of it starts at zero, as the original's initialize_weights
        # leaves it (adaLN-Zero and a zero output map), so no re-initialisation of the rest.
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        for param in self.final_layer.parameters():
            nn.init.zeros_(param)
        # The original re-initialises only the patch embedding's weight: its bias keeps
        # Conv2d's default U(±1/√fan_in), where SiT (REPA) zeroes it.
        bound = (in_channels * patch_size * patch_size) ** -0.5
        nn.init.uniform_(self.x_embedder.proj.bias, -bound, bound)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = super()._check_inputs(x, t, y)
        # DiT's diffusion passes integer step indices; the timestep embedding computes in fp32
        # and casts back to t's dtype, so integers go in as fp32, as the original's ``t.float()``.
        return t if t.is_floating_point() else t.float()

    def predict(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The original ``DiT.forward``: the output [N, out_channels, H, W] alone (channels
        ``:C`` the ε prediction, ``C:`` the variance interpolation when ``learn_sigma``).

        Skips the projectors; for samplers, which take a function returning one tensor.
        """
        return self.forward_with_hidden(x, t, y)[0]

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float, cfg_channels: int = 3) -> torch.Tensor:
        """Classifier-free guidance on a batch ``[x_c; x_u]`` with labels ``[y; null]``.

        Both halves are evaluated on the first half's inputs, and channels ``:cfg_channels``
        become ``ε_u + s·(ε_c − ε_u)`` in both halves; the others stay each half's own output.
        ``cfg_channels=3`` is the original's default (kept "for exact reproducibility" of its
        published samples although the latents have 4 channels); ``in_channels`` gives the
        standard guidance of every ε channel.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional half, then "
                             f"unconditional half); got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.predict(torch.cat([half, half]), t, y)
        eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# The original's sizes are SiT's (SiT took them from DiT): same table, DiT's patch sizes.
DiT_models: dict = _ModelRegistry()
register_sizes(DiT_models, DiT, "DiT", (2, 4, 8), globals())
