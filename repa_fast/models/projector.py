"""The REPA projector: a 3-layer MLP from SiT hidden size to an encoder's feature size."""
import torch.nn as nn


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """``Linear(hidden, P) - SiLU - Linear(P, P) - SiLU - Linear(P, z_dim)``.

    A plain ``nn.Sequential`` so that state-dict keys are the official ``0.*``, ``2.*``, ``4.*``.
    """
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )
