// The native alignment op: input validation and the order of GEMMs (ATen: MKL/oneDNN on the CPU,
// cuBLAS on CUDA) and fused stage kernels (alignment_cpu.cpp, alignment_cuda.cu). No Python.
// On the CPU the forward GEMMs may run on oneDNN with bias and SiLU fused (see "CPU GEMMs"
// below); the buffer plan is the same.
//
// Forward (nothing kept but stats; ≤ 2 [M, P] buffers live):
//   A = h·W1ᵀ;  A ← silu(A + b1)                      (in place)
//   C = A·W2ᵀ;  S̄ = pooled silu(C + b2)               (in place into C when not pooled)
//   P = S̄·W3ᵀ;  cosine stage adds b3, pools the target: stats, loss
//
// Backward, recomputing (≤ 3 [M, P] buffers live; 12 GEMMs in all, none repeated):
//   A = h·W1ᵀ;  A ← A + b1 = pre1, B = silu(pre1) = s1
//   C = B·W2ᵀ;  C ← C + b2 = pre2, B[:R] = S̄ = pooled silu(pre2)   (s1 is re-derived from A)
//   P = S̄·W3ᵀ;  dp, db3, dtarget = cosine backward
//   dW3 = dpᵀ·S̄, drop B;  dS̄ = dp·W3;  C ← spread(dS̄)/k²·silu'(pre2) = dpre2, db2
//   B = silu(A) = s1;  dW2 = dpre2ᵀ·B, drop B;  ds1 = dpre2·W2;  C ← ds1·silu'(A) = dpre1, db1
//   dW1 = dpre1ᵀ·h;  dh = dpre1·W1
// With saved intermediates (pre1, pre2, P from the forward) the first three GEMMs are skipped;
// the saved tensors are op inputs then, so they are read, never overwritten.
#include "alignment.h"
#include "alignment_detail.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>

namespace repa_fast {
namespace detail {

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Argument errors reach Python as the ValueError/TypeError that repa_fast.ops.alignment_checks
// raises for the same argument (TORCH_CHECK_VALUE, TORCH_CHECK_TYPE): the ops and the C++ API
// are called directly too.
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  TORCH_CHECK_TYPE(t.defined(), "repa_fast native alignment op: ", name, " must be a tensor; "
                   "got an undefined tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor; got "
                   "layout ", t.layout());
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), name, " must be float32, float64, float16 "
                   "or bfloat16; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == hidden.device(), name, " must be on the device of hidden (",
                    hidden.device(), "); got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, int64_t d,
                 int64_t p, int64_t z) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", expected,
                    " (nn.Linear layout, hidden size ", d, ", projector dim ", p, ", target dim ",
                    z, "); got ", shape_of(t));
}

int64_t check_grid(int64_t grid, int64_t tokens, const char* argument) {
  TORCH_CHECK_VALUE(grid >= 1, argument, "_grid must be a positive int; got ", grid);
  // grid <= tokens / grid first: the square of a huge grid would overflow int64
  const bool fits = grid <= tokens / grid;
  TORCH_CHECK_VALUE(fits && grid * grid == tokens, argument, "_grid=", grid, " needs ",
                    grid <= 3037000499 ? c10::str(grid * grid) : std::string("over 2^63"),
                    " tokens (a row-major square grid); got ", tokens);
  return grid;
}

#ifndef REPA_FAST_WITH_CUDA
// A CPU-only build reached a stage with a CUDA tensor: check_inputs stops public calls before
// this, so only a C++ caller of the stages themselves gets here; never return unwritten output.
[[noreturn]] void no_cuda_kernels(const char* stage) {
  TORCH_CHECK(false, "repa_fast native stage ", stage, " got a CUDA tensor but this build has no "
              "CUDA kernels (rebuild with REPA_FAST_BUILD_CUDA=1, or CMake "
              "-DREPA_FAST_WITH_CUDA=ON)");
}
#endif

