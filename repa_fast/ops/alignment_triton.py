"""Triton backend of the REPA alignment op: host wrappers, torch ops and their autograd.

Forward (three launches of fused kernels, then the finish over a grid of row blocks)::

    s1 = silu(h·W1ᵀ + b1)          linear_bias_silu_kernel   (also pre1 when saving)
    pre2, s2 = GEMM2               linear_bias_silu_kernel   (s2 = silu(pre2 rounded to dtype))
    partial sums of p·z, p·p, z·z  project_cosine_fwd_kernel (p = pooled(s2)·W3ᵀ + b3, never stored;
                                   rows scaled by powers of two so that no square overflows)
    (cos, |p|, |z|) per row        cosine_finish_kernel: one program per FINISH_BLOCK rows, each
                                   also writing its rows' Σ cos; loss = −(Σ of those)/R (torch)

Backward, with ``recompute=True`` (the default): the forward keeps the op's inputs, five
floats per pooled row and pre2 [M, P] (the second pre-activation). The backward runs each GEMM
once: s2 = silu(pre2) is elementwise and only GEMM1 is recomputed, so its GEMM FLOPs are those
of ``recompute=False`` plus one GEMM1 (1.13x at SiT-XL: D = 1152, P = 2048, Z = 768; recomputing
GEMM1 and GEMM2 would be 1.37x). [M, P] buffers alive at each step, counting the saved pre2
(autograd holds it until the backward returns); the first-layer phase runs in
``RECOMPUTE_CHUNKS`` = 2 row halves (½ = a half-height buffer)::

    s2 = silu(pre2)                                          pre2 s2                     2
    dp, dz, db3 = project_cosine_bwd_kernel   (p recomputed in registers; dp is [R, Z])
    dW3 = dpᵀ·pooled(s2);  drop s2                           pre2                        1
    dpre2, db2 = (unpool(dp)·W3) ⊙ silu'(pre2)               pre2 dpre2                  2
    for each row half c (GEMM1 runs once, over both halves):
      pre1_c, s1_c = h_c·W1ᵀ + b1, silu     (recompute)    pre2 dpre2 pre1_c s1_c      3
      dW2 += dpre2_cᵀ·s1_c;  drop s1_c
      dpre1_c, db1 += (dpre2_c·W2) ⊙ silu'(pre1_c)         pre2 dpre2 pre1_c dpre1_c   3
      drop pre1_c;  dW1 += dpre1_cᵀ·h_c;  dh_c = dpre1_c·W1;  drop dpre1_c             2

so at most three [M, P] buffers are alive (plus dh [M, D] and the [R, Z] dp). The halves'
weight gradients are summed by ``addmm_`` (the first half's product is rounded to the compute
dtype once before the second is added). The forward holds at most s1, pre2 and s2.

``recompute=False`` keeps pre1, s1, pre2, s2 from the forward instead (one pass, no GEMM
recomputed, the memory of eager PyTorch). Weight gradients and dh are plain GEMMs and go to
cuBLAS (``torch.mm``).

The forward and backward are ``torch.library.custom_op`` s with fake implementations, so
``torch.compile(fullgraph=True)`` traces them as single nodes without graph breaks.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from ..kernels.alignment_cosine import (COSINE_CONFIGS, STATS_ROWS, cosine_finish_kernel,
                                       project_cosine_bwd_kernel, project_cosine_fwd_kernel)
from ..kernels.alignment_linear_silu import linear_bias_silu_kernel, linear_grad_silu_kernel
from ..kernels.tuning import GEMM_CONFIGS, INTERPRET, m_bucket, min_block
from .alignment_common import avg_pool_tokens, in_compute_dtype, pool_ratio

# rows per program of the finish kernel (its grid: cdiv(R, FINISH_BLOCK) programs)
FINISH_BLOCK = 64 if INTERPRET else 256
# row chunks of the recompute backward's first-layer phase (GEMM1 recomputed once, by chunks)
RECOMPUTE_CHUNKS = 2
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
    """``(loss, stats)``: the fp32 loss and stats [5, R] = (cos, max(|p|, ε)·2^-k_p,
    max(|z|, ε)·2^-k_z, k_p, k_z): norms scaled by powers of two (kernels/alignment_cosine.py)."""
    r, z, k = geo.rows, w3.shape[0], w3.shape[1]
    z_slots = triton.cdiv(z, min_block(COSINE_CONFIGS, 1))
    # per Z tile: p·z, p·p, z·z of the scaled rows and the two scale exponents
    part = torch.zeros((5, z_slots, r), device=s2.device, dtype=torch.float32)
    stats = torch.empty((STATS_ROWS, r), device=s2.device, dtype=torch.float32)
    block_sums = torch.empty((triton.cdiv(r, FINISH_BLOCK),), device=s2.device,
                             dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_M"]), triton.cdiv(z, meta["BLOCK_N"]))

    with _on_device(s2):
        project_cosine_fwd_kernel[grid](
            s2, w3, b3, target, part, r, z, k, m_bucket(r), z_slots,
            geo.cells, geo.pooled_grid, geo.tokens, geo.grid, geo.grid_t, geo.prefix,
            s2.stride(0), s2.stride(1), w3.stride(0), w3.stride(1),
            target.stride(0), target.stride(1), target.stride(2),
            POOL=geo.pool, POOL_T=geo.pool_t, PRECISION=_precision(s2))
        cosine_finish_kernel[(block_sums.numel(),)](part, stats, block_sums, r, z_slots,
                                                    BLOCK=FINISH_BLOCK)
    # the second level of the sum: a fixed-order reduction of cdiv(R, FINISH_BLOCK) floats
    return -(block_sums.sum() / r), stats


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
    """``(loss, stats, pre1, s1, pre2, s2)``: pre2 always (the recompute backward needs it, so
    that GEMM2 never runs again); pre1, s1 and s2 are empty unless saving them."""
    geo = _Geometry(hidden, target, hidden_grid, target_grid, prefix)
    h = hidden.reshape(geo.m, hidden.shape[2])
    pre1, s1 = linear_bias_silu(h, w1, b1, store_pre=save_intermediates, store_act=True)
    pre2, s2 = linear_bias_silu(s1, w2, b2, store_pre=True, store_act=True)
    loss, stats = project_cosine_forward(s2, w3, b3, target, geo)
    if not save_intermediates:
        s1, s2 = hidden.new_empty(_EMPTY), hidden.new_empty(_EMPTY)
    return loss, stats, pre1, s1, pre2, s2


@alignment_loss_fwd.register_fake
def _(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid, prefix,
      save_intermediates):
    geo = _Geometry(hidden, target, hidden_grid, target_grid, prefix)
    full = (geo.m, w1.shape[0])
    inter = full if save_intermediates else _EMPTY
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty((STATS_ROWS, geo.rows), dtype=torch.float32),
            hidden.new_empty(inter), hidden.new_empty(inter), hidden.new_empty(full),
            hidden.new_empty(inter))


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
    if not saved:  # recompute: s2 from the saved pre2, elementwise (as the forward formed it)
        s2 = torch.nn.functional.silu(pre2)
    dp, db3, dt = project_cosine_backward(grad, s2, w3, b3, target, stats, geo, target_grad)
    pooled = s2 if geo.pool == 1 else avg_pool_tokens(
        s2.view(geo.batch, geo.tokens, -1), geo.grid, geo.pool).reshape(geo.rows, -1)
    dw3 = dp.t().mm(pooled)
    del s2, pooled
    dpre2, db2 = linear_grad_silu(dp, w3, pre2, geo)
    del pre2, dp
    dh, dw1, db1, dw2 = _first_layers_backward(h, w1, b1, w2, dpre2, pre1, s1, saved)
    return [dh.view(hidden.shape), dt, dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype),
            db2.to(b2.dtype), dw3.to(w3.dtype), db3.to(b3.dtype)]


def _first_layers_backward(h, w1, b1, w2, dpre2, pre1, s1, saved: bool):
    """``(dh, dW1, db1, dW2)`` from dpre2: dW2 = dpre2ᵀ·s1, dpre1 = (dpre2·W2) ⊙ silu'(pre1),
    dW1 = dpre1ᵀ·h, dh = dpre1·W1.

    Saved intermediates: one pass. Recompute: GEMM1 runs once, in ``RECOMPUTE_CHUNKS`` row
    chunks, each storing pre1 and s1 of its rows only, so that with the saved pre2 and dpre2
    at most three [M, P] buffers' worth is alive (module docstring). The chunks' weight
    gradients are summed by ``addmm_``; dh rows are independent.
    """
    m = h.shape[0]
    step = m if saved else triton.cdiv(m, RECOMPUTE_CHUNKS)
    dh = h.new_empty(h.shape)
    dw1 = dw2 = None
    db1 = torch.zeros(w1.shape[0], device=h.device, dtype=torch.float32)
    for start in range(0, m, step):
        rows = slice(start, min(start + step, m))
        if saved:
            pre1_rows, s1_rows = pre1[rows], s1[rows]
        else:
            pre1_rows, s1_rows = linear_bias_silu(h[rows], w1, b1, store_pre=True,
                                                  store_act=True)
        dw2 = _mm_sum(dw2, dpre2[rows].t(), s1_rows)
        del s1_rows
        dpre1, db1_rows = linear_grad_silu(dpre2[rows], w2, pre1_rows, None)
        del pre1_rows
        dw1 = _mm_sum(dw1, dpre1.t(), h[rows])
        torch.mm(dpre1, w1, out=dh[rows])
        db1 += db1_rows
        del dpre1
    return dh, dw1, db1, dw2


def _mm_sum(total: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·b``, added to ``total`` (in place) when given."""
    return a.mm(b) if total is None else total.addmm_(a, b)


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

