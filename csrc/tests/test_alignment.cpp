// test_alignment: checks repa_fast::alignment_forward / alignment_backward (csrc/alignment.h)
// against a libtorch-autograd reference of the REPA alignment loss, on CPU (and on CUDA where
// the library was built with its CUDA part and a GPU is present); the differentiable
// repa_fast::alignment_loss (csrc/alignment_autograd.h) against them, and in a C++ training
// loop. Built and run by CMake:
//
//   cmake -S . -B build -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
//   cmake --build build -j && ctest --test-dir build --output-on-failure
//
// Reference, per SiT token h (row-major grid tokens, nn.Linear weight layout):
//   p    = W3 silu(W2 silu(W1 h + b1) + b2) + b3
//   the finer of the two grids is average-pooled over k x k cells to the coarser one,
//   loss = mean over batch and pooled tokens of -<p / max(|p|, eps), z / max(|z|, eps)>, eps = 1e-12
// The reference runs in float64 on the same (rounded) inputs, so a float32 result is compared
// with the exact answer, within a float32 tolerance.
//
// Environment: REPA_FAST_TEST_SEED (default 0) seeds the inputs; REPA_FAST_TEST_PERTURB=x adds x
// to every hidden input of the reference only -- the checks must then fail (exit status 1),
// which shows that they can.
// Exit status: 0 when every check passes, 1 otherwise.
#include <torch/torch.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

#include "alignment.h"
#include "alignment_autograd.h"

#ifndef REPA_FAST_TEST_OP_NAMESPACE
#define REPA_FAST_TEST_OP_NAMESPACE "repa_fast"
#endif

namespace {

namespace F = torch::nn::functional;

int g_checks = 0;
int g_failures = 0;
double g_perturb = 0.0;

void report(bool ok, const std::string& what, const std::string& detail) {
  ++g_checks;
  if (!ok) ++g_failures;
  std::printf("[%s] %s%s%s\n", ok ? " OK " : "FAIL", what.c_str(), detail.empty() ? "" : ": ",
              detail.c_str());
  std::fflush(stdout);
}

// max |actual - expected| <= atol + rtol * scale, scale = max |expected| (or given).
void check_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected,
                 double rtol, double atol, double scale = -1.0) {
  char buf[320];
  if (!actual.defined()) {
    report(false, what, "undefined tensor");
    return;
  }
  if (actual.sizes() != expected.sizes()) {
    std::snprintf(buf, sizeof buf, "shape %s, expected %s", c10::str(actual.sizes()).c_str(),
                  c10::str(expected.sizes()).c_str());
    report(false, what, buf);
    return;
  }
  const at::Tensor a = actual.detach().to(at::kCPU, at::kDouble);
  const at::Tensor e = expected.detach().to(at::kCPU, at::kDouble);
  if (scale < 0) scale = e.numel() ? e.abs().max().item<double>() : 0.0;
  const double err = a.numel() ? (a - e).abs().max().item<double>() : 0.0;
  const double bound = atol + rtol * scale;
  const bool finite = a.numel() == 0 || a.isfinite().all().item<bool>();
  const bool ok = finite && err <= bound;
  std::snprintf(buf, sizeof buf, "max abs err %.3e %s %.3e (scale %.3e)%s", err,
                err <= bound ? "<=" : "EXCEEDS", bound, scale, finite ? "" : ", NOT FINITE");
  report(ok, what, buf);
}

at::Tensor pool_tokens(const at::Tensor& x, int64_t grid, int64_t k) {
  if (k == 1) return x;
  const int64_t b = x.size(0), c = x.size(2), g = grid / k;
  return x.reshape({b, g, k, g, k, c}).mean({2, 4}).reshape({b, g * g, c});
}

struct Inputs {
  at::Tensor hidden, target, w1, b1, w2, b2, w3, b3;
  std::vector<at::Tensor> all() const { return {hidden, target, w1, b1, w2, b2, w3, b3}; }
};