// The stage kernels of the tensor's device.
// RECORD_FUNCTION: each stage shows up by name in torch.profiler traces.
void bias_silu_pool(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out,
                    const Geometry& geo, bool pooled, bool keep_pre) {
  RECORD_FUNCTION("repa_fast::bias_silu_pool", std::vector<c10::IValue>());
  if (x.is_cuda()) {
#ifdef REPA_FAST_WITH_CUDA
    bias_silu_pool_cuda(x, bias, out, geo, pooled, keep_pre);
#else
    no_cuda_kernels("bias_silu_pool");
#endif
  } else {
    bias_silu_pool_cpu(x, bias, out, geo, pooled, keep_pre);
  }
}

void silu_grad_spread(const at::Tensor& g, const at::Tensor& pre, const at::Tensor& out,
                      const at::Tensor& dbias, const Geometry& geo, bool pooled, double scale) {
  RECORD_FUNCTION("repa_fast::silu_grad_spread", std::vector<c10::IValue>());
  if (pre.is_cuda()) {
#ifdef REPA_FAST_WITH_CUDA
    silu_grad_spread_cuda(g, pre, out, dbias, geo, pooled, scale);
#else
    no_cuda_kernels("silu_grad_spread");
#endif
  } else {
    silu_grad_spread_cpu(g, pre, out, dbias, geo, pooled, scale);
  }
}

void cosine_forward(const at::Tensor& proj, const at::Tensor& b3, const at::Tensor& target,
                    const at::Tensor& stats, const at::Tensor& loss, const Geometry& geo) {
  RECORD_FUNCTION("repa_fast::cosine_forward", std::vector<c10::IValue>());
  if (proj.is_cuda()) {
#ifdef REPA_FAST_WITH_CUDA
    cosine_forward_cuda(proj, b3, target, stats, loss, geo);
#else
    no_cuda_kernels("cosine_forward");
#endif
  } else {
    cosine_forward_cpu(proj, b3, target, stats, loss, geo);
  }
}

void cosine_backward(const at::Tensor& grad, const at::Tensor& proj, const at::Tensor& b3,
                     const at::Tensor& target, const at::Tensor& stats, const at::Tensor& dp,
                     const at::Tensor& db3, const at::Tensor& dtarget, const Geometry& geo) {
  RECORD_FUNCTION("repa_fast::cosine_backward", std::vector<c10::IValue>());
  if (proj.is_cuda()) {
#ifdef REPA_FAST_WITH_CUDA
    cosine_backward_cuda(grad, proj, b3, target, stats, dp, db3, dtarget, geo);
#else
    no_cuda_kernels("cosine_backward");
#endif
  } else {
    cosine_backward_cpu(grad, proj, b3, target, stats, dp, db3, dtarget, geo);
  }
}

// The target in the accumulate dtype with a contiguous last dimension (the cosine kernels
// read it through its batch and token strides); no copy when it already is.
at::Tensor prepare_target(const at::Tensor& target, at::ScalarType acc) {
  at::Tensor z = target.to(acc);
  return z.stride(2) == 1 ? z : z.contiguous();
}

// ----------------------------------------------------------------------------- CPU GEMMs
// The x·Wᵀ GEMMs of the projector chain can run on oneDNN's matmul with the bias and SiLU
// fused into it (ATen's mkldnn::_linear_pointwise, the op Inductor uses for linear layers on
// CPUs). For float32, at::mm goes to MKL's sgemm, which on the CPUs measured here (AMD EPYC)
// is 1.3-2x slower than oneDNN at these shapes. $REPA_FAST_NATIVE_CPU_GEMM: "auto" (default)
// uses oneDNN for float32 CPU tensors when this torch has it, "onednn" requires it,
// "aten" always takes at::mm. In the backward, the GEMMs with a transposed weight go to oneDNN
// too (it reads the weight as a strided matrix); the weight gradients stay on at::mm.