def triton_loss(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid: int, target_grid: int,
                target_prefix_tokens: int, recompute: bool) -> torch.Tensor:
    """The loss of arguments :func:`check_call` accepted (grids resolved by it), on a device and
    dtype the registry said this backend runs (:func:`repa_fast.ops.backends.backend_problem`);
    the public entry is ``repa_fast.ops.alignment.repa_alignment_loss_triton``.

    The GEMMs run in :func:`compute_dtype` (weights are cast to it, differentiably, as autocast
    would); accumulation, the cosine and the loss are fp32.
    """
    # the kernels index with 32-bit offsets
    largest = max(hidden.shape[0] * hidden.shape[1] * max(hidden.shape[2], w1.shape[0]),
                  target.shape[0] * target.stride(0), w2.numel())
    if largest >= 2 ** 31:
        raise ValueError(f"the Triton kernels index with 32-bit offsets; this call needs "
                         f"{largest} elements in one tensor (hidden {list(hidden.shape)}, "
                         f"projector dim {w1.shape[0]}): split the batch into smaller chunks")
    hidden, *weights = in_compute_dtype(hidden, w1, b1, w2, b2, w3, b3)
    loss, *_ = alignment_loss_fwd(hidden, target, *weights, hidden_grid, target_grid,
                                  target_prefix_tokens, not recompute)
    return loss