struct Reference {
  at::Tensor loss;                 // 0-dim, float64
  at::Tensor stats;                // [3, R]: cos, max(|p|, eps), max(|z|, eps), float64
  std::vector<at::Tensor> grads;   // hidden, target, w1, b1, w2, b2, w3, b3 (float64)
};

// float64 autograd reference on (copies of) the inputs.
Reference reference(const Inputs& in, const at::Tensor& grad_loss, int64_t hidden_grid,
                    int64_t target_grid, int64_t prefix) {
  std::vector<at::Tensor> x;
  for (const auto& t : in.all())
    x.push_back(t.detach().to(at::kCPU, at::kDouble).clone().set_requires_grad(true));
  at::Tensor h = x[0];
  if (g_perturb != 0.0) h = h + g_perturb;
  const at::Tensor z = x[1].slice(/*dim=*/1, prefix);
  at::Tensor p = F::linear(h, x[2], x[3]);
  p = F::linear(F::silu(p), x[4], x[5]);
  p = F::linear(F::silu(p), x[6], x[7]);
  const int64_t g = std::min(hidden_grid, target_grid);
  const at::Tensor pp = pool_tokens(p, hidden_grid, hidden_grid / g);
  const at::Tensor zz = pool_tokens(z, target_grid, target_grid / g);
  const auto opts = F::NormalizeFuncOptions().p(2).dim(-1).eps(1e-12);
  const at::Tensor cos = (F::normalize(pp, opts) * F::normalize(zz, opts)).sum(-1);
  Reference r;
  r.loss = -cos.mean();
  r.stats = at::stack({cos.reshape({-1}), pp.norm(2, -1).clamp_min(1e-12).reshape({-1}),
                       zz.norm(2, -1).clamp_min(1e-12).reshape({-1})})
                .detach();
  r.grads = torch::autograd::grad({r.loss}, x, {grad_loss.to(at::kCPU, at::kDouble)});
  r.loss = r.loss.detach();
  return r;
}

Inputs make_inputs(int64_t batch, int64_t tokens, int64_t target_tokens, int64_t d, int64_t p,
                   int64_t z, at::ScalarType dtype, const at::Device& device) {
  // Generated in float64 on the CPU (the same numbers for every dtype and device), then cast.
  const auto o = at::TensorOptions().dtype(at::kDouble);
  Inputs in;
  in.hidden = at::randn({batch, tokens, d}, o);
  in.target = at::randn({batch, target_tokens, z}, o);
  in.w1 = at::randn({p, d}, o) / std::sqrt(double(d));
  in.b1 = at::randn({p}, o) * 0.1;
  in.w2 = at::randn({p, p}, o) / std::sqrt(double(p));
  in.b2 = at::randn({p}, o) * 0.1;
  in.w3 = at::randn({z, p}, o) / std::sqrt(double(p));
  in.b3 = at::randn({z}, o) * 0.1;
  for (at::Tensor* t : {&in.hidden, &in.target, &in.w1, &in.b1, &in.w2, &in.b2, &in.w3, &in.b3})
    *t = t->to(device, dtype).contiguous();
  return in;
}

struct Case {
  const char* name;
  int64_t batch, hidden_grid, target_grid, prefix;
  bool target_requires_grad;
};

