"""Fused ops of repa_fast and their backend registry.

``repa_alignment_loss`` is the REPA alignment op (projector MLP + patch-token pooling + cosine
loss); ``REPAProjector`` is the projector module that calls it. Backends register in
:mod:`repa_fast.ops.backends` with a function saying why they cannot run a call
(:func:`backend_problem`): ``triton`` (fused kernels, :mod:`repa_fast.ops.alignment_triton`,
CUDA), ``native`` (the optional C++/CUDA extension ``repa_fast._C`` built from ``csrc/``,
:mod:`repa_fast.ops.alignment_native`) and the pure-PyTorch ``reference``, which runs
everywhere. Imports run one way: ``alignment_common`` <- each backend module;
``alignment_common``, ``alignment_reference``, ``backends`` <- the dispatcher ``alignment``,
which imports the fused backends on use.
"""
from .alignment import (repa_alignment_loss, repa_alignment_loss_native,
                        repa_alignment_loss_triton)
from .alignment_reference import repa_alignment_loss_reference
from .backends import ENV_VAR, backend_problem, describe_backends

__all__ = ["ENV_VAR", "backend_problem", "describe_backends", "repa_alignment_loss",
           "repa_alignment_loss_native", "repa_alignment_loss_reference",
           "repa_alignment_loss_triton"]
