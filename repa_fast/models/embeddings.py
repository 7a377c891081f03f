"""Input embeddings of SiT: timesteps, class labels (with CFG label dropout), 2-D sin-cos positions."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class TimestepEmbedder(nn.Module):
    """``t -> MLP([cos(t·f_i), sin(t·f_i)])`` with ``f_i = max_period^(-i/half)``, i < half.

    Parameter names (``mlp.0``, ``mlp.2``) are DiT/SiT's, so their checkpoints load unchanged.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def positional_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """Sinusoidal embedding [N, dim] of N (possibly fractional) timesteps, computed in fp32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    # DiT's name for the same function.
    timestep_embedding = positional_embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.positional_embedding(t, self.frequency_embedding_size).to(t.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class-label table with one extra "null" row (index ``num_classes``) for classifier-free
    guidance when ``dropout_prob > 0``; in training, labels are replaced by it with that probability.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_size², embed_dim] (MAE/DiT convention).

    Token ``m = row·grid_size + col`` gets ``[sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)]``
    with ``ω_i = 10000^(-i/(embed_dim/4))``; computed in float64, returned as float32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding; got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()
