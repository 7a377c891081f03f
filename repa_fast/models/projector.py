"""The REPA projector module: a 3-layer MLP from SiT hidden size to an encoder's feature size,
whose :meth:`~REPAProjector.alignment_loss` runs the fused alignment op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.alignment import repa_alignment_loss
from ..ops.alignment_reference import project


class REPAProjector(nn.Sequential):
    """The REPA projector ``Linear(D, P) - SiLU - Linear(P, P) - SiLU - Linear(P, Z)``.

    An ``nn.Sequential`` so the state-dict keys are the official ``build_mlp``'s (``0.*``,
    ``2.*``, ``4.*``); ``forward(h)`` returns the projected tokens as the official projector,
    and :meth:`alignment_loss` computes the alignment loss from hidden states directly.
    """

    def __init__(self, hidden_size: int, projector_dim: int, z_dim: int):
        super().__init__(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )

    def weights(self) -> tuple[torch.Tensor, ...]:
        """``(w1, b1, w2, b2, w3, b3)``."""
        return (self[0].weight, self[0].bias, self[2].weight, self[2].bias,
                self[4].weight, self[4].bias)

    def forward(self, hidden: torch.Tensor, target: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """The projected tokens (official behaviour), or with ``target`` the alignment loss.

        The loss goes through ``forward`` too, so module hooks (DDP, DeepSpeed ZeRO-3, which
        gathers a module's weights when it is called) see the weights being used.
        """
        if target is None:
            return project(hidden, *self.weights())
        return repa_alignment_loss(hidden, target, *self.weights(), **kwargs)

    def alignment_loss(self, hidden: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        """``repa_alignment_loss(hidden, target, *self.weights(), **kwargs)``, as a module call."""
        return self(hidden, target, **kwargs)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> REPAProjector:
    """The official ``build_mlp``'s name for :class:`REPAProjector` (same layers and keys)."""
    return REPAProjector(hidden_size, projector_dim, z_dim)