void run_case(const Case& c, at::ScalarType dtype, const at::Device& device) {
  const int64_t D = 48, P = 80, Z = 40;
  const bool fp64 = dtype == at::kDouble;
  // Relative to the largest reference value of each tensor (gradients are ~1e-4..1e-2 here).
  const double rtol = fp64 ? 1e-10 : 1e-5;
  const double atol = fp64 ? 1e-14 : 1e-9;
  const std::string tag = std::string(c.name) + " [" + c10::toString(dtype) + ", " +
                          device.str() + "]";
  std::printf("-- %s: B=%lld hidden %lldx%lld, target %lldx%lld + %lld prefix token(s), "
              "target grad %s\n",
              tag.c_str(), (long long)c.batch, (long long)c.hidden_grid, (long long)c.hidden_grid,
              (long long)c.target_grid, (long long)c.target_grid, (long long)c.prefix,
              c.target_requires_grad ? "yes" : "no");
  try {
    const Inputs in = make_inputs(c.batch, c.hidden_grid * c.hidden_grid,
                                  c.prefix + c.target_grid * c.target_grid, D, P, Z, dtype, device);
    // A loss gradient other than 1, to catch a dropped grad_loss factor.
    const at::Tensor grad_loss = at::full({}, 0.75, at::TensorOptions().dtype(
                                                       fp64 ? at::kDouble : at::kFloat).device(device));
    const Reference ref = reference(in, grad_loss, c.hidden_grid, c.target_grid, c.prefix);

    at::Tensor loss, stats;
    std::tie(loss, stats) =
        repa_fast::alignment_forward(in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3,
                                     in.b3, c.hidden_grid, c.target_grid, c.prefix);
    const at::ScalarType loss_dtype = fp64 ? at::kDouble : at::kFloat;
    report(loss.defined() && loss.dim() == 0 && loss.scalar_type() == loss_dtype &&
               loss.device() == device,
           tag + " loss is a 0-dim " + c10::toString(loss_dtype) + " tensor on " + device.str(),
           loss.defined() ? c10::str(loss.sizes(), " ", loss.scalar_type(), " ", loss.device())
                          : "undefined");
    // The loss is a mean of cosines: scale 1.
    check_close(tag + " loss", loss, ref.loss, rtol, atol, /*scale=*/1.0);
    check_close(tag + " stats[0] (cos)", stats.defined() && stats.dim() == 2 ? stats[0] : stats,
                ref.stats[0], rtol, atol, 1.0);
    check_close(tag + " stats[1] (|p|)", stats.defined() && stats.dim() == 2 ? stats[1] : stats,
                ref.stats[1], rtol, atol);
    check_close(tag + " stats[2] (|z|)", stats.defined() && stats.dim() == 2 ? stats[2] : stats,
                ref.stats[2], rtol, atol);

    const std::vector<at::Tensor> grads = repa_fast::alignment_backward(
        grad_loss, in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3, in.b3, stats,
        c.hidden_grid, c.target_grid, c.prefix, c.target_requires_grad);
    static const char* names[] = {"d_hidden", "d_target", "d_w1", "d_b1",
                                  "d_w2",     "d_b2",     "d_w3", "d_b3"};
    report(grads.size() == 8, tag + " backward returns 8 tensors", std::to_string(grads.size()));
    const std::vector<at::Tensor> inputs = in.all();
    for (size_t i = 0; i < std::min<size_t>(grads.size(), 8); ++i) {
      const std::string what = tag + " " + names[i];
      if (i == 1 && !c.target_requires_grad) {
        report(!grads[i].defined(), what + " undefined (target_requires_grad=false)",
               grads[i].defined() ? "defined" : "");
        continue;
      }
      if (grads[i].defined() &&
          (grads[i].scalar_type() != dtype || grads[i].device() != device)) {
        report(false, what + " dtype/device",
               c10::str(grads[i].scalar_type(), " on ", grads[i].device(), ", expected ", dtype,
                        " on ", device));
      }
      check_close(what, grads[i], ref.grads[i], rtol, atol);
    }
  } catch (const std::exception& e) {
    report(false, tag, std::string("exception: ") + e.what());
  }
}

// The ops csrc/ops.cpp registers with the dispatcher (TORCH_LIBRARY(repa_fast, m)): what
// Python calls as torch.ops.repa_fast.native_alignment_fwd / _bwd.
const char* const kForwardOp = REPA_FAST_TEST_OP_NAMESPACE "::native_alignment_fwd";
const char* const kBackwardOp = REPA_FAST_TEST_OP_NAMESPACE "::native_alignment_bwd";

