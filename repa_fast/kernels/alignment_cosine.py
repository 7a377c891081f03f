"""The projector's last GEMM fused with patch-token pooling and the normalised cosine.

For pooled row r (sample b, cell (i, j) of the G×G grid both sides are pooled to)::

    s̄_r = mean of the k_h×k_h SiT rows of s = silu(pre₂) in cell r   (pooling before the GEMM
                                                                     is exact: it is linear)
    p_r = s̄_r·W3ᵀ + b3                     z_r = mean of the k_t×k_t target rows in cell r
    cos_r = <p_r, z_r> / (max(|p_r|, ε)·max(|z_r|, ε))        loss = −(1/R)·Σ_r cos_r

``project_cosine_fwd_kernel`` computes a [BLOCK_M, BLOCK_Z] tile of p in registers and writes
only its per-row partial sums p·z, p·p, z·z (never p itself); ``cosine_finish_kernel`` runs one
program per block of rows: it adds the partials of all Z tiles, forms cos_r, keeps per-row
stats for the backward and writes the block's sum of cos_r; the loss is −(1/R)·(sum of the
block sums), a fixed-order (bitwise repeatable) two-level sum with no serial loop over R.

No overflow: |p|² overflows float32 once |p| ≳ 1.8e19 (the loss would silently be 0). Each
tile row is therefore scaled by a power of two 2^-k before its sums, k ≥ 0 the smallest with
max|x|·2^-k < 4 (k = 0 for rows below 4: those are summed exactly as before), and the partial
sums carry k; the finish rescales every tile to the row's largest k (exact: powers of two) and
keeps the norms scaled, so every finite p and z gives the right cos and stats. Cost, per tile:
two row maxima over the registers the sums already read, two multiplies per element and two
more per-row stores; the finish reads five planes instead of three. Next to the K-loop of the
tile's GEMM this is noise. Stats per row (float32)::

    stats[0] = cos_r,  stats[1] = max(|p_r|, ε)·2^-k_p,  stats[2] = max(|z_r|, ε)·2^-k_z,
    stats[3] = k_p,    stats[4] = k_z

``project_cosine_bwd_kernel`` recomputes the tile of p and writes, with g the loss gradient,
c = −g/R, n_p = max(|p|, ε), n_z = max(|z|, ε)::

    dp_r = c·(z_r/(n_p·n_z) − [|p_r| > ε]·cos_r·p_r/n_p²)
    dz_r = c·(p_r/(n_p·n_z) − [|z_r| > ε]·cos_r·z_r/n_z²) / k_t²   to each target row of cell r

in the scaled variables p' = p·2^-k_p, z' = z·2^-k_z, n'_p = n_p·2^-k_p, n'_z = n_z·2^-k_z
(stats), where no product overflows:

    dp_r = (c·2^-k_p/(n'_p·n'_z))·z' − [|p_r| > ε]·(c·cos_r·2^-k_p/n'_p²)·p'

and dz_r likewise with k_z (two more multiplies per element), plus per-row-block column sums of
dp (the gradient of b3).
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
STATS_ROWS = 5  # cos, scaled |p|, scaled |z|, k_p, k_z (module docstring)


@triton.jit
def _scale_exponent(m):
    """k ∈ [0, 126] (int32) with m·2^-k < 4 for a max-abs m ≥ 0: 0 for m < 4, else e − 128,
    e the biased exponent of m (m ∈ [2^(e−127), 2^(e−126)): m·2^-k ∈ [2, 4)); Inf/NaN: 126."""
    e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.minimum(tl.maximum(e - 128, 0), 126)


@triton.jit
def _exp2_int(n):
    """2^n, exactly, for int32 n in [−126, 127]: the float32 whose exponent field is n + 127."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


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
    """part[0|1|2, z_block, r] = Σ over this Z tile of p'·z' | p'·p' | z'·z', with p' = p·2^-k_p
    and z' = z·2^-k_z scaled per row of the tile, and part[3|4, z_block, r] = k_p | k_z.

    ``part`` is zero-filled with Z_SLOTS ≥ (number of Z tiles) slots, so its size does not
    depend on the autotuned BLOCK_N; unused slots stay zero (k = 0: no effect on the maximum).
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
    # exact power-of-two scaling: squares and sums below 16·BLOCK_N, whatever the values
    k_p = _scale_exponent(tl.max(tl.abs(p), axis=1))
    k_z = _scale_exponent(tl.max(tl.abs(z), axis=1))
    p = p * _exp2_int(-k_p)[:, None]
    z = z * _exp2_int(-k_z)[:, None]
    plane = Z_SLOTS * R
    base = part_ptr + pid_z * R + offs_r
    tl.store(base, tl.sum(p * z, axis=1), mask=mask_r)
    tl.store(base + plane, tl.sum(p * p, axis=1), mask=mask_r)
    tl.store(base + 2 * plane, tl.sum(z * z, axis=1), mask=mask_r)
    tl.store(base + 3 * plane, k_p.to(tl.float32), mask=mask_r)
    tl.store(base + 4 * plane, k_z.to(tl.float32), mask=mask_r)


@triton.jit
def cosine_finish_kernel(part_ptr, stats_ptr, block_sum_ptr, R, Z_SLOTS, BLOCK: tl.constexpr):
    """Program ``pid`` finishes rows ``[pid·BLOCK, (pid + 1)·BLOCK)``: stats[·, r] (module
    docstring) and block_sum[pid] = Σ of its cos_r (loss = −Σ block_sum / R, summed by the host
    in a fixed order).

    The tiles' sums are brought to the row's largest scale k = max over tiles (× 2^(k_t − k),
    exact, ≥ 2^-126 as every k_t ∈ [0, 126]); then |p| = √pp·2^k_p and
    cos = pz / (max(√pp, ε·2^-k_p)·max(√zz, ε·2^-k_z)), all in range.
    """
    offs, mask = block_range(tl.program_id(0), BLOCK, R)
    plane = Z_SLOTS * R
    k_p = tl.zeros((BLOCK,), dtype=tl.int32)
    k_z = tl.zeros((BLOCK,), dtype=tl.int32)
    for zb in range(0, Z_SLOTS):
        k_p = tl.maximum(k_p, tl.load(part_ptr + 3 * plane + zb * R + offs, mask=mask,
                                      other=0.0).to(tl.int32))
        k_z = tl.maximum(k_z, tl.load(part_ptr + 4 * plane + zb * R + offs, mask=mask,
                                      other=0.0).to(tl.int32))
    pz = tl.zeros((BLOCK,), dtype=tl.float32)
    pp = tl.zeros((BLOCK,), dtype=tl.float32)
    zz = tl.zeros((BLOCK,), dtype=tl.float32)
    for zb in range(0, Z_SLOTS):
        tile = part_ptr + zb * R + offs
        r_p = _exp2_int(tl.load(tile + 3 * plane, mask=mask, other=0.0).to(tl.int32) - k_p)
        r_z = _exp2_int(tl.load(tile + 4 * plane, mask=mask, other=0.0).to(tl.int32) - k_z)
        pz += tl.load(tile, mask=mask, other=0.0) * r_p * r_z
        pp += tl.load(tile + plane, mask=mask, other=0.0) * (r_p * r_p)
        zz += tl.load(tile + 2 * plane, mask=mask, other=0.0) * (r_z * r_z)
    norm_p = tl.maximum(tl.sqrt(pp), _exp2_int(-k_p) * EPS)  # max(|p|, ε)·2^-k_p
    norm_z = tl.maximum(tl.sqrt(zz), _exp2_int(-k_z) * EPS)
    cos = pz / (norm_p * norm_z)
    tl.store(stats_ptr + offs, cos, mask=mask)
    tl.store(stats_ptr + R + offs, norm_p, mask=mask)
    tl.store(stats_ptr + 2 * R + offs, norm_z, mask=mask)
    tl.store(stats_ptr + 3 * R + offs, k_p.to(tl.float32), mask=mask)
    tl.store(stats_ptr + 4 * R + offs, k_z.to(tl.float32), mask=mask)
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
    norm_p = tl.load(stats_ptr + R + offs_r, mask=mask_r, other=1.0)      # n'_p = n_p·2^-k_p
    norm_z = tl.load(stats_ptr + 2 * R + offs_r, mask=mask_r, other=1.0)  # n'_z = n_z·2^-k_z
    k_p = tl.load(stats_ptr + 3 * R + offs_r, mask=mask_r, other=0.0).to(tl.int32)
    k_z = tl.load(stats_ptr + 4 * R + offs_r, mask=mask_r, other=0.0).to(tl.int32)
    scale_p = _exp2_int(-k_p)
    scale_z = _exp2_int(-k_z)
    c = -tl.load(grad_ptr).to(tl.float32) / R
    c_pz = c / (norm_p * norm_z)  # n' ∈ [ε, 4·√Z]: no factor here overflows
    # the clamp at ε stops the gradient through the norm (as in F.normalize); |p| > ε exactly
    # where the finish did not clamp n'_p at ε·2^-k_p
    p_term = tl.where(norm_p > scale_p * EPS, c * cos / (norm_p * norm_p), 0.0) * scale_p
    z_term = tl.where(norm_z > scale_z * EPS, c * cos / (norm_z * norm_z), 0.0) * scale_z
    dp_z = c_pz * scale_p
    dz_p = c_pz * scale_z
    # every per-row factor is formed before the tiles are scaled: fewer values live beside them
    # (ptxas: no spills in fp32 with a pooled target gradient)
    p = p * scale_p[:, None]  # p', z': the forward's scaled rows, below 4
    z = z * scale_z[:, None]
    dp = dp_z[:, None] * z - p_term[:, None] * p
    dp = tl.where(mask, dp, 0.0)
    tl.store(dp_ptr + offs_r[:, None] * stride_dpr + offs_z[None, :] * stride_dpz,
             dp.to(dp_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_ptr + pid_r * Z + offs_z, tl.sum(dp, axis=0), mask=mask_z)
    if TARGET_GRAD:
        dz = dz_p[:, None] * p - z_term[:, None] * z
        if POOL_T > 1:
            dz = dz * (1.0 / (POOL_T * POOL_T))
        dz = dz.to(dt_ptr.dtype.element_ty)
        b, ci, cj = _cell_rows(offs_r, CELLS, POOLED_GRID)
        first = PREFIX + (ci * POOL_T) * GRID_T + cj * POOL_T
        # one tile of pointers, to the cell's first token, offset by a scalar per token: with a
        # pointer tile per token the pooled (POOL_T = 3) fp32 variant spills registers
        dt_first = (dt_ptr + b[:, None] * stride_dtb + first[:, None] * stride_dtt
                    + offs_z[None, :] * stride_dtz)
        for di in tl.static_range(POOL_T):
            for dj in tl.static_range(POOL_T):
                tl.store(dt_first + (di * GRID_T + dj) * stride_dtt, dz, mask=mask)
