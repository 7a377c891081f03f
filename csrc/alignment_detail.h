// Internals of the native alignment op shared by alignment.cpp (orchestration around the ATen
// GEMMs), alignment_cpu.cpp and alignment_cuda.cu (the stage kernels) and ops.cpp. No Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <float.h>
#include <math.h>
#include <cstdint>
#include <vector>

namespace repa_fast {
namespace detail {

// F.normalize's eps: norms are clamped to at least this.
constexpr double kEps = 1e-12;

// e^x in the accumulate type (expf for float: ::exp would compute in double on the host).
C10_HOST_DEVICE inline float exp_acc(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_acc(double x) { return ::exp(x); }

// silu(x) = x·σ(x) = x / (1 + e^{−x}); the formula torch uses, so NaN/Inf behave alike.
template <typename T>
C10_HOST_DEVICE inline T silu(T x) {
  return x / (T(1) + exp_acc(-x));
}

// silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
template <typename T>
C10_HOST_DEVICE inline T silu_grad(T x) {
  const T s = T(1) / (T(1) + exp_acc(-x));
  return s * (T(1) + x * (T(1) - s));
}

// max(x, eps) that keeps NaN (std::max(eps, NaN) would return eps and hide it).
template <typename T>
C10_HOST_DEVICE inline T clamp_eps(T x) {
  return x < T(kEps) ? T(kEps) : x;
}

// max(x, floor), keeping NaN as clamp_eps does.
C10_HOST_DEVICE inline double clamp_min_keep_nan(double x, double floor) {
  return x < floor ? floor : x;
}

// The scale s = 2^(1−e) of a row whose largest |value| is m = f·2^e ≥ 1 (f ∈ [0.5, 1)), so that
// m·s ∈ [1, 2); 1 for m < 1, NaN or Inf (which must stay NaN). Multiplying by a power of two is
// exact, and Σ (x·s)² ≤ 4·n cannot overflow: the float64 cosine stage scales float64 rows by it
// (the squares of float32 values always fit in float64).
C10_HOST_DEVICE inline double row_scale(double m) {
  if (!(m >= 1.0 && m <= DBL_MAX)) return 1.0;
  int e = 0;
  ::frexp(m, &e);
  return ::ldexp(1.0, 1 - e);
}

// Token layout of one call. SiT token t of sample b is row b·T + t of the [M, ·] buffers;
// pooled row r = b·G² + i·G + j is cell (i, j) of the G×G grid both sides are pooled to.
struct Geometry {
  int64_t batch;          // B
  int64_t tokens;         // T = grid²
  int64_t grid;           // SiT grid side
  int64_t pool;           // k: SiT cells are k×k tokens (1: not pooled)
  int64_t pooled_grid;    // G = grid / k
  int64_t cells;          // G²
  int64_t rows;           // R = B·G²
  int64_t m;              // M = B·T
  int64_t target_tokens;  // T' (prefix included)
  int64_t target_grid;    // target grid side
  int64_t target_pool;    // k_t
  int64_t prefix;         // leading target tokens skipped

  // Row (in [M, ·]) of the top-left SiT token of pooled row r's cell.
  C10_HOST_DEVICE int64_t first_token(int64_t r) const {
    const int64_t b = r / cells, q = r % cells;
    return b * tokens + (q / pooled_grid) * pool * grid + (q % pooled_grid) * pool;
  }
  // Pooled row holding SiT row `row`.
  C10_HOST_DEVICE int64_t pooled_row(int64_t row) const {
    const int64_t b = row / tokens, q = row % tokens;
    return b * cells + (q / grid / pool) * pooled_grid + (q % grid) / pool;
  }
  // Token index (within its sample, prefix included) of the top-left target token of r's cell.
  C10_HOST_DEVICE int64_t first_target_token(int64_t r) const {
    const int64_t q = r % cells;
    return prefix + (q / pooled_grid) * target_pool * target_grid +
           (q % pooled_grid) * target_pool;
  }
};

// Validates every argument (TORCH_CHECK naming the argument, the expected and the given) and
// returns the layout. `stats` is checked too when defined.
Geometry check_inputs(const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& w1,
                      const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                      const at::Tensor& w3, const at::Tensor& b3, int64_t hidden_grid,
                      int64_t target_grid, int64_t target_prefix_tokens);

// float64 for float64 inputs, else float32: the dtype of the loss and accumulations (stats are
// float64 always).
at::ScalarType accumulate_type(at::ScalarType t);

struct ForwardOutputs {
  at::Tensor loss;   // 0-dim
  at::Tensor stats;  // [3, R] float64
  // Kept only when saving intermediates for the backward (else undefined):
  at::Tensor pre1;   // [M, P]  h·W1ᵀ + b1
  at::Tensor pre2;   // [M, P]  silu(pre1)·W2ᵀ + b2
  at::Tensor proj;   // [R, Z]  pooled(silu(pre2))·W3ᵀ   (without b3)
};

// The op with an optional speed/memory trade: save_intermediates keeps pre1, pre2 and proj so
// the backward skips the three recomputed GEMMs (the memory of two [M, P] buffers).
ForwardOutputs forward(const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                       const at::Tensor& w3, const at::Tensor& b3, int64_t hidden_grid,
                       int64_t target_grid, int64_t target_prefix_tokens,
                       bool save_intermediates);

// Backward; pre1, pre2, proj either all defined (from a saving forward) or all undefined
// (recompute). Returns {d_hidden, d_target or undefined, d_w1, d_b1, d_w2, d_b2, d_w3, d_b3}.
std::vector<at::Tensor> backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                 const at::Tensor& target, const at::Tensor& w1,
                                 const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2, const at::Tensor& w3,
                                 const at::Tensor& b3, const at::Tensor& stats,
                                 const at::Tensor& pre1, const at::Tensor& pre2,
                                 const at::Tensor& proj, int64_t hidden_grid,
                                 int64_t target_grid, int64_t target_prefix_tokens,
                                 bool target_requires_grad);

// ----------------------------------------------------------------------------- stage kernels
// One implementation per device: *_cpu in alignment_cpu.cpp, *_cuda in alignment_cuda.cu.
// Matrices are contiguous row-major [rows, N] buffers this op allocated; `pool` = 1 means the
// identity layout (out row = input row).

// Bias + SiLU epilogue with pooling: for each output row r and column j,
//   out[r, j] = (1/k²)·Σ_{t ∈ cell(r)} silu(x[t, j] + bias[j])
// (k = geo.pool when `pooled`, else 1 and cell(r) = {r}); bias may be undefined (0). With
// keep_pre, x[t, j] += bias[j] is written back (x becomes the pre-activation). out may be x
// itself when not pooled and not keep_pre (in-place SiLU).
void bias_silu_pool_cpu(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out,
                        const Geometry& geo, bool pooled, bool keep_pre);
void bias_silu_pool_cuda(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out,
                         const Geometry& geo, bool pooled, bool keep_pre);

// SiLU backward with spreading, fused with the bias gradient:
//   out[t, j] = g[row(t), j]·scale·silu'(pre[t, j]),   dbias[j] = Σ_t out[t, j]
// where row(t) is t's pooled row when `pooled` (g has R rows), else t. out may alias pre, and
// g when not pooled.
// dbias ([N], accumulate dtype) is written.
void silu_grad_spread_cpu(const at::Tensor& g, const at::Tensor& pre, const at::Tensor& out,
                          const at::Tensor& dbias, const Geometry& geo, bool pooled,
                          double scale);
void silu_grad_spread_cuda(const at::Tensor& g, const at::Tensor& pre, const at::Tensor& out,
                           const at::Tensor& dbias, const Geometry& geo, bool pooled,
                           double scale);

// Cosine stage forward: p = proj + b3 per pooled row, z̄ = pooled target (accumulate dtype,
// last dim contiguous); writes stats [3, R] float64 = (cos, max(|p|, ε), max(|z̄|, ε)) and the
// 0-dim loss = −mean cos. Sums in float64 (float64 rows scaled by row_scale first), so no norm
// of finite float32 values overflows, and the float64 stats hold it.
void cosine_forward_cpu(const at::Tensor& proj, const at::Tensor& b3, const at::Tensor& target,
                        const at::Tensor& stats, const at::Tensor& loss, const Geometry& geo);
void cosine_forward_cuda(const at::Tensor& proj, const at::Tensor& b3, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& loss, const Geometry& geo);

// Cosine stage backward, c = −grad/R, n_p, n_z from stats:
//   dp_r = c·(z̄_r/(n_p·n_z) − [n_p > ε]·cos_r·p_r/n_p²)                    → dp [R, Z]
//   dz̄_r = c·(p_r/(n_p·n_z) − [n_z > ε]·cos_r·z̄_r/n_z²)/k_t² to every target token of the
//   cell (dtarget [B, T', Z], accumulate dtype, zero-filled; skipped when undefined)
//   db3 = Σ_r dp_r                                                          → db3 [Z]
// computed as dp_r = (c/n_p)·(z̄_r/n_z − [n_p > ε]·cos_r·p_r/n_p) (and dz̄ alike), in float64:
// no n_p², n_p·n_z formed, which float64 rows near its maximum would overflow.
void cosine_backward_cpu(const at::Tensor& grad, const at::Tensor& proj, const at::Tensor& b3,
                         const at::Tensor& target, const at::Tensor& stats, const at::Tensor& dp,
                         const at::Tensor& db3, const at::Tensor& dtarget, const Geometry& geo);
void cosine_backward_cuda(const at::Tensor& grad, const at::Tensor& proj, const at::Tensor& b3,
                          const at::Tensor& target, const at::Tensor& stats,
                          const at::Tensor& dp, const at::Tensor& db3,
                          const at::Tensor& dtarget, const Geometry& geo);

// Whether this library was compiled with the CUDA kernels.
bool built_with_cuda();

}  // namespace detail
}  // namespace repa_fast
