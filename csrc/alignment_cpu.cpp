// CPU stage kernels of the native alignment op (see alignment_detail.h for what each computes):
// row-parallel loops over at::parallel_for (OpenMP in torch's builds), accumulating in float32
// (float64 for float64 inputs; the cosine sums in float64, float64 rows scaled by row_scale, and
// keeps its stats in float64). No Python.
//
// Column sums (bias gradients) are taken per fixed block of kRowBlock rows and then added
// block by block in a fixed order, so results do not depend on the number of threads: two runs
// give bitwise equal gradients.
#include "alignment_detail.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// SLEEF's 8-lane e^x for AVX2 (1-ulp), as ATen's vectorised kernels call it.
extern "C" __attribute__((weak)) __m256 Sleef_expf8_u10(__m256);
#endif

namespace repa_fast {
namespace detail {

namespace {

constexpr int64_t kRowBlock = 64;

// Rows per parallel_for chunk so that a chunk holds about 32k elements of work.
int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[j] = Σ_blk partial[blk, j], blocks added in index order (deterministic).
template <typename acc_t, typename out_t>
void add_partials(const acc_t* partial, int64_t blocks, int64_t n, out_t* out) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(partial + begin, partial + end);
    for (int64_t blk = 1; blk < blocks; ++blk) {
      const acc_t* row = partial + blk * n;
      for (int64_t j = begin; j < end; ++j) sum[j - begin] += row[j];
    }
    for (int64_t j = begin; j < end; ++j) out[j] = static_cast<out_t>(sum[j - begin]);
  });
}

// ----------------------------------------------------------------------------- row loops
// The SiLU epilogues evaluate e^x once per element, which a scalar libm call makes the whole
// cost of the pass. For float32 on x86-64 CPUs with AVX2 the rows run 8 lanes at a time on
// SLEEF's vectorised e^x (what ATen's own silu uses; exported by libtorch_cpu, declared weak so
// a torch without it falls back to the scalar loop). The scalar loop finishes each row and runs
// every other dtype.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define REPA_FAST_X86_SIMD 1

bool simd_available() {
  static const bool available = Sleef_expf8_u10 != nullptr && __builtin_cpu_supports("avx2") &&
                                __builtin_cpu_supports("fma");
  return available;
}

// Columns [0, returned) of: v = x + b;  keep_pre: x ← v;  sum += silu(v), or out = silu(v).
__attribute__((target("avx2,fma"))) int64_t silu_row_avx2(float* x, const float* b,
                                                           bool keep_pre, float* out,
                                                           float* sum, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(b + j));
    if (keep_pre) _mm256_storeu_ps(x + j, v);
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(zero, v));  // e^{-v}
    const __m256 act = _mm256_div_ps(v, _mm256_add_ps(one, e));
    if (sum != nullptr) {
      _mm256_storeu_ps(sum + j, _mm256_add_ps(_mm256_loadu_ps(sum + j), act));
    } else {
      _mm256_storeu_ps(out + j, act);
    }
  }
  return j;
}

// Columns [0, returned) of: d = g·scale·silu'(pre);  out = d;  col += d.
__attribute__((target("avx2,fma"))) int64_t silu_grad_row_avx2(const float* g, const float* pre,
                                                                float scale, float* out,
                                                                float* col, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(pre + j);
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(zero, x));  // e^{-x}
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 slope =
        _mm256_mul_ps(sig, _mm256_add_ps(one, _mm256_mul_ps(x, _mm256_sub_ps(one, sig))));
    const __m256 d = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(g + j), sc), slope);
    _mm256_storeu_ps(out + j, d);  // out may be pre: this block was read above
    _mm256_storeu_ps(col + j, _mm256_add_ps(_mm256_loadu_ps(col + j), d));
  }
  return j;
}
#endif

// float32 scratch rows for the 16-bit dtypes: they run the float32 row loops on converted
// copies (the conversions are cheap next to e^x); one pair per thread.
float* scratch_rows(int64_t n) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < 2 * n) scratch.resize(2 * n);
  return scratch.data();
}

template <typename scalar_t>
constexpr bool kReduced =
    std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

