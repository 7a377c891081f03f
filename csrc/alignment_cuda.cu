// CUDA stage kernels of the native alignment op (see alignment_detail.h for what each computes).
// The GEMMs around them are cuBLAS (at::mm). Accumulation in float32 (float64 for float64
// inputs; the cosine stage in float64, as on the CPU: its sums over Z and R are cheap and |p|²
// must not overflow; float64 rows are scaled by row_scale first, stats are float64).
// Reductions are deterministic: warp shuffles and shared memory inside a block, per-block
// partial sums added in a fixed order by a second kernel, no atomics.
// No Python.
#include "alignment_detail.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace repa_fast {
namespace detail {

namespace {

constexpr int kThreads = 256;    // elementwise and per-row kernels
constexpr int kColTile = 32;     // column epilogue: one warp spans 32 consecutive columns
constexpr int kRowLanes = 8;     //   × 8 warps, each walking every 8th row of the block's rows
constexpr int64_t kMaxGrid = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a grid-stride loop over `total` elements (capped; the loop covers the rest).
unsigned int grid_for(int64_t total) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kThreads),
                                                                          kMaxGrid * 16)));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a, b, c over the block (blockDim.x == kThreads); the results are valid in thread 0.
template <typename T>
__device__ __forceinline__ void block_sum3(T& a, T& b, T& c) {
  __shared__ T shared[3][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
    shared[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? shared[0][lane] : T(0);
    b = lane < kThreads / 32 ? shared[1][lane] : T(0);
    c = lane < kThreads / 32 ? shared[2][lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
  }
}

// Maxima of a and b over the block (blockDim.x == kThreads), returned to every thread. fmax
// skips NaN: a NaN row stays NaN through its sums.
__device__ __forceinline__ void block_max2(double& a, double& b) {
  __shared__ double shared[2][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1) {
    a = fmax(a, __shfl_down_sync(0xffffffffu, a, offset));
    b = fmax(b, __shfl_down_sync(0xffffffffu, b, offset));
  }
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
  }
  __syncthreads();
  // every thread reads the eight warp maxima; nothing writes `shared` again
  a = shared[0][0];
  b = shared[1][0];
  for (int w = 1; w < kThreads / 32; ++w) {
    a = fmax(a, shared[0][w]);
    b = fmax(b, shared[1][w]);
  }
}

// out[r, j] = (1/k²)·Σ_{t ∈ cell(r)} silu(x[t, j] + bias[j]); keep_pre writes x[t, j] += bias[j].
// One thread per output element; with k = 1 it reads and writes one element (out may be x).
template <typename scalar_t>
__global__ void bias_silu_pool_kernel(scalar_t* x, const scalar_t* bias, scalar_t* out,
                                      int64_t out_rows, int64_t n, Geometry geo, int64_t k,
                                      bool keep_pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = out_rows * n;
  const acc_t inv_cell = acc_t(1) / static_cast<acc_t>(k * k);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t r = idx / n, j = idx % n;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[j]) : acc_t(0);
    const int64_t first = k == 1 ? r : geo.first_token(r);
    acc_t sum = acc_t(0);
    for (int64_t di = 0; di < k; ++di) {
      for (int64_t dj = 0; dj < k; ++dj) {
        const int64_t offset = (first + di * geo.grid + dj) * n + j;
        const acc_t v = static_cast<acc_t>(x[offset]) + b;
        if (keep_pre) x[offset] = static_cast<scalar_t>(v);
        sum += silu(v);
      }
    }
    out[idx] = static_cast<scalar_t>(sum * inv_cell);
  }
}

