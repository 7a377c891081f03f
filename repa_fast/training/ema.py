"""Exponential moving average of the model weights, kept in fp32.

    ema ← decay·ema + (1 − decay)·θ        (decay 0.9999, every step, as the official train.py)

The official ``update_ema`` runs ``ema.mul_(decay).add_(θ, alpha=1 − decay)`` per parameter;
here the same two operations run as fused ``torch._foreach_*`` calls over all tensors.

A skipped (non-finite) training step passes ``found_inf`` (a 0/1 tensor on the device): the
factors become (1, 0) on the device and the EMA stays as it was. Both factors are 0-d device
tensors, taken by the ``Tensor`` overloads of ``_foreach_mul(_)``, so nothing is read on the
host. (``_foreach_lerp_`` has no such overload: a tensor weight there is read with ``.item()``,
a host synchronisation every step.)
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

# ``(1 − decay)·θ`` is formed in chunks of at most this many elements: a bounded temporary
# (64 MiB in fp32) instead of a full fp32 copy of the model (2.7 GB for SiT-XL).
CHUNK_ELEMENTS = 16 * 2**20


def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]], limit: int = CHUNK_ELEMENTS):
    """Consecutive groups of (ema, θ) pairs holding at most ``limit`` elements each (a larger
    tensor forms a group of its own)."""
    group, size = [], 0
    for pair in pairs:
        if group and size + pair[0].numel() > limit:
            yield group
            group, size = [], 0
        group.append(pair)
        size += pair[0].numel()
    if group:
        yield group


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
            torch._foreach_mul_(mine, decay)
            torch._foreach_add_(mine, theirs, alpha=1.0 - decay)
            return
        skip = found_inf.to(device=mine[0].device, dtype=torch.float32) > 0
        keep = torch.where(skip, 1.0, decay).to(torch.float32)        # 0-d, on the device
        weight = torch.where(skip, 0.0, 1.0 - decay).to(torch.float32)
        torch._foreach_mul_(mine, keep)
        for group in _chunks(list(zip(mine, theirs))):
            ema_part, model_part = zip(*group)
            torch._foreach_add_(list(ema_part), torch._foreach_mul(list(model_part), weight))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