// v = x + b (b in the accumulate type);  keep_pre: x ← v;  sum += silu(v) when sum is given,
// else out = silu(v). out may be x.
template <typename scalar_t, typename acc_t>
void silu_row(scalar_t* x, const acc_t* b, bool keep_pre, scalar_t* out, acc_t* sum, int64_t n) {
  int64_t j = 0;
#ifdef REPA_FAST_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd_available()) j = silu_row_avx2(x, b, keep_pre, out, sum, n);
  } else if constexpr (kReduced<scalar_t>) {
    if (simd_available()) {
      float* xf = scratch_rows(n);
      float* of = xf + n;
      for (int64_t i = 0; i < n; ++i) xf[i] = static_cast<float>(x[i]);
      silu_row<float, float>(xf, b, keep_pre, of, sum, n);
      for (int64_t i = 0; i < n; ++i) {
        if (keep_pre) x[i] = static_cast<scalar_t>(xf[i]);
        if (sum == nullptr) out[i] = static_cast<scalar_t>(of[i]);
      }
      return;
    }
  }
#endif
  for (; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]) + b[j];
    if (keep_pre) x[j] = static_cast<scalar_t>(v);
    if (sum != nullptr) {
      sum[j] += silu(v);
    } else {
      out[j] = static_cast<scalar_t>(silu(v));
    }
  }
}

// d = g·scale·silu'(pre);  out = d (out may be pre);  col += d.
template <typename scalar_t, typename acc_t>
void silu_grad_row(const scalar_t* g, const scalar_t* pre, acc_t scale, scalar_t* out, acc_t* col,
                   int64_t n) {
  int64_t j = 0;
#ifdef REPA_FAST_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd_available()) j = silu_grad_row_avx2(g, pre, scale, out, col, n);
  } else if constexpr (kReduced<scalar_t>) {
    if (simd_available()) {
      float* gf = scratch_rows(n);
      float* pf = gf + n;
      for (int64_t i = 0; i < n; ++i) {
        gf[i] = static_cast<float>(g[i]);
        pf[i] = static_cast<float>(pre[i]);
      }
      silu_grad_row<float, float>(gf, pf, scale, gf, col, n);  // d into gf (read before written)
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(gf[i]);
      return;
    }
  }
#endif
  for (; j < n; ++j) {
    const acc_t d = static_cast<acc_t>(g[j]) * scale * silu_grad(static_cast<acc_t>(pre[j]));
    out[j] = static_cast<scalar_t>(d);
    col[j] += d;
  }
}

}  // namespace

void bias_silu_pool_cpu(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out,
                        const Geometry& geo, bool pooled, bool keep_pre) {
  const int64_t n = x.size(1), out_rows = out.size(0);
  const int64_t k = pooled ? geo.pool : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_silu_pool_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t inv_cell = acc_t(1) / static_cast<acc_t>(k * k);
    at::parallel_for(0, out_rows, grain_rows(n * k * k), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> b(n, acc_t(0));
      if (bp != nullptr) std::copy(bp, bp + n, b.begin());
      std::vector<acc_t> sum(k > 1 ? n : 0);
      for (int64_t r = begin; r < end; ++r) {
        if (k == 1) {
          // out may be x: each element is read before it is written
          silu_row<scalar_t, acc_t>(xp + r * n, b.data(), keep_pre, op + r * n, nullptr, n);
          continue;
        }
        std::fill(sum.begin(), sum.end(), acc_t(0));
        const int64_t first = geo.first_token(r);
        for (int64_t di = 0; di < k; ++di) {
          for (int64_t dj = 0; dj < k; ++dj) {
            silu_row<scalar_t, acc_t>(xp + (first + di * geo.grid + dj) * n, b.data(), keep_pre,
                                      nullptr, sum.data(), n);
          }
        }
        scalar_t* orow = op + r * n;
        for (int64_t j = 0; j < n; ++j) orow[j] = static_cast<scalar_t>(sum[j] * inv_cell);
      }
    });
  });
}

