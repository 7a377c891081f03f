// repa_fast::alignment_loss: the native REPA alignment op as a differentiable libtorch function,
// for trainers written in C++ (libtorch; the Python package has its own autograd registration).
//
//   torch::Tensor loss = repa_fast::alignment_loss(hidden, target, w1, b1, w2, b2, w3, b3);
//   (velocity_loss + proj_coeff * loss).backward();   // fills .grad of hidden, w*, b*, target
//
// Same maths, checks and kernels as alignment_forward / alignment_backward (alignment.h): the
// forward keeps only its inputs and the [3, R] row statistics, and the backward recomputes the
// projector's intermediates. Needs libtorch's autograd (libtorch_cpu), no Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace repa_fast {

// Grids of the two token sets; 0 = the square root of the token count (which must then be a
// square): hidden_grid² = T, target_grid² = T' - target_prefix_tokens.
struct AlignmentGrids {
  int64_t hidden_grid = 0;
  int64_t target_grid = 0;
  int64_t target_prefix_tokens = 0;
};

// The alignment loss (a 0-dim float32 tensor, float64 for float64 inputs) with a gradient
// function: backward() reaches hidden, the six projector tensors (nn.Linear layout: w1 [P, D],
// b1 [P], w2 [P, P], b2 [P], w3 [Z, P], b3 [Z]) and target, those that require grad.
at::Tensor alignment_loss(const at::Tensor& hidden, const at::Tensor& target,
                          const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                          const AlignmentGrids& grids = {});

}  // namespace repa_fast
