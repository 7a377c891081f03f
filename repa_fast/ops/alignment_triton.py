"""Triton backend of the REPA alignment op: host wrappers, torch ops and their autograd.

Forward (three launches of fused kernels, then a one-program finish)::

    s1 = silu(h·W1ᵀ + b1)          linear_bias_silu_kernel
    s2 = silu(s1·W2ᵀ + b2)         linear_bias_silu_kernel   (also pre2 when saving)
    partial sums of p·z, p·p, z·z  project_cosine_fwd_kernel (p = pooled(s2)·W3ᵀ + b3, never stored)
    loss, (cos, |p|, |z|) per row  cosine_finish_kernel

Backward, with ``recompute=True`` (the default) only the op's inputs and three floats per
pooled token are kept from the forward; the intermediates are recomputed, in an order that
holds at most three [M, P] buffers at once::

    s1 = silu(h·W1ᵀ + b1);  pre2, s2 = GEMM2                      (recompute)
    dp, dz, db3 = project_cosine_bwd_kernel                        (p recomputed in registers)
    dW3 = dpᵀ·pooled(s2)                                           drop s2
    dpre2, db2 = (unpool(dp)·W3) ⊙ silu'(pre2)   linear_grad_silu  drop pre2
    dW2 = dpre2ᵀ·s1                                                drop s1
    pre1 = h·W1ᵀ + b1                                              (recompute)
    dpre1, db1 = (dpre2·W2) ⊙ silu'(pre1)        linear_grad_silu
    dW1 = dpre1ᵀ·h;  dh = dpre1·W1

``recompute=False`` keeps pre1, s1, pre2, s2 from the forward instead (faster, the memory of
eager PyTorch). Weight gradients and dh are plain GEMMs and go to cuBLAS (``torch.mm``).

The forward and backward are ``torch.library.custom_op`` s with fake implementations, so
``torch.compile(fullgraph=True)`` traces them as single nodes without graph breaks.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from ..kernels.cosine import (COSINE_CONFIGS, cosine_finish_kernel, project_cosine_bwd_kernel,
                              project_cosine_fwd_kernel)
from ..kernels.linear_silu import linear_bias_silu_kernel, linear_grad_silu_kernel
from ..kernels.tuning import GEMM_CONFIGS, INTERPRET, m_bucket, min_block
from .alignment_reference import avg_pool_tokens, check_call, pool_ratio
from .backends import _triton_problem, compute_dtype

FINISH_BLOCK = 128 if INTERPRET else 1024
_EMPTY = (0,)


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tf32_allowed() -> bool:
    """Whether torch would use TF32 for fp32 matmuls on CUDA (legacy or new API)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy flag once the new API has been used
        setting = torch.backends.cuda.matmul.fp32_precision
        if setting == "none":
            setting = torch.backends.fp32_precision
        return setting == "tf32"


def _precision(t: torch.Tensor) -> str:
    # fp32 multiplies exactly unless the user allowed TF32 for matmuls, as torch does
    if t.dtype == torch.float32 and not (t.is_cuda and _tf32_allowed()):
        return "ieee"
    return "tf32"


class _Geometry:
    """Token layout of one call: grids, pooling factors and the pooled row count R."""

    def __init__(self, hidden: torch.Tensor, target: torch.Tensor, hidden_grid: int,
                 target_grid: int, prefix: int):
        self.batch, self.tokens = hidden.shape[0], hidden.shape[1]
        self.grid, self.grid_t, self.prefix = hidden_grid, target_grid, prefix
        self.pool, self.pool_t = pool_ratio(hidden_grid, target_grid)
        self.pooled_grid = hidden_grid // self.pool
        self.cells = self.pooled_grid ** 2
        self.rows = self.batch * self.cells  # R: pooled tokens over the batch
        self.m = self.batch * self.tokens    # M: SiT tokens over the batch


# ----------------------------------------------------------------------------- launches

def linear_bias_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, store_pre: bool,
                     store_act: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre, act)`` = ``(x·wᵀ + b, silu(x·wᵀ + b))`` for x [M, K]; the ones not stored are empty."""
    m, k = x.shape
    n = w.shape[0]
    pre = x.new_empty((m, n) if store_pre else _EMPTY)
    act = x.new_empty((m, n) if store_act else _EMPTY)
    out = act if store_act else pre

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with _on_device(x):
        linear_bias_silu_kernel[grid](
            x, w, b, pre, act, m, n, k, m_bucket(m),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            STORE_PRE=store_pre, STORE_ACT=store_act, PRECISION=_precision(x))
    return pre, act


def linear_grad_silu(g: torch.Tensor, w: torch.Tensor, pre: torch.Tensor, geo: Optional[_Geometry]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dpre, dbias)``: dpre = (unpool(g)·w) ⊙ silu'(pre), g [M', K], w [K, N], pre [M, N].

    ``geo`` given: g holds pooled rows (one per k×k cell) spread back over the SiT tokens.
    """
    m, n = pre.shape
    k = g.shape[1]
    dpre = torch.empty_like(pre)
    slots = triton.cdiv(m, min_block(GEMM_CONFIGS, 0))
    dbias = torch.zeros((slots, n), device=pre.device, dtype=torch.float32)
    pool = geo.pool if geo is not None else 1
    tokens, grid_, pooled = (geo.tokens, geo.grid, geo.pooled_grid) if geo else (1, 1, 1)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with _on_device(pre):
        linear_grad_silu_kernel[grid](
            g, w, pre, dpre, dbias, m, n, k, m_bucket(m), tokens, grid_, pooled,
            g.stride(0), g.stride(1), w.stride(0), w.stride(1), pre.stride(0), pre.stride(1),
            dpre.stride(0), dpre.stride(1), POOL=pool, PRECISION=_precision(pre))
    return dpre, dbias.sum(0)