void silu_grad_spread_cpu(const at::Tensor& g, const at::Tensor& pre, const at::Tensor& out,
                          const at::Tensor& dbias, const Geometry& geo, bool pooled,
                          double scale) {
  const int64_t m = pre.size(0), n = pre.size(1);
  const int64_t blocks = ceil_div(m, kRowBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(),
                                  "silu_grad_spread_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* pp = pre.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    at::Tensor partial = at::empty({blocks, n}, dbias.options());
    acc_t* part = partial.data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        acc_t* col = part + blk * n;
        std::fill(col, col + n, acc_t(0));
        const int64_t row_end = std::min(m, (blk + 1) * kRowBlock);
        for (int64_t row = blk * kRowBlock; row < row_end; ++row) {
          // out may be pre: read before written
          silu_grad_row<scalar_t, acc_t>(gp + (pooled ? geo.pooled_row(row) : row) * n,
                                         pp + row * n, sc, op + row * n, col, n);
        }
      }
    });
    add_partials(part, blocks, n, dbias.data_ptr<acc_t>());
  });
}

void cosine_forward_cpu(const at::Tensor& proj, const at::Tensor& b3, const at::Tensor& target,
                        const at::Tensor& stats, const at::Tensor& loss, const Geometry& geo) {
  const int64_t rows = geo.rows, z = proj.size(1), kt = geo.target_pool;
  const int64_t stride_b = target.stride(0), stride_t = target.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(),
                                  "cosine_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // float32/16 values square into float64 without overflow; float64 rows are scaled first
    constexpr bool kScale = std::is_same<acc_t, double>::value;
    const scalar_t* pp = proj.const_data_ptr<scalar_t>();
    const scalar_t* bp = b3.const_data_ptr<scalar_t>();
    const acc_t* tp = target.const_data_ptr<acc_t>();
    double* sp = stats.data_ptr<double>();
    const double inv_cell = 1.0 / static_cast<double>(kt * kt);
    at::parallel_for(0, rows, grain_rows(z * kt * kt), [&](int64_t begin, int64_t end) {
      std::vector<double> zbar(z);
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* zbase = tp + (r / geo.cells) * stride_b;
        const int64_t first = geo.first_target_token(r);
        std::fill(zbar.begin(), zbar.end(), 0.0);
        for (int64_t di = 0; di < kt; ++di) {
          for (int64_t dj = 0; dj < kt; ++dj) {
            const acc_t* zr = zbase + (first + di * geo.target_grid + dj) * stride_t;
            for (int64_t j = 0; j < z; ++j) zbar[j] += static_cast<double>(zr[j]);
          }
        }
        const scalar_t* prow = pp + r * z;
        double scale_p = 1.0, scale_z = 1.0;
        if constexpr (kScale) {
          double max_p = 0.0, max_z = 0.0;
          for (int64_t j = 0; j < z; ++j) {
            max_p = std::max(max_p, std::abs(static_cast<double>(static_cast<acc_t>(prow[j]) +
                                                             static_cast<acc_t>(bp[j]))));
            max_z = std::max(max_z, std::abs(zbar[j] * inv_cell));
          }
          scale_p = row_scale(max_p);
          scale_z = row_scale(max_z);
        }
        double pz = 0.0, pp2 = 0.0, zz = 0.0;
        for (int64_t j = 0; j < z; ++j) {
          const double pv = static_cast<double>(static_cast<acc_t>(prow[j]) +
                                                static_cast<acc_t>(bp[j])) * scale_p;
          const double zv = zbar[j] * inv_cell * scale_z;
          pz += pv * zv;
          pp2 += pv * pv;
          zz += zv * zv;
        }
        // cos in the scaled rows: ε scales with them; the norms kept are the true ones
        const double norm_p = std::sqrt(pp2), norm_z = std::sqrt(zz);
        sp[r] = pz / (clamp_min_keep_nan(norm_p, kEps * scale_p) *
                      clamp_min_keep_nan(norm_z, kEps * scale_z));
        sp[rows + r] = clamp_eps(norm_p / scale_p);
        sp[2 * rows + r] = clamp_eps(norm_z / scale_z);
      }
    });
    double total = 0.0;  // serial: a fixed order, and R is small next to the GEMMs
    for (int64_t r = 0; r < rows; ++r) total += sp[r];
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(-total / static_cast<double>(rows));
  });
}