// Set when a oneDNN call failed: at::mm from then on.
std::atomic<bool>& onednn_failed() {
  static std::atomic<bool> failed{false};
  return failed;
}

const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> handle =
      []() -> std::optional<c10::OperatorHandle> {
    auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!found.has_value()) return std::nullopt;
    // the call below is built for this schema (torch 2.x):
    // (Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm) -> Tensor
    const auto& args = found->schema().arguments();
    if (args.size() != 6 || args[0].name() != "X" || args[1].name() != "W" ||
        args[2].name() != "B" || args[3].name() != "attr" || args[4].name() != "scalars" ||
        args[5].name() != "algorithm") {
      return std::nullopt;
    }
    return found;
  }();
  return handle.has_value() ? &*handle : nullptr;
}

bool use_onednn(const at::Tensor& x) {
  const char* setting = std::getenv("REPA_FAST_NATIVE_CPU_GEMM");
  const std::string mode = setting != nullptr && *setting != '\0' ? setting : "auto";
  TORCH_CHECK(mode == "auto" || mode == "onednn" || mode == "aten", "REPA_FAST_NATIVE_CPU_GEMM "
              "must be auto, onednn or aten; got '", mode, "'");
  if (mode == "aten" || !x.is_cpu()) return false;
  // float32 only: bfloat16 at::mm already goes to oneDNN where the CPU supports it (ATen
  // checks that; this path would not)
  const bool dtype_ok = x.scalar_type() == at::kFloat;
  const bool available = at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
                         onednn_linear_op() != nullptr && !onednn_failed().load();
  TORCH_CHECK(mode == "auto" || (available && dtype_ok), "REPA_FAST_NATIVE_CPU_GEMM=onednn "
              "but ", !available ? "this torch has no usable oneDNN linear op "
              "(mkldnn::_linear_pointwise), or torch.backends.mkldnn is disabled"
              : "the oneDNN path runs float32 only; got ", available ? c10::toString(
              x.scalar_type()) : "");
  return available && dtype_ok;
}

// x·Wᵀ + bias (bias may be undefined), then silu when `silu`, in one oneDNN call. When the op
// throws under "auto" (an unexpected CPU or build), at::mm takes over for the rest of the process.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                         bool silu) {
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.defined() ? c10::IValue(bias) : c10::IValue());
  stack.emplace_back(std::string(silu ? "swish" : "none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  try {
    onednn_linear_op()->callBoxed(&stack);
    return stack.at(0).toTensor();
  } catch (const c10::Error& error) {
    const char* setting = std::getenv("REPA_FAST_NATIVE_CPU_GEMM");
    if (setting != nullptr && std::string(setting) == "onednn") throw;
    TORCH_WARN_ONCE("repa_fast native op: oneDNN's linear failed (", error.what_without_backtrace(),
                    "); using at::mm for the CPU GEMMs from now on");
    onednn_failed().store(true);
  }
  at::Tensor y = bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
  return silu ? at::silu_(y) : y;
}

// x·wᵀ, on oneDNN for CPU float32 (w may be a transposed view: read in place; a
// non-contiguous x would be copied), else at::mm (cuBLAS, MKL). A new contiguous tensor.
at::Tensor gemm_xwt(const at::Tensor& x, const at::Tensor& w) {
  if (use_onednn(x)) return onednn_linear(x, w, at::Tensor(), false);
  return at::mm(x, w.t());
}

// The projector up to p, in ≤ 2 (keep_pre: 3) [M, P] buffers:
//   s̄2 = pooled silu(pre2), pre2 = silu(pre1)·W2ᵀ + b2, pre1 = h·W1ᵀ + b1;  proj = s̄2·W3ᵀ.
struct Chain {
  at::Tensor pre1, pre2;  // keep_pre only: pre-activations, bias added
  at::Tensor s2;          // s̄2 [R, P], a view of the first R rows of s1_buffer (or of pre2's
                          // buffer when neither pooled nor kept)
  at::Tensor s1_buffer;   // keep_pre only: the [M, P] buffer holding s̄2
  at::Tensor proj;        // [R, Z], without b3
};

