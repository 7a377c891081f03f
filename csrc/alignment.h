// repa_fast native backend of the REPA alignment op: the public C++ API.
//
//   p_t   = W3·silu(W2·silu(W1·h_t + b1) + b2) + b3          per SiT token h_t ∈ R^D
//   loss  = −(1/R)·Σ_r <p̄_r, z̄_r> / (max(|p̄_r|, ε)·max(|z̄_r|, ε)),   ε = 1e-12
//
// where r runs over the R = B·G² pooled tokens: when the SiT grid and the target grid differ
// by an integer factor k per side, the finer side is averaged over k×k cells (p̄ = pooled p,
// computed exactly by pooling silu(·) before the last, linear, layer; z̄ = pooled target);
// the first `target_prefix_tokens` target tokens (CLS, registers) are dropped. NaN or Inf
// inputs give a NaN loss. The GEMMs run in the inputs' dtype through ATen (MKL/oneDNN on
// the CPU, cuBLAS on CUDA); the epilogues, pooling and cosine stage accumulate in float32
// (float64 for float64 inputs). This header needs ATen only (no Python), so the same sources
// build the Python extension repa_fast._C and a plain libtorch library (CMakeLists.txt).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace repa_fast {

// Forward. hidden [B, T, D] (T = hidden_grid²), target [B, T', Z]
// (T' = target_prefix_tokens + target_grid²), w1 [P, D], b1 [P], w2 [P, P], b2 [P], w3 [Z, P],
// b3 [Z] (nn.Linear layout; the weights have hidden's dtype; target may be any float dtype).
// Returns {loss, stats}: loss is a 0-dim tensor (float32, or float64 for float64 inputs);
// stats: [3, R] float64: cos, max(|p|,eps), max(|z|,eps) per pooled row (R = B * pooled_grid^2),
// which alignment_backward takes back; float64, as the norms of finite float32 rows may exceed
// float32's range (they are summed in float64, float64 rows scaled by a power of two first, so
// no norm overflows short of float64's own maximum). Argument errors are c10::ValueError or
// c10::TypeError (Python: ValueError, TypeError).
std::tuple<at::Tensor, at::Tensor> alignment_forward(
    const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
    const at::Tensor& b3, int64_t hidden_grid, int64_t target_grid,
    int64_t target_prefix_tokens);

// Backward of alignment_forward for the loss gradient grad_loss (a one-element tensor). The
// projector's intermediates are recomputed from the inputs (nothing but `stats` is kept
// between the passes), holding at most three [B·T, P] buffers at once.
// Returns {d_hidden, d_target (undefined tensor when !target_requires_grad), d_w1, d_b1,
// d_w2, d_b2, d_w3, d_b3}, each in the dtype of its input.
std::vector<at::Tensor> alignment_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& target,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& stats, int64_t hidden_grid,
    int64_t target_grid, int64_t target_prefix_tokens, bool target_requires_grad);

}  // namespace repa_fast