void check_dispatcher() {
  for (const char* op : {kForwardOp, kBackwardOp}) {
    try {
      const c10::OperatorHandle& handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "");
      report(true, std::string("dispatcher has ") + op, c10::toString(handle.schema()));
      report(handle.hasKernelForDispatchKey(c10::DispatchKey::CPU),
             std::string(op) + " has a CPU kernel", "");
#ifdef REPA_FAST_WITH_CUDA
      report(handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA),
             std::string(op) + " has a CUDA kernel", "");
#endif
    } catch (const std::exception& e) {
      report(false, std::string("dispatcher has ") + op, e.what());
    }
  }
}

// The registered ops, called through the dispatcher, agree with the C++ API: the forward with
// and without saved intermediates, the backward from both (saved ones skip the recomputation).
void check_dispatcher_calls(const at::Device& device) {
  const std::string tag = std::string(" [") + device.str() + "]";
  try {
    using T = const at::Tensor&;
    auto fwd = c10::Dispatcher::singleton()
                   .findSchemaOrThrow(kForwardOp, "")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                       T, T, T, T, T, T, T, T, int64_t, int64_t, int64_t, bool)>();
    auto bwd = c10::Dispatcher::singleton()
                   .findSchemaOrThrow(kBackwardOp, "")
                   .typed<std::vector<at::Tensor>(T, T, T, T, T, T, T, T, T, T, T, T, T, int64_t,
                                                  int64_t, int64_t, bool)>();
    // hidden 6x6 pooled 3x3 -> 2x2 target with one prefix token; float64.
    const Inputs in = make_inputs(2, 36, 5, 12, 20, 10, at::kDouble, device);
    const at::Tensor grad_loss = at::full({}, 1.5, in.hidden.options());
    const auto direct = repa_fast::alignment_forward(in.hidden, in.target, in.w1, in.b1, in.w2,
                                                     in.b2, in.w3, in.b3, 6, 2, 1);
    const auto direct_grads = repa_fast::alignment_backward(
        grad_loss, in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3, in.b3,
        std::get<1>(direct), 6, 2, 1, true);
    for (bool save : {false, true}) {
      const std::string what = std::string(kForwardOp) + (save ? " (saving)" : "") + tag;
      const auto out = fwd.call(in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3, in.b3,
                                6, 2, 1, save);
      check_close(what + " loss", std::get<0>(out), std::get<0>(direct), 1e-12, 1e-15, 1.0);
      check_close(what + " stats", std::get<1>(out), std::get<1>(direct), 1e-12, 1e-15);
      report(save == (std::get<2>(out).numel() > 0),
             what + (save ? " returns the intermediates" : " returns empty intermediates"),
             c10::str(std::get<2>(out).sizes(), std::get<3>(out).sizes(),
                      std::get<4>(out).sizes()));
      const std::vector<at::Tensor> grads =
          bwd.call(grad_loss, in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3, in.b3,
                   std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out), 6, 2,
                   1, true);
      const std::string bwhat = std::string(kBackwardOp) + (save ? " (from saved)" : "") + tag;
      report(grads.size() == 8, bwhat + " returns 8 tensors", std::to_string(grads.size()));
      for (size_t i = 0; i < std::min<size_t>(grads.size(), 8); ++i)
        check_close(bwhat + " grad " + std::to_string(i), grads[i], direct_grads[i], 1e-12,
                    1e-15);
    }
    // No target gradient: the dispatcher carries an empty tensor where the C++ API returns an
    // undefined one.
    const std::vector<at::Tensor> grads =
        bwd.call(grad_loss, in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3, in.b3,
                 std::get<1>(direct), in.hidden.new_empty({0}), in.hidden.new_empty({0}),
                 in.hidden.new_empty({0}), 6, 2, 1, false);
    report(grads.size() == 8 && grads[1].defined() && grads[1].numel() == 0,
           std::string(kBackwardOp) + " d_target empty without target grad" + tag,
           grads.size() == 8 ? c10::str(grads[1].sizes()) : "");
  } catch (const std::exception& e) {
    report(false, std::string("repa_fast ops through the dispatcher") + tag, e.what());
  }
}