// Column epilogue over an [m, n] matrix, block (kColTile, kRowLanes) covering kColTile columns
// × rows_per_block rows; writes per-block column sums partial[blockIdx.y, j].
//   kSiluGrad: out[t, j] = g[row(t), j]·scale·silu'(pre[t, j]), summed   (dpre and dbias)
//   else:      sums g[t, j]                                              (db3 from dp)
template <typename scalar_t, bool kSiluGrad>
__global__ void column_epilogue_kernel(const scalar_t* g, const scalar_t* pre, scalar_t* out,
                                       at::opmath_type<scalar_t>* partial, int64_t m, int64_t n,
                                       int64_t rows_per_block, Geometry geo, bool pooled,
                                       at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile[kRowLanes][kColTile];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = row0 + rows_per_block < m ? row0 + rows_per_block : m;
  acc_t sum = acc_t(0);
  if (j < n) {
    for (int64_t row = row0 + threadIdx.y; row < row_end; row += kRowLanes) {
      acc_t d;
      if constexpr (kSiluGrad) {
        const int64_t g_row = pooled ? geo.pooled_row(row) : row;
        d = static_cast<acc_t>(g[g_row * n + j]) * scale *
            silu_grad(static_cast<acc_t>(pre[row * n + j]));
        out[row * n + j] = static_cast<scalar_t>(d);  // may be pre: read just before
      } else {
        d = static_cast<acc_t>(g[row * n + j]);
      }
      sum += d;
    }
  }
  tile[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    acc_t total = acc_t(0);
    for (int lane = 0; lane < kRowLanes; ++lane) total += tile[lane][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * n + j] = total;
  }
}

// out[j] = Σ_blk partial[blk, j], in block order (deterministic).
template <typename acc_t>
__global__ void add_partials_kernel(const acc_t* partial, int64_t blocks, int64_t n, acc_t* out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    acc_t total = acc_t(0);
    for (int64_t blk = 0; blk < blocks; ++blk) total += partial[blk * n + j];
    out[j] = total;
  }
}

