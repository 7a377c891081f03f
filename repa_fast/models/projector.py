"""The REPA projector: a 3-layer MLP from SiT hidden size to an encoder's feature size."""
from ..ops.alignment import REPAProjector


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> REPAProjector:
    """``Linear(hidden, P) - SiLU - Linear(P, P) - SiLU - Linear(P, z_dim)``, as the official
    ``build_mlp``: an ``nn.Sequential`` (state-dict keys ``0.*``, ``2.*``, ``4.*``) that also
    computes the fused alignment loss (:meth:`REPAProjector.alignment_loss`)."""
    return REPAProjector(hidden_size, projector_dim, z_dim)