// repa_fast::alignment_loss (the torch::autograd::Function): loss.backward() leaves in .grad
// exactly what alignment_backward returns, for a loss gradient other than 1 and with the grids
// inferred from square token counts; a target that does not require grad gets none.
void check_autograd_function(const at::Device& device) {
  const std::string tag = std::string(" [") + device.str() + "]";
  try {
    const Inputs in = make_inputs(2, 36, 5, 12, 20, 10, at::kDouble, device);
    for (bool target_grad : {false, true}) {
      std::vector<at::Tensor> leaves;
      for (const auto& t : in.all()) leaves.push_back(t.clone().set_requires_grad(true));
      leaves[1].set_requires_grad(target_grad);
      const at::Tensor loss = repa_fast::alignment_loss(
          leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5], leaves[6], leaves[7],
          {/*hidden_grid=*/0, /*target_grid=*/0, /*target_prefix_tokens=*/1});
      report(loss.requires_grad() && loss.grad_fn() != nullptr,
             "alignment_loss has a grad_fn" + tag, "");
      const at::Tensor grad_loss = at::full({}, 0.75, loss.options());
      loss.backward(grad_loss);
      const auto direct = repa_fast::alignment_forward(in.hidden, in.target, in.w1, in.b1, in.w2,
                                                       in.b2, in.w3, in.b3, 6, 2, 1);
      check_close("alignment_loss = alignment_forward" + tag, loss, std::get<0>(direct), 1e-14,
                  0.0, 1.0);
      const auto grads = repa_fast::alignment_backward(
          grad_loss, in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3, in.b3,
          std::get<1>(direct), 6, 2, 1, target_grad);
      static const char* names[] = {"hidden", "target", "w1", "b1", "w2", "b2", "w3", "b3"};
      for (size_t i = 0; i < 8; ++i) {
        const std::string what = std::string("alignment_loss backward: ") + names[i] + ".grad" +
                                 (target_grad ? " (target grad)" : "") + tag;
        if (i == 1 && !target_grad) {
          report(!leaves[1].grad().defined(), what + " undefined", "");
          continue;
        }
        check_close(what, leaves[i].grad(), grads[i], 1e-12, 0.0);
      }
    }
    // a token count that is not a square, with the grid left to be inferred, is refused
    bool raised = false;
    std::string message;
    try {
      repa_fast::alignment_loss(in.hidden, in.target, in.w1, in.b1, in.w2, in.b2, in.w3, in.b3);
    } catch (const c10::Error& e) {
      raised = true;
      message = e.what_without_backtrace();
      message = message.substr(0, message.find('\n'));
    }
    report(raised && message.find("target_grid") != std::string::npos,
           "alignment_loss refuses to infer a grid from 5 tokens" + tag, message);
  } catch (const std::exception& e) {
    report(false, "alignment_loss (autograd)" + tag, std::string("exception: ") + e.what());
  }
}

// A C++ training loop: a torch::nn projector and Adam on the alignment loss alone pull the
// projected tokens towards a fixed target (the loss falls from ~0 towards -1).
void check_cpp_training_loop() {
  try {
    const int64_t B = 4, T = 16, D = 24, P = 32, Z = 16;
    torch::nn::Linear l1(D, P), l2(P, P), l3(P, Z);
    const at::Tensor hidden = torch::randn({B, T, D});
    const at::Tensor target = torch::randn({B, 1 + T, Z});  // a CLS token, then a 4x4 grid
    std::vector<at::Tensor> params;
    for (auto* layer : {&l1, &l2, &l3})
      for (const auto& p : (*layer)->parameters()) params.push_back(p);
    torch::optim::Adam optimizer(params, torch::optim::AdamOptions(1e-2));
    double first = 0.0, last = 0.0;
    for (int step = 0; step < 60; ++step) {
      optimizer.zero_grad();
      const at::Tensor loss = repa_fast::alignment_loss(
          hidden, target, l1->weight, l1->bias, l2->weight, l2->bias, l3->weight, l3->bias,
          {0, 0, /*target_prefix_tokens=*/1});
      loss.backward();
      optimizer.step();
      (step == 0 ? first : last) = loss.item<double>();
    }
    char buf[128];
    std::snprintf(buf, sizeof buf, "loss %.4f -> %.4f after 60 Adam steps", first, last);
    report(std::isfinite(last) && last < first - 0.5, "a C++ training loop lowers the loss", buf);
  } catch (const std::exception& e) {
    report(false, "a C++ training loop", std::string("exception: ") + e.what());
  }
}

