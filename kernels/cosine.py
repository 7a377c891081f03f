"""The projector's last GEMM fused with patch-token pooling and the normalised cosine.

For pooled row r (sample b, cell (i, j) of the G×G grid both sides are pooled to)::

    s̄_r = mean of the k_h×k_h SiT rows of s = silu(pre₂) in cell r   (pooling before the GEMM
                                                                     is exact: it is linear)
    p_r = s̄_r·W3ᵀ + b3                     z_r = mean of the k_t×k_t target rows in cell r
    cos_r = <p_r, z_r> / (max(|p_r|, ε)·max(|z_r|, ε))        loss = −(1/R)·Σ_r cos_r

``project_cosine_fwd_kernel`` computes a [BLOCK_M, BLOCK_Z] tile of p in registers and writes
only its per-row partial sums p·z, p·p, z·z (never p itself); ``cosine_finish_kernel`` runs one
program per block of rows: it adds the partials of all Z tiles, forms cos_r, keeps
(cos, |p|, |z|) per row for the backward and writes the block's sum of cos_r; the loss is
−(1/R)·(sum of the block sums), a fixed-order (bitwise repeatable) two-level sum with no
serial loop over R. ``project_cosine_bwd_kernel`` recomputes the tile of p and writes, with
g the loss gradient, c = −g/R, n_p = max(|p|, ε), n_z = max(|z|, ε)::

    dp_r = c·(z_r/(n_p·n_z) − [|p_r| > ε]·cos_r·p_r/n_p²)
    dz_r = c·(p_r/(n_p·n_z) − [|z_r| > ε]·cos_r·z_r/n_z²) / k_t²   to each target row of cell r

plus per-row-block column sums of dp (the gradient of b3).
"""
import triton
import triton.language as tl

from .tiles import block_range
from .autotune import autotune
from .tuning import matmul_configs

# Z (the encoder width, 384-1536) is the N of this GEMM; K is the projector dim. Shared by the
# forward and the backward, whose epilogue keeps three fp32 tiles (p, z, dp or dz) live, so no
# config may spill registers on sm_90 in any dtype (tests/kernel_compile_check.py --all; with
# Triton 3.8: 128x256 w8 spills everywhere, 128x128 w8, 64x128 w4 and 128x64 w4 in the bf16
# backward, 128x64 w8 and every BLOCK_K = 64 tile in the fp32 backward with a pooled target).
COSINE_CONFIGS = [
    (64, 128, 32, 8, 3),
    (64, 128, 32, 8, 4),
    (64, 64, 32, 4, 3),
    (64, 64, 32, 4, 4),
]
EPS = tl.constexpr(1e-12)  # F.normalize's eps


@triton.jit
def _cell_rows(offs_r, CELLS, POOLED_GRID):
    """Sample and (row, col) of each pooled row r = b·G² + i·G + j."""
    b = offs_r // CELLS
    q = offs_r % CELLS
    return b, q // POOLED_GRID, q % POOLED_GRID


