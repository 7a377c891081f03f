// Registration of the native alignment op with the PyTorch dispatcher (no Python needed):
//
//   repa_fast::native_alignment_fwd  -> (loss, stats, pre1, pre2, proj)
//   repa_fast::native_alignment_bwd  -> [d_hidden, d_target, d_w1, d_b1, d_w2, d_b2, d_w3, d_b3]
//
// This is the namespace's only TORCH_LIBRARY (the DEF block): the Triton backend's ops
// (repa_fast::alignment_loss_fwd/_bwd) come from Python's torch.library.custom_op, which adds
// FRAGMENTs of the same namespace, so both load in one process. The fake (meta) kernels and the
// autograd formula are registered from Python in repa_fast.ops.alignment_native, which
// set_python_module names so torch can point there when they are missing.
//
// Tensors the dispatcher cannot carry as "undefined" are empty ([0]) instead: the intermediates
// when the forward does not save them, and d_target when the target needs no gradient.
#include "alignment.h"
#include "alignment_detail.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <torch/version.h>

#include <tuple>
#include <vector>

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> native_alignment_fwd(
    const Tensor& hidden, const Tensor& target, const Tensor& w1, const Tensor& b1,
    const Tensor& w2, const Tensor& b2, const Tensor& w3, const Tensor& b3, int64_t hidden_grid,
    int64_t target_grid, int64_t target_prefix_tokens, bool save_intermediates) {
  repa_fast::detail::ForwardOutputs out = repa_fast::detail::forward(
      hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid, target_prefix_tokens,
      save_intermediates);
  if (!save_intermediates) {
    out.pre1 = hidden.new_empty({0});
    out.pre2 = hidden.new_empty({0});
    out.proj = hidden.new_empty({0});
  }
  return {out.loss, out.stats, out.pre1, out.pre2, out.proj};
}

std::vector<Tensor> native_alignment_bwd(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& target, const Tensor& w1,
    const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& w3, const Tensor& b3,
    const Tensor& stats, const Tensor& pre1, const Tensor& pre2, const Tensor& proj,
    int64_t hidden_grid, int64_t target_grid, int64_t target_prefix_tokens,
    bool target_requires_grad) {
  // empty intermediates: the forward did not save them, recompute
  const bool saved = pre1.numel() > 0;
  TORCH_CHECK_VALUE(saved == (pre2.numel() > 0) && saved == (proj.numel() > 0),
                    "pre1, pre2 and proj must be given together: all empty (the forward did not "
                    "save them; the backward recomputes) or all as the saving forward returned "
                    "them; got sizes ", pre1.sizes(), ", ", pre2.sizes(), " and ", proj.sizes());
  std::vector<Tensor> grads = repa_fast::detail::backward(
      grad_loss, hidden, target, w1, b1, w2, b2, w3, b3, stats, saved ? pre1 : Tensor(),
      saved ? pre2 : Tensor(), saved ? proj : Tensor(), hidden_grid, target_grid,
      target_prefix_tokens, target_requires_grad);
  if (!grads[1].defined()) grads[1] = target.new_empty({0});
  return grads;
}

}  // namespace

TORCH_LIBRARY(repa_fast, m) {
#if TORCH_VERSION_MAJOR * 100 + TORCH_VERSION_MINOR >= 206
  m.set_python_module("repa_fast.ops.alignment_native");
#else
  m.impl_abstract_pystub("repa_fast.ops.alignment_native");  // its name before torch 2.6
#endif
  m.def("native_alignment_fwd(Tensor hidden, Tensor target, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2, Tensor w3, Tensor b3, int hidden_grid, int target_grid, "
        "int target_prefix_tokens, bool save_intermediates) "
        "-> (Tensor loss, Tensor stats, Tensor pre1, Tensor pre2, Tensor proj)");
  m.def("native_alignment_bwd(Tensor grad_loss, Tensor hidden, Tensor target, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor stats, Tensor pre1, "
        "Tensor pre2, Tensor proj, int hidden_grid, int target_grid, int target_prefix_tokens, "
        "bool target_requires_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(repa_fast, CPU, m) {
  m.impl("native_alignment_fwd", &native_alignment_fwd);
  m.impl("native_alignment_bwd", &native_alignment_bwd);
}

#ifdef REPA_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(repa_fast, CUDA, m) {
  m.impl("native_alignment_fwd", &native_alignment_fwd);
  m.impl("native_alignment_bwd", &native_alignment_bwd);
}
#endif
