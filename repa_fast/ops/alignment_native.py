"""Native backend of the REPA alignment op: the C++/CUDA extension ``repa_fast._C`` (``csrc/``).

Importing the extension registers two dispatcher ops (``csrc/ops.cpp``)::

    repa_fast::native_alignment_fwd(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid,
        target_grid, target_prefix_tokens, save_intermediates) -> (loss, stats, pre1, pre2, proj)
    repa_fast::native_alignment_bwd(grad, hidden, target, w1, b1, w2, b2, w3, b3, stats, pre1,
        pre2, proj, hidden_grid, target_grid, target_prefix_tokens, target_requires_grad)
        -> [d_hidden, d_target, d_w1, d_b1, d_w2, d_b2, d_w3, d_b3]

The forward is three ATen GEMMs (MKL/oneDNN on the CPU, cuBLAS on CUDA) with fused stages
between them: ``s1 = silu(h·W1ᵀ + b1)`` in place, ``s̄2 = pool(silu(s1·W2ᵀ + b2))`` (pooling the
SiT tokens before the last, linear, layer, so the unpooled p is never formed), ``p = s̄2·W3ᵀ``,
and one pass for ``b3``, target pooling (prefix tokens skipped), norms and cosines::

    stats_r = (cos_r, max(|p_r|, ε), max(|z̄_r|, ε)),   loss = −mean_r cos_r,   ε = 1e-12

The cosine stage sums in float64 and keeps ``stats`` in float64, so no norm of finite float32
(float16, bfloat16) values overflows; float64 rows are scaled by a power of two first.

The backward recomputes pre1, pre2 and p from the inputs (``recompute=True``, at most three
[B·T, P] buffers live) or reads them from the forward (``recompute=False``: two [B·T, P]
buffers kept, three GEMMs fewer). Accumulation is float32, float64 for float64 inputs.

This module registers the ops' fake (meta) implementations and autograd formula, so
``torch.compile(fullgraph=True)`` traces the op as single nodes without graph breaks.
"""
from __future__ import annotations

import torch

from .alignment_common import in_compute_dtype, pool_ratio
from .native_extension import native_import_problem

_PROBLEM = native_import_problem()
if _PROBLEM is not None:
    raise ImportError(f"the native alignment-op backend is unavailable: {_PROBLEM}")

from .. import _C  # noqa: E402,F401  (loading the library registers the repa_fast:: ops)

FWD = "repa_fast::native_alignment_fwd"
BWD = "repa_fast::native_alignment_bwd"
_EMPTY = (0,)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pooled_rows(hidden: torch.Tensor, hidden_grid: int, target_grid: int) -> int:
    """R: pooled tokens over the batch."""
    pool, _ = pool_ratio(hidden_grid, target_grid)
    return hidden.shape[0] * (hidden_grid // pool) ** 2


@torch.library.register_fake(FWD)
def _forward_fake(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid,
                  target_prefix_tokens, save_intermediates):
    rows = _pooled_rows(hidden, hidden_grid, target_grid)
    acc = _accumulate_dtype(hidden.dtype)
    m, p, z = hidden.shape[0] * hidden.shape[1], w1.shape[0], w3.shape[0]
    kept = [(m, p), (m, p), (rows, z)] if save_intermediates else [_EMPTY] * 3
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((3, rows), dtype=torch.float64),
            *(hidden.new_empty(shape) for shape in kept))


@torch.library.register_fake(BWD)
def _backward_fake(grad, hidden, target, w1, b1, w2, b2, w3, b3, stats, pre1, pre2, proj,
                   hidden_grid, target_grid, target_prefix_tokens, target_requires_grad):
    # contiguous, like the GEMM outputs and the zero-filled target gradient of the real op
    return [hidden.new_empty(hidden.shape),
            target.new_empty(target.shape if target_requires_grad else _EMPTY),
            *(t.new_empty(t.shape) for t in (w1, b1, w2, b2, w3, b3))]


def _setup_context(ctx, inputs, output):
    hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid, prefix, _ = inputs
    _, stats, pre1, pre2, proj = output
    ctx.mark_non_differentiable(stats, pre1, pre2, proj)
    # only the loss gets a gradient: without this autograd would allocate zero gradients the
    # size of pre1, pre2 and proj for the backward (two [B·T, P] buffers with recompute=False)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, target, w1, b1, w2, b2, w3, b3, stats, pre1, pre2, proj)
    ctx.layout = (hidden_grid, target_grid, prefix)


def _backward(ctx, grad, *unused):
    if grad is None:  # the loss was not differentiated (grads are not materialised)
        return (None,) * 12
    target_grad = ctx.needs_input_grad[1]
    dh, dt, *dweights = torch.ops.repa_fast.native_alignment_bwd(
        grad, *ctx.saved_tensors, *ctx.layout, target_grad)
    return (dh, dt if target_grad else None, *dweights, None, None, None, None)


torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)


def native_loss(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid: int, target_grid: int,
                target_prefix_tokens: int, recompute: bool) -> torch.Tensor:
    """The loss of arguments :func:`check_call` accepted (grids resolved by it), on a device and
    dtype the registry said this backend runs (:func:`repa_fast.ops.backends.backend_problem`);
    the public entry is ``repa_fast.ops.alignment.repa_alignment_loss_native``.

    The GEMMs run in :func:`compute_dtype` (weights are cast to it, differentiably, as autocast
    would); the target keeps its dtype (read in the accumulate dtype). A float32 scalar (float64
    for float64 inputs).
    """
    # intermediates are worth keeping only for a backward
    save = not recompute and torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, target, w1, b1, w2, b2, w3, b3))
    hidden, *weights = in_compute_dtype(hidden, w1, b1, w2, b2, w3, b3)
    loss, *_ = torch.ops.repa_fast.native_alignment_fwd(
        hidden, target, *weights, hidden_grid, target_grid, target_prefix_tokens, save)
    return loss