// Runs column_epilogue_kernel over [m, n] and adds its partial sums into dsum ([n], acc dtype).
template <typename scalar_t, bool kSiluGrad>
void column_epilogue(const scalar_t* g, const scalar_t* pre, scalar_t* out, const at::Tensor& dsum,
                     int64_t m, int64_t n, const Geometry& geo, bool pooled, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  // rows per block: a multiple of kRowLanes, enough blocks to fill the GPU, ≤ 65535 row blocks
  int64_t rows_per_block = 128;
  if (ceil_div(m, rows_per_block) > kMaxGrid) {
    rows_per_block = ceil_div(ceil_div(m, kMaxGrid), kRowLanes) * kRowLanes;
  }
  const int64_t row_blocks = ceil_div(m, rows_per_block);
  const int64_t col_blocks = ceil_div(n, kColTile);
  TORCH_CHECK(col_blocks <= 0x7fffffff, "the native alignment op supports at most 2^31 column "
              "tiles; got ", n, " columns");
  at::Tensor partial = at::empty({row_blocks, n}, dsum.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(row_blocks));
  const dim3 block(kColTile, kRowLanes);
  column_epilogue_kernel<scalar_t, kSiluGrad><<<grid, block, 0, stream>>>(
      g, pre, out, partial.data_ptr<acc_t>(), m, n, rows_per_block, geo, pooled,
      static_cast<acc_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  add_partials_kernel<acc_t><<<grid_for(n), kThreads, 0, stream>>>(
      partial.data_ptr<acc_t>(), row_blocks, n, dsum.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pooled target value z̄[r, j] (target in the accumulate dtype, last dim contiguous).
template <typename acc_t>
__device__ __forceinline__ double pooled_target(const acc_t* zbase, int64_t first, int64_t j,
                                                int64_t stride_t, const Geometry& geo,
                                                double inv_cell) {
  double zv = 0.0;
  for (int64_t di = 0; di < geo.target_pool; ++di) {
    for (int64_t dj = 0; dj < geo.target_pool; ++dj) {
      zv += static_cast<double>(zbase[(first + di * geo.target_grid + dj) * stride_t + j]);
    }
  }
  return zv * inv_cell;
}

// One block per pooled row r: p·z̄, |p|², |z̄|² over Z, then stats[·, r] (float64). Float
// inputs square into float64 without overflow; float64 rows are first scaled by row_scale of
// their largest |value| (one more pass over the row, float64 only).
template <typename scalar_t>
__global__ void cosine_forward_kernel(const scalar_t* proj, const scalar_t* b3,
                                      const at::opmath_type<scalar_t>* target, int64_t stride_b,
                                      int64_t stride_t, double* stats, int64_t z, Geometry geo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const acc_t* zbase = target + (r / geo.cells) * stride_b;
  const int64_t first = geo.first_target_token(r);
  const double inv_cell = 1.0 / static_cast<double>(geo.target_pool * geo.target_pool);
  double scale_p = 1.0, scale_z = 1.0;
  if constexpr (std::is_same<acc_t, double>::value) {
    double max_p = 0.0, max_z = 0.0;
    for (int64_t j = threadIdx.x; j < z; j += blockDim.x) {
      const double pv = static_cast<double>(static_cast<acc_t>(proj[r * z + j]) +
                                            static_cast<acc_t>(b3[j]));
      max_p = fmax(max_p, fabs(pv));
      max_z = fmax(max_z, fabs(pooled_target(zbase, first, j, stride_t, geo, inv_cell)));
    }
    block_max2(max_p, max_z);
    scale_p = row_scale(max_p);
    scale_z = row_scale(max_z);
  }
  double pz = 0.0, pp = 0.0, zz = 0.0;
  for (int64_t j = threadIdx.x; j < z; j += blockDim.x) {
    const double pv = static_cast<double>(static_cast<acc_t>(proj[r * z + j]) +
                                          static_cast<acc_t>(b3[j])) * scale_p;
    const double zv = pooled_target(zbase, first, j, stride_t, geo, inv_cell) * scale_z;
    pz += pv * zv;
    pp += pv * pv;
    zz += zv * zv;
  }
  block_sum3(pz, pp, zz);
  if (threadIdx.x == 0) {
    // cos in the scaled rows (ε scales with them); the norms kept are the true ones
    const double norm_p = ::sqrt(pp), norm_z = ::sqrt(zz);
    stats[r] = pz / (clamp_min_keep_nan(norm_p, kEps * scale_p) *
                     clamp_min_keep_nan(norm_z, kEps * scale_z));
    stats[geo.rows + r] = clamp_eps(norm_p / scale_p);
    stats[2 * geo.rows + r] = clamp_eps(norm_z / scale_z);
  }
}

// One block: loss = −(1/R)·Σ_r cos_r.
template <typename acc_t>
__global__ void loss_kernel(const double* stats, int64_t rows, acc_t* loss) {
  double total = 0.0, unused_b = 0.0, unused_c = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) total += stats[r];
  block_sum3(total, unused_b, unused_c);
  if (threadIdx.x == 0) *loss = static_cast<acc_t>(-total / static_cast<double>(rows));
}

// One block per pooled row r: dp[r, ·] (also unrounded into d_acc when given: db3 sums those,
// as the CPU does, not dp rounded to half precision) and, when dtarget is given, dz̄/k_t² to
// the cell's target tokens (dtarget contiguous [B, T', Z]). As on the CPU,
// dp = (c/n_p)·(z̄/n_z − [n_p > ε]·cos·p/n_p): no n_p² or n_p·n_z is formed.
template <typename scalar_t>
__global__ void cosine_backward_kernel(const at::opmath_type<scalar_t>* grad,
                                       const scalar_t* proj, const scalar_t* b3,
                                       const at::opmath_type<scalar_t>* target, int64_t stride_b,
                                       int64_t stride_t, const double* stats,
                                       scalar_t* dp, at::opmath_type<scalar_t>* d_acc,
                                       at::opmath_type<scalar_t>* dtarget, int64_t z,
                                       Geometry geo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x, rows = geo.rows;
  const double c = -static_cast<double>(grad[0]) / static_cast<double>(rows);
  const double cos_r = stats[r], norm_p = stats[rows + r], norm_z = stats[2 * rows + r];
  const double inv_p = 1.0 / norm_p, inv_z = 1.0 / norm_z;
  const double c_p = c * inv_p, c_z = c * inv_z;
  // the clamp at ε stops the gradient through the norm (as in F.normalize)
  const double cos_p = norm_p > kEps ? cos_r : 0.0;
  const double cos_z = norm_z > kEps ? cos_r : 0.0;
  const int64_t sample = r / geo.cells, first = geo.first_target_token(r);
  const acc_t* zbase = target + sample * stride_b;
  const int64_t kt = geo.target_pool;
  const double inv_cell = 1.0 / static_cast<double>(kt * kt);
  for (int64_t j = threadIdx.x; j < z; j += blockDim.x) {
    const double p_hat = static_cast<double>(static_cast<acc_t>(proj[r * z + j]) +
                                             static_cast<acc_t>(b3[j])) * inv_p;
    const double z_hat = pooled_target(zbase, first, j, stride_t, geo, inv_cell) * inv_z;
    const double d = c_p * (z_hat - cos_p * p_hat);
    dp[r * z + j] = static_cast<scalar_t>(d);
    if (d_acc != nullptr) d_acc[r * z + j] = static_cast<acc_t>(d);
    if (dtarget != nullptr) {
      const acc_t dz = static_cast<acc_t>(c_z * (p_hat - cos_z * z_hat) * inv_cell);
      acc_t* dbase = dtarget + sample * geo.target_tokens * z;
      for (int64_t di = 0; di < kt; ++di) {
        for (int64_t dj = 0; dj < kt; ++dj) {
          dbase[(first + di * geo.target_grid + dj) * z + j] = dz;
        }
      }
    }
  }
}

void check_rows_fit_grid(int64_t rows) {
  TORCH_CHECK(rows <= 0x7fffffff, "the native CUDA kernels take at most 2^31 - 1 pooled rows; "
              "got ", rows, ": split the batch");
}

}  // namespace

void bias_silu_pool_cuda(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out,
                         const Geometry& geo, bool pooled, bool keep_pre) {
  const int64_t n = x.size(1), out_rows = out.size(0);
  const int64_t k = pooled ? geo.pool : 1;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "bias_silu_pool_cuda", [&] {
    bias_silu_pool_kernel<scalar_t><<<grid_for(out_rows * n), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), out_rows, n, geo, k, keep_pre);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void silu_grad_spread_cuda(const at::Tensor& g, const at::Tensor& pre, const at::Tensor& out,
                           const at::Tensor& dbias, const Geometry& geo, bool pooled,
                           double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(),
                                  "silu_grad_spread_cuda", [&] {
    column_epilogue<scalar_t, true>(g.const_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(), dbias, pre.size(0), pre.size(1),
                                    geo, pooled, scale);
  });
}

