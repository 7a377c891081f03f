"""GEMMs of the projector MLP with their elementwise work fused into the epilogue.

Forward, ``linear_bias_silu_kernel``::

    pre = X·Wᵀ + b        (X [M, K], W [N, K] as nn.Linear stores it)
    act = silu(pre) = pre·σ(pre)    (of pre rounded to the output dtype, as eager PyTorch)

storing ``pre`` and/or ``act``. Backward, ``linear_grad_silu_kernel``::

    dpre[m] = (G[parent(m)]·W / k²) ⊙ silu'(pre[m]),   silu'(a) = σ(a)·(1 + a·(1 − σ(a)))

where ``G`` [M', K] is the gradient of the next layer's output and ``W`` [K, N] its weight, so
the SiLU derivative never runs as a separate kernel. ``parent`` undoes the k×k patch pooling
of the last layer's input (k = 1: parent(m) = m), so the pooled gradient is spread back over
the tokens it averaged. The same epilogue writes per-row-block column sums of ``dpre``: the
bias gradient without another pass over ``dpre``.

All accumulation is fp32; inputs are fp16, bf16 or fp32 (fp32 multiplies in IEEE fp32 unless
TF32 is allowed).
"""
import triton
import triton.language as tl

from .tiles import grouped_tile_ids, block_range
from .autotune import autotune
from .tuning import GEMM_CONFIGS, matmul_configs


@autotune(configs=matmul_configs(GEMM_CONFIGS),
          key=["M_BUCKET", "N", "K", "STORE_PRE", "STORE_ACT", "PRECISION"])
@triton.jit
def linear_bias_silu_kernel(
    x_ptr, w_ptr, b_ptr, pre_ptr, act_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, mask_m = block_range(pid_m, BLOCK_M, M)
    offs_n, mask_n = block_range(pid_n, BLOCK_N, N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=mask_n[None, :] & (kk[:, None] < K), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    pre = acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # rounded to the stored dtype first (a no-op in fp32): act = silu(stored pre), as eager
    # F.silu(F.linear(...)) forms it, so silu of a saved pre is the act the forward used
    pre = pre.to(pre_ptr.dtype.element_ty).to(tl.float32)
    out = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out, pre.to(pre_ptr.dtype.element_ty), mask=mask)
    if STORE_ACT:
        tl.store(act_ptr + out, (pre * tl.sigmoid(pre)).to(act_ptr.dtype.element_ty), mask=mask)


# reset_to_zero: see project_cosine_fwd_kernel (bias-gradient slots of a smaller BLOCK_M).
@autotune(configs=matmul_configs(GEMM_CONFIGS),
          key=["M_BUCKET", "N", "K", "POOL", "PRECISION"], reset_to_zero=["dbias_ptr"])
@triton.jit
def linear_grad_silu_kernel(
    g_ptr, w_ptr, pre_ptr, dpre_ptr, dbias_ptr,
    M, N, K, M_BUCKET,
    TOKENS, GRID, POOLED_GRID,
    stride_gm, stride_gk, stride_wk, stride_wn, stride_pm, stride_pn, stride_dm, stride_dn,
    POOL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, mask_m = block_range(pid_m, BLOCK_M, M)
    offs_n, mask_n = block_range(pid_n, BLOCK_N, N)
    offs_k = tl.arange(0, BLOCK_K)
    if POOL == 1:
        rows_g = offs_m
    else:
        # token m = b·T + (row·GRID + col) read the pooled row of its k×k patch
        b = offs_m // TOKENS
        t = offs_m % TOKENS
        rows_g = (b * POOLED_GRID + (t // GRID) // POOL) * POOLED_GRID + (t % GRID) // POOL
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        g = tl.load(g_ptr + rows_g[:, None] * stride_gm + kk[None, :] * stride_gk,
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(kk[:, None] < K) & mask_n[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    if POOL > 1:
        acc = acc * (1.0 / (POOL * POOL))
    mask = mask_m[:, None] & mask_n[None, :]
    pre = tl.load(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                  mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    dpre = acc * (sig * (1.0 + pre * (1.0 - sig)))
    dpre = tl.where(mask, dpre, 0.0)
    tl.store(dpre_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
             dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    # bias gradient: this row block's column sums, one row of the [row blocks, N] buffer
    tl.store(dbias_ptr + pid_m * N + offs_n, tl.sum(dpre, axis=0), mask=mask_n)
