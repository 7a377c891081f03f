"""Exponential moving average of the model weights, kept in fp32.

    ema ← decay·ema + (1 − decay)·θ        (decay 0.9999, every step, as the official train.py)

One fused ``torch._foreach_lerp_`` over all tensors: lerp(ema, θ, 1 − decay) is the same update.
A skipped (non-finite) training step passes ``found_inf`` = 1, which makes the weight 0 on the
device: the EMA stays as it was without a host synchronisation.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """fp32 copy of ``model``'s parameters (buffers copied as they are)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1]; got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).float().requires_grad_(False).eval()
        self._names = [n for n, _ in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None,
               found_inf: torch.Tensor | None = None) -> None:
        decay = self.decay if decay is None else decay
        params = dict(model.named_parameters())
        ema = dict(self.model.named_parameters())
        mine = [ema[n] for n in self._names]
        theirs = [params[n].detach().float() for n in self._names]
        if found_inf is None:
            torch._foreach_lerp_(mine, theirs, 1.0 - decay)
        else:
            weight = (1.0 - found_inf.float()) * (1.0 - decay)
            torch._foreach_lerp_(mine, theirs, weight.to(mine[0].device))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
