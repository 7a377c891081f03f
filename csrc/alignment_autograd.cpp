// repa_fast::alignment_loss (alignment_autograd.h): alignment_forward / alignment_backward as a
// torch::autograd::Function, so libtorch trainers call loss.backward() as for any other loss.
#include "alignment_autograd.h"

#include <torch/csrc/autograd/custom_function.h>

#include <c10/util/Exception.h>

#include <cmath>

#include "alignment.h"

namespace repa_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The side of a square grid of `tokens` tokens, for a grid argument left at 0.
int64_t square_side(int64_t tokens, const char* argument) {
  auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(tokens))));
  while (side * side > tokens) --side;
  while ((side + 1) * (side + 1) <= tokens) ++side;
  TORCH_CHECK(side * side == tokens, "repa_fast::alignment_loss: ", argument, " = 0 infers a "
              "square grid, but there are ", tokens, " tokens (not a square number); pass ",
              argument, " explicitly");
  return side;
}

struct AlignmentLossFunction : public torch::autograd::Function<AlignmentLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& target, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                            const at::Tensor& b3, int64_t hidden_grid, int64_t target_grid,
                            int64_t prefix) {
    auto [loss, stats] = alignment_forward(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid,
                                           target_grid, prefix);
    // inputs, not intermediates: the backward recomputes the projector (memory over time)
    ctx->save_for_backward({hidden, target, w1, b1, w2, b2, w3, b3, stats});
    ctx->saved_data["hidden_grid"] = hidden_grid;
    ctx->saved_data["target_grid"] = target_grid;
    ctx->saved_data["prefix"] = prefix;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const bool target_grad = ctx->needs_input_grad(1);
    at::Tensor grad = grad_outputs.at(0);
    if (!grad.defined()) grad = at::ones({}, saved[8].options());
    std::vector<at::Tensor> grads = alignment_backward(
        grad, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7],
        saved[8], ctx->saved_data["hidden_grid"].toInt(),
        ctx->saved_data["target_grid"].toInt(), ctx->saved_data["prefix"].toInt(), target_grad);
    // one gradient per forward argument: the eight tensors, then none for the three integers
    grads.resize(11);
    return grads;
  }
};

}  // namespace

at::Tensor alignment_loss(const at::Tensor& hidden, const at::Tensor& target,
                          const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
                          const AlignmentGrids& grids) {
  TORCH_CHECK(hidden.defined() && hidden.dim() == 3, "repa_fast::alignment_loss: hidden must "
              "be [B, T, D]; got ", hidden.defined() ? c10::str(hidden.sizes()) : "undefined");
  TORCH_CHECK(target.defined() && target.dim() == 3, "repa_fast::alignment_loss: target must "
              "be [B, T', Z]; got ", target.defined() ? c10::str(target.sizes()) : "undefined");
  const int64_t prefix = grids.target_prefix_tokens;
  TORCH_CHECK(prefix >= 0 && prefix < target.size(1), "repa_fast::alignment_loss: "
              "target_prefix_tokens must be in [0, ", target.size(1), "); got ", prefix);
  const int64_t hidden_grid =
      grids.hidden_grid != 0 ? grids.hidden_grid : square_side(hidden.size(1), "hidden_grid");
  const int64_t target_grid = grids.target_grid != 0
                                  ? grids.target_grid
                                  : square_side(target.size(1) - prefix, "target_grid");
  return AlignmentLossFunction::apply(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid,
                                      target_grid, prefix);
}

}  // namespace repa_fast
