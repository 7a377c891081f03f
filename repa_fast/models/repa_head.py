"""The REPA head shared by the model families: the projected tokens, or the fused alignment loss.

A model's ``forward(..., align_to=None)`` returns ``[projector(hidden) for projector in
projectors]`` as the official code; with ``align_to`` (one encoder's tokens per projector) it
returns the mean over encoders of the fused alignment op instead, never materialising the
projected tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn


def repa_outputs(projectors: nn.ModuleList, z_dims: Sequence[int], hidden: torch.Tensor,
                 align_to: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]],
                 **align_kwargs):
    """``zs`` (a list, one [N, T, z_dims[k]] per projector) when ``align_to`` is None, else the
    alignment loss averaged over the projectors (``align_kwargs`` go to the op)."""
    if align_to is None:
        return [projector(hidden) for projector in projectors]
    if isinstance(align_to, torch.Tensor):
        align_to = [align_to]
    if not len(projectors):
        raise ValueError("align_to was given but this model has no projectors (z_dims=[])")
    if len(align_to) != len(projectors):
        raise ValueError(f"align_to must hold one target per projector ({len(projectors)}, "
                         f"z_dims={list(z_dims)}); got {len(align_to)}")
    losses = [projector.alignment_loss(hidden, z, **align_kwargs)
              for projector, z in zip(projectors, align_to)]
    return sum(losses) / len(losses)