// Bad arguments raise a c10::Error (TORCH_CHECK) rather than reading out of bounds.
void check_rejects_bad_arguments() {
  struct Bad {
    const char* what;
    int64_t tokens, target_tokens, hidden_grid, target_grid, prefix;
    bool wrong_w1;
  } bads[] = {{"hidden_grid 5 for 16 tokens", 16, 5, 5, 2, 1, false},
              {"target_grid 3 for 1 + 4 tokens", 16, 5, 4, 3, 1, false},
              {"target_prefix_tokens 2 for 1 + 4 tokens", 16, 5, 4, 2, 2, false},
              {"target_prefix_tokens -1", 16, 5, 4, 2, -1, false},
              {"grids 6 and 4 (no integer factor)", 36, 16, 6, 4, 0, false},
              {"w1 of the wrong shape", 16, 5, 4, 2, 1, true}};
  for (const Bad& b : bads) {
    const Inputs in = make_inputs(2, b.tokens, b.target_tokens, 12, 20, 10, at::kDouble, at::kCPU);
    bool raised = false;
    std::string message;
    try {
      repa_fast::alignment_forward(in.hidden, in.target, b.wrong_w1 ? in.w1.t() : in.w1, in.b1,
                                   in.w2, in.b2, in.w3, in.b3, b.hidden_grid, b.target_grid,
                                   b.prefix);
    } catch (const c10::Error& e) {
      raised = true;
      message = e.what_without_backtrace();
      message = message.substr(0, message.find('\n'));
    } catch (const std::exception& e) {
      message = std::string("not a c10::Error: ") + e.what();
    }
    report(raised, std::string("rejects ") + b.what, message);
  }
}

}  // namespace

int main() {
  if (const char* s = std::getenv("REPA_FAST_TEST_PERTURB")) g_perturb = std::atof(s);
  uint64_t seed = 0;
  if (const char* s = std::getenv("REPA_FAST_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  torch::manual_seed(seed);
  std::printf("test_alignment: seed %llu%s\n", (unsigned long long)seed,
              g_perturb != 0.0 ? " (reference perturbed: checks must fail)" : "");

  check_dispatcher();
  check_dispatcher_calls(at::Device(at::kCPU));
  check_rejects_bad_arguments();
  check_autograd_function(at::Device(at::kCPU));
  check_cpp_training_loop();

  const Case cases[] = {
      // SiT 16x16 against an encoder with a CLS token and a 16x16 grid (REPA's usual set-up).
      {"equal grids, CLS prefix", 3, 16, 16, 1, false},
      {"equal grids, CLS prefix, target grad", 3, 16, 16, 1, true},
      // The SiT grid finer: the projected tokens are pooled 2x2.
      {"hidden 10x10 -> target 5x5", 3, 10, 5, 0, true},
      // The encoder grid finer: the target tokens are pooled 2x2.
      {"hidden 5x5 <- target 10x10", 3, 5, 10, 0, true},
      {"hidden 4x4 <- target 12x12 + 2 prefix", 3, 4, 12, 2, false},
  };
  std::vector<at::Device> devices = {at::Device(at::kCPU)};
#ifdef REPA_FAST_WITH_CUDA
  if (torch::cuda::is_available()) {
    devices.emplace_back(at::kCUDA, 0);
  } else {
    std::printf("(built with CUDA, but no GPU is present: CPU checks only)\n");
  }
#endif
  if (devices.size() > 1) {
    check_dispatcher_calls(devices.back());
    check_autograd_function(devices.back());
  }
  for (const at::Device& device : devices)
    for (at::ScalarType dtype : {at::kDouble, at::kFloat})
      for (const Case& c : cases) run_case(c, dtype, device);

  std::printf("test_alignment: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