def project_cosine_forward(s2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
                           target: torch.Tensor, geo: _Geometry
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)``: the fp32 loss and stats [3, R] = (cos, max(|p|, ε), max(|z|, ε))."""
    r, z, k = geo.rows, w3.shape[0], w3.shape[1]
    z_slots = triton.cdiv(z, min_block(COSINE_CONFIGS, 1))
    part = torch.zeros((3, z_slots, r), device=s2.device, dtype=torch.float32)
    stats = torch.empty((3, r), device=s2.device, dtype=torch.float32)
    loss = torch.empty((), device=s2.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_M"]), triton.cdiv(z, meta["BLOCK_N"]))

    with _on_device(s2):
        project_cosine_fwd_kernel[grid](
            s2, w3, b3, target, part, r, z, k, m_bucket(r), z_slots,
            geo.cells, geo.pooled_grid, geo.tokens, geo.grid, geo.grid_t, geo.prefix,
            s2.stride(0), s2.stride(1), w3.stride(0), w3.stride(1),
            target.stride(0), target.stride(1), target.stride(2),
            POOL=geo.pool, POOL_T=geo.pool_t, PRECISION=_precision(s2))
        cosine_finish_kernel[(1,)](part, stats, loss, r, z_slots, BLOCK=FINISH_BLOCK)
    return loss, stats


def project_cosine_backward(grad: torch.Tensor, s2: torch.Tensor, w3: torch.Tensor,
                            b3: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                            geo: _Geometry, target_grad: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dp [R, Z], db3 [Z] fp32, dtarget)``; dtarget is empty unless ``target_grad``."""
    r, z, k = geo.rows, w3.shape[0], w3.shape[1]
    dp = s2.new_empty((r, z))
    slots = triton.cdiv(r, min_block(COSINE_CONFIGS, 0))
    dbias = torch.zeros((slots, z), device=s2.device, dtype=torch.float32)
    # prefix tokens get no gradient; every other target row is written by the kernel
    dt = target.new_zeros(target.shape) if target_grad else target.new_empty(_EMPTY)
    dt_strides = dt.stride() if target_grad else (0, 0, 0)

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_M"]), triton.cdiv(z, meta["BLOCK_N"]))

    with _on_device(s2):
        project_cosine_bwd_kernel[grid](
            s2, w3, b3, target, stats, grad, dp, dbias, dt, r, z, k, m_bucket(r),
            geo.cells, geo.pooled_grid, geo.tokens, geo.grid, geo.grid_t, geo.prefix,
            s2.stride(0), s2.stride(1), w3.stride(0), w3.stride(1),
            target.stride(0), target.stride(1), target.stride(2),
            dp.stride(0), dp.stride(1), *dt_strides,
            POOL=geo.pool, POOL_T=geo.pool_t, TARGET_GRAD=target_grad,
            PRECISION=_precision(s2))
    return dp, dbias.sum(0), dt


# ----------------------------------------------------------------------------- torch ops

@torch.library.custom_op("repa_fast::alignment_loss_fwd", mutates_args=())
def alignment_loss_fwd(hidden: torch.Tensor, target: torch.Tensor, w1: torch.Tensor,
                       b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor,
                       b3: torch.Tensor, hidden_grid: int, target_grid: int, prefix: int,
                       save_intermediates: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    """``(loss, stats, pre1, s1, pre2, s2)``; the last four are empty unless saving them."""
    geo = _Geometry(hidden, target, hidden_grid, target_grid, prefix)
    h = hidden.reshape(geo.m, hidden.shape[2])
    pre1, s1 = linear_bias_silu(h, w1, b1, store_pre=save_intermediates, store_act=True)
    pre2, s2 = linear_bias_silu(s1, w2, b2, store_pre=save_intermediates, store_act=True)
    loss, stats = project_cosine_forward(s2, w3, b3, target, geo)
    if not save_intermediates:
        s1, s2 = hidden.new_empty(_EMPTY), hidden.new_empty(_EMPTY)
    return loss, stats, pre1, s1, pre2, s2


@alignment_loss_fwd.register_fake
def _(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid, prefix,
      save_intermediates):
    geo = _Geometry(hidden, target, hidden_grid, target_grid, prefix)
    inter = (geo.m, w1.shape[0]) if save_intermediates else _EMPTY
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty((3, geo.rows), dtype=torch.float32),
            *(hidden.new_empty(inter) for _ in range(4)))


