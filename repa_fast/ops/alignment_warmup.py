"""Tile warm-up of the fused alignment op: tune (or load) its Triton tiles before training.

``warm_alignment_op(projector, hidden_shape, target_shape, dtype, device)`` runs one forward +
backward of the Triton backend at the training shapes on random tensors through
:func:`repa_fast.kernels.autotune.warmup`, so no kernel is tuned inside the first training
step, and returns its one-line summary. Nothing of the model is touched: the weights are fresh
tensors of the projector's shapes (no ``.grad`` written, DDP/ZeRO hooks not run) and the random
numbers come from a private generator (the global RNG streams, hence a resumed run's, are
unchanged).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def projector_dims(projector) -> tuple[int, int, int]:
    """``(hidden size D, projector dim P, encoder dim Z)`` of a REPAProjector, also when wrapped
    (DDP ``.module``, torch.compile ``._orig_mod``) or partitioned (ZeRO-3 ``ds_shape``)."""
    while not hasattr(projector, "weights"):
        inner = getattr(projector, "module", None)
        projector = inner if inner is not None else projector._orig_mod
    w1, _, w2, _, w3, _ = projector.weights()
    shape = [tuple(getattr(w, "ds_shape", w.shape)) for w in (w1, w2, w3)]
    (p, d), (p2, p3), (z, p4) = shape
    if not p == p2 == p3 == p4:
        raise ValueError(f"not a REPA projector: weight shapes {shape}")
    return d, p, z


def warm_alignment_op(projector, hidden_shape: Sequence[int], target_shape: Sequence[int],
                      dtype: torch.dtype, device, *, target_dtype: Optional[torch.dtype] = None,
                      target_requires_grad: bool = False, hidden_grid: Optional[int] = None,
                      target_grid: Optional[int] = None, target_prefix_tokens: int = 0,
                      recompute: bool = True, seed: int = 0) -> str:
    """Tune or load the Triton tiles of ``projector.alignment_loss`` at these shapes.

    ``hidden_shape`` [B, T, D], ``target_shape`` [B, T', Z]; ``dtype`` is the dtype the GEMMs
    run in (the autocast dtype under autocast, else the hidden states'), ``target_dtype`` the
    encoder features' (default ``dtype``); ``target_requires_grad``, the grids, prefix tokens
    and ``recompute`` as the training step calls the op (each changes which kernels run). Call
    it after the TF32 settings are made (fp32 keys depend on them), once per distinct shape
    (a smaller last batch is another M bucket). Returns :func:`autotune.warmup`'s summary.
    """
    from ..kernels import autotune
    from .alignment import repa_alignment_loss_triton

    d, p, z = projector_dims(projector)
    if len(hidden_shape) != 3 or hidden_shape[2] != d:
        raise ValueError(f"hidden_shape must be [B, T, {d}] for this projector; got "
                         f"{list(hidden_shape)}")
    if len(target_shape) != 3 or target_shape[2] != z or target_shape[0] != hidden_shape[0]:
        raise ValueError(f"target_shape must be [{hidden_shape[0]}, T', {z}] for this projector; "
                         f"got {list(target_shape)}")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dtype=dtype, scale=1.0, grad=True):
        t = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    def step():
        hidden = randn(*hidden_shape)
        target = randn(*target_shape, dtype=target_dtype or dtype, grad=target_requires_grad)
        weights = [randn(p, d, scale=d ** -0.5), randn(p, scale=0.1),
                   randn(p, p, scale=p ** -0.5), randn(p, scale=0.1),
                   randn(z, p, scale=p ** -0.5), randn(z, scale=0.1)]
        with torch.autocast(device.type, enabled=False):
            loss = repa_alignment_loss_triton(
                hidden, target, *weights, hidden_grid=hidden_grid, target_grid=target_grid,
                target_prefix_tokens=target_prefix_tokens, recompute=recompute)
            inputs = [hidden, *weights] + ([target] if target_requires_grad else [])
            torch.autograd.grad(loss, inputs)

    return autotune.warmup(step)