void cosine_backward_cpu(const at::Tensor& grad, const at::Tensor& proj, const at::Tensor& b3,
                         const at::Tensor& target, const at::Tensor& stats, const at::Tensor& dp,
                         const at::Tensor& db3, const at::Tensor& dtarget, const Geometry& geo) {
  const int64_t rows = geo.rows, z = proj.size(1), kt = geo.target_pool;
  const int64_t stride_b = target.stride(0), stride_t = target.stride(1);
  const int64_t blocks = ceil_div(rows, kRowBlock);
  const bool target_grad = dtarget.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(),
                                  "cosine_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = proj.const_data_ptr<scalar_t>();
    const scalar_t* bp = b3.const_data_ptr<scalar_t>();
    const acc_t* tp = target.const_data_ptr<acc_t>();
    const double* sp = stats.const_data_ptr<double>();
    scalar_t* dpp = dp.data_ptr<scalar_t>();
    acc_t* dtp = target_grad ? dtarget.data_ptr<acc_t>() : nullptr;
    const double c = -static_cast<double>(grad.item<acc_t>()) / static_cast<double>(rows);
    const double inv_cell = 1.0 / static_cast<double>(kt * kt);
    std::vector<double> partial(blocks * z);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> zbar(z), dz(target_grad ? z : 0);
      for (int64_t blk = begin; blk < end; ++blk) {
        double* col = partial.data() + blk * z;
        const int64_t row_end = std::min(rows, (blk + 1) * kRowBlock);
        for (int64_t r = blk * kRowBlock; r < row_end; ++r) {
          const double cos_r = sp[r], norm_p = sp[rows + r], norm_z = sp[2 * rows + r];
          // dp = (c/n_p)·(z/n_z − cos·p/n_p): factors of at most |c|/ε and 1, nothing squared
          const double inv_p = 1.0 / norm_p, inv_z = 1.0 / norm_z;
          const double c_p = c * inv_p, c_z = c * inv_z;
          // the clamp at ε stops the gradient through the norm (as in F.normalize)
          const double cos_p = norm_p > kEps ? cos_r : 0.0, cos_z = norm_z > kEps ? cos_r : 0.0;
          const int64_t sample = r / geo.cells, first = geo.first_target_token(r);
          const acc_t* zbase = tp + sample * stride_b;
          std::fill(zbar.begin(), zbar.end(), 0.0);
          for (int64_t di = 0; di < kt; ++di) {
            for (int64_t dj = 0; dj < kt; ++dj) {
              const acc_t* zr = zbase + (first + di * geo.target_grid + dj) * stride_t;
              for (int64_t j = 0; j < z; ++j) zbar[j] += static_cast<double>(zr[j]);
            }
          }
          const scalar_t* prow = pp + r * z;
          scalar_t* dprow = dpp + r * z;
          for (int64_t j = 0; j < z; ++j) {
            const double p_hat = static_cast<double>(static_cast<acc_t>(prow[j]) +
                                                     static_cast<acc_t>(bp[j])) * inv_p;
            const double z_hat = zbar[j] * inv_cell * inv_z;
            const double d = c_p * (z_hat - cos_p * p_hat);
            dprow[j] = static_cast<scalar_t>(d);
            col[j] += d;
            if (target_grad) dz[j] = c_z * (p_hat - cos_z * z_hat) * inv_cell;
          }
          if (target_grad) {
            // the target is contiguous [B, T', Z] here (allocated by the op)
            acc_t* dbase = dtp + sample * geo.target_tokens * z;
            for (int64_t di = 0; di < kt; ++di) {
              for (int64_t dj = 0; dj < kt; ++dj) {
                acc_t* drow = dbase + (first + di * geo.target_grid + dj) * z;
                for (int64_t j = 0; j < z; ++j) drow[j] = static_cast<acc_t>(dz[j]);
              }
            }
          }
        }
      }
    });
    add_partials(partial.data(), blocks, z, db3.data_ptr<acc_t>());
  });
}

}  // namespace detail
}  // namespace repa_fast