@torch.library.custom_op("repa_fast::alignment_loss_bwd", mutates_args=())
def alignment_loss_bwd(grad: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor,
                       w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                       w3: torch.Tensor, b3: torch.Tensor, stats: torch.Tensor,
                       pre1: torch.Tensor, s1: torch.Tensor, pre2: torch.Tensor,
                       s2: torch.Tensor, hidden_grid: int, target_grid: int, prefix: int,
                       target_grad: bool) -> list[torch.Tensor]:
    """``[dhidden, dtarget, dw1, db1, dw2, db2, dw3, db3]``; dtarget empty unless asked."""
    geo = _Geometry(hidden, target, hidden_grid, target_grid, prefix)
    h = hidden.reshape(geo.m, hidden.shape[2])
    saved = s2.numel() > 0
    if not saved:
        _, s1 = linear_bias_silu(h, w1, b1, store_pre=False, store_act=True)
        pre2, s2 = linear_bias_silu(s1, w2, b2, store_pre=True, store_act=True)
    dp, db3, dt = project_cosine_backward(grad, s2, w3, b3, target, stats, geo, target_grad)
    pooled = s2 if geo.pool == 1 else avg_pool_tokens(
        s2.view(geo.batch, geo.tokens, -1), geo.grid, geo.pool).reshape(geo.rows, -1)
    dw3 = dp.t().mm(pooled)
    del s2, pooled
    dpre2, db2 = linear_grad_silu(dp, w3, pre2, geo)
    del pre2, dp
    dw2 = dpre2.t().mm(s1)
    del s1
    if not saved:
        pre1, _ = linear_bias_silu(h, w1, b1, store_pre=True, store_act=False)
    dpre1, db1 = linear_grad_silu(dpre2, w2, pre1, None)
    del pre1, dpre2
    dw1 = dpre1.t().mm(h)
    dh = dpre1.mm(w1).view(hidden.shape)
    return [dh, dt, dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype),
            dw3.to(w3.dtype), db3.to(b3.dtype)]


@alignment_loss_bwd.register_fake
def _(grad, hidden, target, w1, b1, w2, b2, w3, b3, stats, pre1, s1, pre2, s2, hidden_grid,
      target_grid, prefix, target_grad):
    # contiguous, like the GEMM outputs and the zero-filled target gradient of the real op
    return [hidden.new_empty(hidden.shape),
            target.new_empty(target.shape if target_grad else _EMPTY),
            *(t.new_empty(t.shape) for t in (w1, b1, w2, b2, w3, b3))]


def _setup_context(ctx, inputs, output):
    hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid, prefix, _ = inputs
    _, stats, pre1, s1, pre2, s2 = output
    ctx.save_for_backward(hidden, target, w1, b1, w2, b2, w3, b3, stats, pre1, s1, pre2, s2)
    ctx.layout = (hidden_grid, target_grid, prefix)
    # the saved intermediates are outputs only to be saved: no zero-filled gradients for them
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *unused):
    saved = ctx.saved_tensors
    if grad is None:  # only reachable if the loss itself is unused: its gradient is zero
        grad = saved[8].new_zeros(())
    target_grad = ctx.needs_input_grad[1]
    dh, dt, *dweights = alignment_loss_bwd(grad, *saved, *ctx.layout, target_grad)
    return (dh, dt if target_grad else None, *dweights, None, None, None, None)


alignment_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry point

def repa_alignment_loss_triton(hidden: torch.Tensor, target: torch.Tensor,
                               w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                               b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, *,
                               hidden_grid: Optional[int] = None,
                               target_grid: Optional[int] = None,
                               target_prefix_tokens: int = 0,
                               recompute: bool = True) -> torch.Tensor:
    """The alignment loss on the fused Triton kernels (fp32 scalar); see the module docstring.

    The GEMMs run in :func:`compute_dtype` (weights are cast to it, differentiably, as
    autocast would); accumulation, the cosine and the loss are fp32.
    """
    hg, tg = check_call(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid,
                        target_prefix_tokens)
    dtype = compute_dtype(hidden)
    problem = _triton_problem(hidden.device, dtype)
    if problem is not None:
        raise ValueError(f"alignment-op backend 'triton' cannot run this call: {problem}")
    # the kernels index with 32-bit offsets
    largest = max(hidden.shape[0] * hidden.shape[1] * max(hidden.shape[2], w1.shape[0]),
                  target.shape[0] * target.stride(0), w2.numel())
    if largest >= 2 ** 31:
        raise ValueError(f"the Triton kernels index with 32-bit offsets; this call needs "
                         f"{largest} elements in one tensor (hidden {list(hidden.shape)}, "
                         f"projector dim {w1.shape[0]}): split the batch into smaller chunks")
    weights = [w.to(dtype) for w in (w1, b1, w2, b2, w3, b3)]
    loss, *_ = alignment_loss_fwd(hidden.to(dtype), target, *weights, hg, tg,
                                  target_prefix_tokens, not recompute)
    return loss