Chain project_chain(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                    const Geometry& geo, bool keep_pre) {
  const bool pooled = geo.pool > 1;
  const at::Tensor bias1 = b1.contiguous(), bias2 = b2.contiguous();
  Chain chain;
  if (use_onednn(h)) {
    if (!keep_pre) {
      at::Tensor s1 = onednn_linear(h, w1, bias1, true);
      if (!pooled) {
        chain.s2 = onednn_linear(s1, w2, bias2, true);
      } else {
        const at::Tensor pre2 = onednn_linear(s1, w2, bias2, false);
        chain.s2 = s1.narrow(0, 0, geo.rows);  // s1 is consumed: its buffer takes s̄2
        bias_silu_pool(pre2, at::Tensor(), chain.s2, geo, true, false);
      }
    } else {
      chain.pre1 = onednn_linear(h, w1, bias1, false);
      chain.s1_buffer = at::empty_like(chain.pre1);
      bias_silu_pool(chain.pre1, at::Tensor(), chain.s1_buffer, geo, false, false);
      chain.pre2 = onednn_linear(chain.s1_buffer, w2, bias2, false);
      chain.s2 = chain.s1_buffer.narrow(0, 0, geo.rows);
      bias_silu_pool(chain.pre2, at::Tensor(), chain.s2, geo, pooled, false);
    }
    chain.proj = onednn_linear(chain.s2, w3, at::Tensor(), false);
    return chain;
  }
  // at::mm, bias and SiLU fused into one pass after each GEMM
  at::Tensor a = at::mm(h, w1.t());
  at::Tensor s1 = keep_pre ? at::empty_like(a) : a;
  bias_silu_pool(a, bias1, s1, geo, false, keep_pre);
  at::Tensor c = at::mm(s1, w2.t());
  // s̄2 goes where nothing live is overwritten: into C itself (neither pooled nor kept), else
  // into the first R rows of s1's buffer, which C no longer needs
  chain.s2 = (!pooled && !keep_pre) ? c : s1.narrow(0, 0, geo.rows);
  bias_silu_pool(c, bias2, chain.s2, geo, pooled, keep_pre);
  chain.proj = at::mm(chain.s2, w3.t());
  if (keep_pre) {
    chain.pre1 = a;
    chain.pre2 = c;
    chain.s1_buffer = s1;
  }
  return chain;
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

bool built_with_cuda() {
#ifdef REPA_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

Geometry check_inputs(const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& w1,
                      const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                      const at::Tensor& w3, const at::Tensor& b3, int64_t hidden_grid,
                      int64_t target_grid, int64_t target_prefix_tokens) {
  TORCH_CHECK_TYPE(hidden.defined(), "repa_fast native alignment op: hidden must be a tensor; "
                   "got an undefined tensor");
  const char* names[] = {"hidden", "target", "w1", "b1", "w2", "b2", "w3", "b3"};
  const at::Tensor* tensors[] = {&hidden, &target, &w1, &b1, &w2, &b2, &w3, &b3};
  for (int i = 0; i < 8; ++i) check_tensor(*tensors[i], names[i], hidden);
  TORCH_CHECK_VALUE(hidden.is_cpu() || hidden.is_cuda(), "the native alignment op runs on CPU "
                    "and CUDA tensors; got tensors on ", hidden.device());
  TORCH_CHECK(hidden.is_cpu() || built_with_cuda(), "hidden is a CUDA tensor but this build of "
              "the repa_fast native extension has no CUDA kernels (built without nvcc/CUDA_HOME "
              "or with REPA_FAST_BUILD_CUDA=0); rebuild with REPA_FAST_BUILD_CUDA=1");
  TORCH_CHECK_VALUE(hidden.dim() == 3 && target.dim() == 3, "hidden and target must be "
                    "[B, T, C]; got ", shape_of(hidden), " and ", shape_of(target));
  const int64_t batch = hidden.size(0);
  TORCH_CHECK_VALUE(target.size(0) == batch, "target must have the batch size of hidden (",
                    batch, "); got ", target.size(0));
  TORCH_CHECK_VALUE(batch > 0, "hidden must hold at least one sample; got an empty batch");
  const int64_t d = hidden.size(2), z = target.size(2);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(0) > 0, "w1 must be [P, D] with P > 0 (nn.Linear "
                    "layout); got ", shape_of(w1));
  const int64_t p = w1.size(0);
  TORCH_CHECK_VALUE(d > 0 && z > 0, "hidden and target need a non-empty last dimension; got ",
                    shape_of(hidden), " and ", shape_of(target));
  check_shape(w1, "w1", {p, d}, d, p, z);
  check_shape(b1, "b1", {p}, d, p, z);
  check_shape(w2, "w2", {p, p}, d, p, z);
  check_shape(b2, "b2", {p}, d, p, z);
  check_shape(w3, "w3", {z, p}, d, p, z);
  check_shape(b3, "b3", {z}, d, p, z);
  for (int i = 2; i < 8; ++i) {
    TORCH_CHECK_TYPE(tensors[i]->scalar_type() == hidden.scalar_type(), names[i], " must have "
                     "the dtype of hidden (", hidden.scalar_type(), "): the GEMMs run in one "
                     "dtype; got ", tensors[i]->scalar_type(), " (cast the weights, as autocast "
                     "would)");
  }
  const int64_t target_tokens = target.size(1);
  TORCH_CHECK_VALUE(target_prefix_tokens >= 0 && target_prefix_tokens < target_tokens,
                    "target_prefix_tokens must be in [0, ", target_tokens, ") (target has ",
                    target_tokens, " tokens); got ", target_prefix_tokens);

  Geometry geo{};
  geo.batch = batch;
  geo.tokens = hidden.size(1);
  geo.grid = check_grid(hidden_grid, geo.tokens, "hidden");
  geo.target_tokens = target_tokens;
  geo.prefix = target_prefix_tokens;
  geo.target_grid = check_grid(target_grid, target_tokens - target_prefix_tokens, "target");
  if (geo.grid % geo.target_grid == 0) {
    geo.pool = geo.grid / geo.target_grid;
    geo.target_pool = 1;
  } else if (geo.target_grid % geo.grid == 0) {
    geo.pool = 1;
    geo.target_pool = geo.target_grid / geo.grid;
  } else {
    TORCH_CHECK_VALUE(false, "the SiT grid (", geo.grid, "x", geo.grid, ") and the target "
                      "grid (", geo.target_grid, "x", geo.target_grid, ") must differ by an "
                      "integer factor per side");
  }
  geo.pooled_grid = geo.grid / geo.pool;
  geo.cells = geo.pooled_grid * geo.pooled_grid;
  geo.rows = batch * geo.cells;
  geo.m = batch * geo.tokens;
  return geo;
}

ForwardOutputs forward(const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                       const at::Tensor& w3, const at::Tensor& b3, int64_t hidden_grid,
                       int64_t target_grid, int64_t target_prefix_tokens,
                       bool save_intermediates) {
  const Geometry geo = check_inputs(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid,
                                    target_grid, target_prefix_tokens);
  const c10::OptionalDeviceGuard guard(hidden.device());
  const at::ScalarType acc = accumulate_type(hidden.scalar_type());
  const at::Tensor h = hidden.reshape({geo.m, hidden.size(2)});

  ForwardOutputs out;
  Chain chain = project_chain(h, w1, b1, w2, b2, w3, geo, save_intermediates);
  chain.s2.reset();  // the [M, P] buffers not kept are freed here
  chain.s1_buffer.reset();
  at::Tensor proj = chain.proj;

  // float64 stats: the norms of finite float32 rows can exceed float32's range
  out.stats = at::empty({3, geo.rows}, proj.options().dtype(at::kDouble));
  out.loss = at::empty({}, proj.options().dtype(acc));
  cosine_forward(proj, b3.contiguous(), prepare_target(target, acc), out.stats, out.loss, geo);
  if (save_intermediates) {
    out.pre1 = chain.pre1;
    out.pre2 = chain.pre2;
    out.proj = proj;
  }
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                 const at::Tensor& target, const at::Tensor& w1,
                                 const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2, const at::Tensor& w3,
                                 const at::Tensor& b3, const at::Tensor& stats,
                                 const at::Tensor& pre1, const at::Tensor& pre2,
                                 const at::Tensor& proj, int64_t hidden_grid,
                                 int64_t target_grid, int64_t target_prefix_tokens,
                                 bool target_requires_grad) {
  const Geometry geo = check_inputs(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid,
                                    target_grid, target_prefix_tokens);
  const at::ScalarType acc = accumulate_type(hidden.scalar_type());
  const int64_t d = hidden.size(2), p = w1.size(0), zdim = w3.size(0);
  TORCH_CHECK_VALUE(grad_loss.defined() && grad_loss.numel() == 1, "grad_loss must be a "
                    "one-element tensor (the gradient of the scalar loss); got ",
                    grad_loss.defined() ? shape_of(grad_loss)
                                        : std::string("an undefined tensor"));
  if (!(stats.defined() && stats.sizes() == at::IntArrayRef({3, geo.rows}) &&
        stats.scalar_type() == at::kDouble && stats.device() == hidden.device())) {
    std::ostringstream given;
    if (stats.defined()) {
      given << shape_of(stats) << " " << stats.scalar_type() << " on " << stats.device();
    } else {
      given << "an undefined tensor";
    }
    TORCH_CHECK_VALUE(false, "stats must be the [3, ", geo.rows, "] ", at::kDouble, " tensor "
                      "alignment_forward returned for these inputs, on ", hidden.device(),
                      "; got ", given.str());
  }
  const bool saved = pre1.defined();
  TORCH_CHECK_VALUE(saved == pre2.defined() && saved == proj.defined(), "pre1, pre2 and proj "
                    "must be given together (saved by a forward with save_intermediates) or not "
                    "at all");
  if (saved) {
    const at::Tensor* kept[] = {&pre1, &pre2, &proj};
    const char* names[] = {"pre1", "pre2", "proj"};
    const int64_t rows[] = {geo.m, geo.m, geo.rows};
    const int64_t cols[] = {p, p, zdim};
    for (int i = 0; i < 3; ++i) {
      TORCH_CHECK_VALUE(kept[i]->sizes() == at::IntArrayRef({rows[i], cols[i]}) &&
                      kept[i]->scalar_type() == hidden.scalar_type() &&
                      kept[i]->device() == hidden.device() && kept[i]->is_contiguous(),
                        names[i], " must be the contiguous [", rows[i], ", ", cols[i], "] ",
                        hidden.scalar_type(), " tensor the saving forward returned; got ",
                        shape_of(*kept[i]), " ", kept[i]->scalar_type());
    }
  }
  const c10::OptionalDeviceGuard guard(hidden.device());
  const at::Tensor h = hidden.reshape({geo.m, d});
  const bool pooled = geo.pool > 1;
  const at::TensorOptions acc_options = hidden.options().dtype(acc);

  at::Tensor a, b, c, projected;
  if (saved) {
    a = pre1;
    c = pre2;
    projected = proj;
    b = at::empty({geo.m, p}, hidden.options());
    bias_silu_pool(c, at::Tensor(), b.narrow(0, 0, geo.rows), geo, pooled, false);
  } else {
    Chain chain = project_chain(h, w1, b1, w2, b2, w3, geo, /*keep_pre=*/true);
    a = chain.pre1;
    c = chain.pre2;
    b = chain.s1_buffer;
    projected = chain.proj;
  }
  at::Tensor s2 = b.narrow(0, 0, geo.rows);

  // cosine stage
  const at::Tensor z = prepare_target(target, acc);
  const at::Tensor grad = grad_loss.reshape({}).to(hidden.device(), acc);
  at::Tensor dp = at::empty({geo.rows, zdim}, hidden.options());
  at::Tensor db3 = at::empty({zdim}, acc_options);
  // prefix tokens get no gradient: zero-filled, the kernels write every other row
  at::Tensor dz = target_requires_grad ? at::zeros(target.sizes(), acc_options) : at::Tensor();
  cosine_backward(grad, projected, b3.contiguous(), z, stats.contiguous(), dp, db3, dz, geo);
  projected.reset();

  // Weight gradients aᵀ·b go to at::mm, which reads the transposed operand in place (oneDNN
  // would copy it: one more [M, P] buffer); the dS̄/ds1/dh GEMMs take transposed weights,
  // which oneDNN reads as strided matrices.
  at::Tensor dw3 = at::mm(dp.t(), s2);
  s2.reset();
  b.reset();  // S̄ is done with: B's memory goes back before dS̄ is allocated
  at::Tensor ds2 = gemm_xwt(dp, w3.t());  // dS̄ = dp·W3
  dp.reset();
  // dpre2 overwrites pre2 when it is ours; a saved pre2 is an input and stays untouched, so
  // dpre2 overwrites dS̄ then (row t reads only row t of dS̄ when nothing is pooled)
  at::Tensor dpre = !saved ? c : (pooled ? at::empty_like(c) : ds2);
  at::Tensor db2 = at::empty({p}, acc_options);
  silu_grad_spread(ds2, c, dpre, db2, geo, pooled, 1.0 / static_cast<double>(geo.pool * geo.pool));
  ds2.reset();
  c.reset();

  b = at::empty({geo.m, p}, hidden.options());
  bias_silu_pool(a, at::Tensor(), b, geo, false, false);  // s1 = silu(pre1) again
  at::Tensor dw2 = at::mm(dpre.t(), b);  // dW2 = dpre2ᵀ·s1
  b.reset();
  at::Tensor ds1 = gemm_xwt(dpre, w2.t());  // ds1 = dpre2·W2
  at::Tensor db1 = at::empty({p}, acc_options);
  silu_grad_spread(ds1, a, dpre, db1, geo, false, 1.0);  // dpre1 replaces dpre2
  ds1.reset();
  a.reset();
  at::Tensor dw1 = at::mm(dpre.t(), h);  // dW1 = dpre1ᵀ·h
  at::Tensor dh = gemm_xwt(dpre, w1.t()).view(hidden.sizes());  // dh = dpre1·W1
  dpre.reset();

  at::Tensor dtarget = target_requires_grad ? dz.to(target.scalar_type()) : at::Tensor();
  return {dh, dtarget, dw1, db1.to(b1.scalar_type()), dw2, db2.to(b2.scalar_type()), dw3,
          db3.to(b3.scalar_type())};
}

}  // namespace detail

std::tuple<at::Tensor, at::Tensor> alignment_forward(
    const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
    const at::Tensor& b3, int64_t hidden_grid, int64_t target_grid,
    int64_t target_prefix_tokens) {
  detail::ForwardOutputs out = detail::forward(hidden, target, w1, b1, w2, b2, w3, b3,
                                               hidden_grid, target_grid, target_prefix_tokens,
                                               /*save_intermediates=*/false);
  return {out.loss, out.stats};
}

std::vector<at::Tensor> alignment_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& target,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& stats, int64_t hidden_grid,
    int64_t target_grid, int64_t target_prefix_tokens, bool target_requires_grad) {
  return detail::backward(grad_loss, hidden, target, w1, b1, w2, b2, w3, b3, stats,
                          at::Tensor(), at::Tensor(), at::Tensor(), hidden_grid, target_grid,
                          target_prefix_tokens, target_requires_grad);
}

}  // namespace repa_fast
