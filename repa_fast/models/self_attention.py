"""Multi-head self-attention with pluggable backends, parameter-compatible with timm's Attention."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.attention import attention, requested_backend


class Attention(nn.Module):
    """``proj(attn(q_norm(q), k_norm(k), v))`` with ``q, k, v = qkv(x)`` split over heads.

    Parameters are named as in timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``)
    so official SiT/REPA checkpoints load. ``qk_norm`` uses ``LayerNorm(head_dim)`` with timm's
    former default (eps 1e-5, affine), which the official code got from timm's ``norm_layer``.
    ``backend`` is one of :data:`repa_fast.ops.attention.CHOICES`; None reads
    ``$REPA_FAST_ATTN_BACKEND`` (default ``auto``).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.backend = requested_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        out = attention(self.q_norm(q), self.k_norm(k), v, self.backend)  # [B, N, H, d]
        return self.proj(out.reshape(B, N, C))