@triton.jit
def _projected_tile(s_ptr, w_ptr, b_ptr, offs_r, offs_z, mask_r, mask_z, K,
                    CELLS, POOLED_GRID, TOKENS, GRID, stride_sm, stride_sk, stride_wz, stride_wk,
                    POOL: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile p[offs_r, offs_z] = pooled(s)·W3ᵀ + b3, pooling the SiT rows while loading."""
    b, ci, cj = _cell_rows(offs_r, CELLS, POOLED_GRID)
    first = b * TOKENS + (ci * POOL) * GRID + cj * POOL  # top-left token of each cell
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_a = mask_r[:, None] & (kk[None, :] < K)
        if POOL == 1:
            a = tl.load(s_ptr + first[:, None] * stride_sm + kk[None, :] * stride_sk,
                        mask=mask_a, other=0.0)
        else:
            total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for di in tl.static_range(POOL):
                for dj in tl.static_range(POOL):
                    rows = first + di * GRID + dj
                    total += tl.load(s_ptr + rows[:, None] * stride_sm + kk[None, :] * stride_sk,
                                     mask=mask_a, other=0.0).to(tl.float32)
            a = (total * (1.0 / (POOL * POOL))).to(s_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_z[None, :] * stride_wz + kk[:, None] * stride_wk,
                    mask=mask_z[None, :] & (kk[:, None] < K), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc + tl.load(b_ptr + offs_z, mask=mask_z, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _target_tile(t_ptr, offs_r, offs_z, mask_r, mask_z, CELLS, POOLED_GRID, GRID_T, PREFIX,
                 stride_tb, stride_tt, stride_tz, POOL_T: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 tile of the pooled target z[offs_r, offs_z] (prefix tokens skipped)."""
    b, ci, cj = _cell_rows(offs_r, CELLS, POOLED_GRID)
    first = PREFIX + (ci * POOL_T) * GRID_T + cj * POOL_T
    mask = mask_r[:, None] & mask_z[None, :]
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for di in tl.static_range(POOL_T):
        for dj in tl.static_range(POOL_T):
            tok = first + di * GRID_T + dj
            z += tl.load(t_ptr + b[:, None] * stride_tb + tok[:, None] * stride_tt
                         + offs_z[None, :] * stride_tz, mask=mask, other=0.0).to(tl.float32)
    if POOL_T > 1:
        z = z * (1.0 / (POOL_T * POOL_T))
    return z


# reset_to_zero: autotuning runs every config into the same buffer; a winner with larger
# blocks writes fewer slots, so the slots others wrote must be zeroed again afterwards.
@autotune(configs=matmul_configs(COSINE_CONFIGS),
          key=["R_BUCKET", "Z", "K", "POOL", "POOL_T", "PRECISION"], reset_to_zero=["part_ptr"])
@triton.jit
def project_cosine_fwd_kernel(
    s_ptr, w_ptr, b_ptr, t_ptr, part_ptr,
    R, Z, K, R_BUCKET, Z_SLOTS,
    CELLS, POOLED_GRID, TOKENS, GRID, GRID_T, PREFIX,
    stride_sm, stride_sk, stride_wz, stride_wk, stride_tb, stride_tt, stride_tz,
    POOL: tl.constexpr, POOL_T: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """part[0|1|2, z_block, r] = Σ over this Z tile of p·z | p·p | z·z.

    ``part`` is zero-filled with Z_SLOTS ≥ (number of Z tiles) slots, so its size does not
    depend on the autotuned BLOCK_N; unused slots stay zero.
    """
    pid_r = tl.program_id(0)
    pid_z = tl.program_id(1)
    offs_r, mask_r = block_range(pid_r, BLOCK_M, R)
    offs_z, mask_z = block_range(pid_z, BLOCK_N, Z)
    p = _projected_tile(s_ptr, w_ptr, b_ptr, offs_r, offs_z, mask_r, mask_z, K, CELLS,
                        POOLED_GRID, TOKENS, GRID, stride_sm, stride_sk, stride_wz, stride_wk,
                        POOL, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    p = tl.where(mask_z[None, :], p, 0.0)
    z = _target_tile(t_ptr, offs_r, offs_z, mask_r, mask_z, CELLS, POOLED_GRID, GRID_T, PREFIX,
                     stride_tb, stride_tt, stride_tz, POOL_T, BLOCK_M, BLOCK_N)
    plane = Z_SLOTS * R
    base = part_ptr + pid_z * R + offs_r
    tl.store(base, tl.sum(p * z, axis=1), mask=mask_r)
    tl.store(base + plane, tl.sum(p * p, axis=1), mask=mask_r)
    tl.store(base + 2 * plane, tl.sum(z * z, axis=1), mask=mask_r)


@triton.jit
def cosine_finish_kernel(part_ptr, stats_ptr, block_sum_ptr, R, Z_SLOTS, BLOCK: tl.constexpr):
    """Program ``pid`` finishes rows ``[pid·BLOCK, (pid + 1)·BLOCK)``: stats[0|1|2, r] = cos_r,
    max(|p_r|, ε), max(|z_r|, ε), and block_sum[pid] = Σ of its cos_r (loss = −Σ block_sum / R,
    summed by the host in a fixed order)."""
    offs, mask = block_range(tl.program_id(0), BLOCK, R)
    plane = Z_SLOTS * R
    pz = tl.zeros((BLOCK,), dtype=tl.float32)
    pp = tl.zeros((BLOCK,), dtype=tl.float32)
    zz = tl.zeros((BLOCK,), dtype=tl.float32)
    for zb in range(0, Z_SLOTS):
        pz += tl.load(part_ptr + zb * R + offs, mask=mask, other=0.0)
        pp += tl.load(part_ptr + plane + zb * R + offs, mask=mask, other=0.0)
        zz += tl.load(part_ptr + 2 * plane + zb * R + offs, mask=mask, other=0.0)
    norm_p = tl.maximum(tl.sqrt(pp), EPS)
    norm_z = tl.maximum(tl.sqrt(zz), EPS)
    cos = pz / (norm_p * norm_z)
    tl.store(stats_ptr + offs, cos, mask=mask)
    tl.store(stats_ptr + R + offs, norm_p, mask=mask)
    tl.store(stats_ptr + 2 * R + offs, norm_z, mask=mask)
    tl.store(block_sum_ptr + tl.program_id(0), tl.sum(tl.where(mask, cos, 0.0), axis=0))


@autotune(configs=matmul_configs(COSINE_CONFIGS),
          key=["R_BUCKET", "Z", "K", "POOL", "POOL_T", "TARGET_GRAD", "PRECISION"],
          reset_to_zero=["dbias_ptr"])
@triton.jit
def project_cosine_bwd_kernel(
    s_ptr, w_ptr, b_ptr, t_ptr, stats_ptr, grad_ptr, dp_ptr, dbias_ptr, dt_ptr,
    R, Z, K, R_BUCKET,
    CELLS, POOLED_GRID, TOKENS, GRID, GRID_T, PREFIX,
    stride_sm, stride_sk, stride_wz, stride_wk, stride_tb, stride_tt, stride_tz,
    stride_dpr, stride_dpz, stride_dtb, stride_dtt, stride_dtz,
    POOL: tl.constexpr, POOL_T: tl.constexpr, TARGET_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_z = tl.program_id(1)
    offs_r, mask_r = block_range(pid_r, BLOCK_M, R)
    offs_z, mask_z = block_range(pid_z, BLOCK_N, Z)
    mask = mask_r[:, None] & mask_z[None, :]
    p = _projected_tile(s_ptr, w_ptr, b_ptr, offs_r, offs_z, mask_r, mask_z, K, CELLS,
                        POOLED_GRID, TOKENS, GRID, stride_sm, stride_sk, stride_wz, stride_wk,
                        POOL, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    z = _target_tile(t_ptr, offs_r, offs_z, mask_r, mask_z, CELLS, POOLED_GRID, GRID_T, PREFIX,
                     stride_tb, stride_tt, stride_tz, POOL_T, BLOCK_M, BLOCK_N)
    cos = tl.load(stats_ptr + offs_r, mask=mask_r, other=0.0)
    norm_p = tl.load(stats_ptr + R + offs_r, mask=mask_r, other=1.0)
    norm_z = tl.load(stats_ptr + 2 * R + offs_r, mask=mask_r, other=1.0)
    c = -tl.load(grad_ptr).to(tl.float32) / R
    inv_pz = c / (norm_p * norm_z)
    # the clamp at ε stops the gradient through the norm (as in F.normalize)
    p_term = tl.where(norm_p > EPS, c * cos / (norm_p * norm_p), 0.0)
    dp = inv_pz[:, None] * z - p_term[:, None] * p
    dp = tl.where(mask, dp, 0.0)
    tl.store(dp_ptr + offs_r[:, None] * stride_dpr + offs_z[None, :] * stride_dpz,
             dp.to(dp_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_ptr + pid_r * Z + offs_z, tl.sum(dp, axis=0), mask=mask_z)
    if TARGET_GRAD:
        z_term = tl.where(norm_z > EPS, c * cos / (norm_z * norm_z), 0.0)
        dz = inv_pz[:, None] * p - z_term[:, None] * z
        if POOL_T > 1:
            dz = dz * (1.0 / (POOL_T * POOL_T))
        b, ci, cj = _cell_rows(offs_r, CELLS, POOLED_GRID)
        first = PREFIX + (ci * POOL_T) * GRID_T + cj * POOL_T
        for di in tl.static_range(POOL_T):
            for dj in tl.static_range(POOL_T):
                tok = first + di * GRID_T + dj
                tl.store(dt_ptr + b[:, None] * stride_dtb + tok[:, None] * stride_dtt
                         + offs_z[None, :] * stride_dtz, dz.to(dt_ptr.dtype.element_ty),
                         mask=mask)