void cosine_forward_cuda(const at::Tensor& proj, const at::Tensor& b3, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& loss, const Geometry& geo) {
  check_rows_fit_grid(geo.rows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(),
                                  "cosine_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cosine_forward_kernel<scalar_t><<<static_cast<unsigned int>(geo.rows), kThreads, 0, stream>>>(
        proj.const_data_ptr<scalar_t>(), b3.const_data_ptr<scalar_t>(),
        target.const_data_ptr<acc_t>(), target.stride(0), target.stride(1),
        stats.data_ptr<double>(), proj.size(1), geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(stats.const_data_ptr<double>(), geo.rows,
                                                    loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cosine_backward_cuda(const at::Tensor& grad, const at::Tensor& proj, const at::Tensor& b3,
                          const at::Tensor& target, const at::Tensor& stats,
                          const at::Tensor& dp, const at::Tensor& db3,
                          const at::Tensor& dtarget, const Geometry& geo) {
  check_rows_fit_grid(geo.rows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(),
                                  "cosine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t z = proj.size(1);
    // half precision: db3 sums an unrounded copy of dp (tiny dp lose digits or flush to zero
    // in fp16); float/double: dp itself is the unrounded value
    constexpr bool kRounded = !std::is_same<scalar_t, acc_t>::value;
    const at::Tensor d_acc = kRounded ? at::empty({geo.rows, z}, db3.options()) : at::Tensor();
    cosine_backward_kernel<scalar_t><<<static_cast<unsigned int>(geo.rows), kThreads, 0,
                                       stream>>>(
        grad.const_data_ptr<acc_t>(), proj.const_data_ptr<scalar_t>(),
        b3.const_data_ptr<scalar_t>(), target.const_data_ptr<acc_t>(), target.stride(0),
        target.stride(1), stats.const_data_ptr<double>(), dp.data_ptr<scalar_t>(),
        kRounded ? d_acc.data_ptr<acc_t>() : nullptr,
        dtarget.defined() ? dtarget.data_ptr<acc_t>() : nullptr, z, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (kRounded) {
      column_epilogue<acc_t, false>(d_acc.const_data_ptr<acc_t>(), nullptr, nullptr, db3,
                                    geo.rows, z, geo, false, 1.0);
    } else {
      column_epilogue<scalar_t, false>(dp.const_data_ptr<scalar_t>(), nullptr, nullptr, db3,
                                       geo.rows, z, geo, false, 1.0);
    }
  });
}

}  // namespace detail
}  // namespace repa_fast
