"""Shared inputs, backends and checks of the alignment-op tests: the float64 loop every backend
is compared with, where each backend runs here, and the loss-and-gradients check."""
import pytest
import torch

from repa_fast.ops import backend_problem, repa_alignment_loss

# Where the Triton tests run their kernels: the GPU when there is one (Triton has no CPU
# backend), else the CPU through Triton's interpreter (tests/conftest.py sets it up).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "triton", "native")
# the op's differentiable inputs in the order the tests pass them to autograd.grad
NAMES = ["hidden", "w1", "b1", "w2", "b2", "w3", "b3", "target"]
HERE = r"\((cpu|cuda:\d+)\)"  # the device of hidden, as a message names it


def backend_device(name, dtype=torch.float32):
    """Where backend ``name`` runs ``dtype`` here: the GPU when it can, else the CPU, else None."""
    for device in dict.fromkeys([DEVICE, "cpu"]):
        if backend_problem(name, device, dtype) is None:
            return device
    return None


def runs_here(name, dtype=torch.float32):
    """A skip mark saying why backend ``name`` cannot run ``dtype`` here (none when it can)."""
    problem = None if backend_device(name, dtype) else backend_problem(name, "cpu", dtype)
    return pytest.mark.skipif(problem is not None, reason=f"{name}: {problem}")


def backend_params(*names, dtype=torch.float32):
    """``pytest.param`` of each backend (default: all), skipped where it cannot run ``dtype``."""
    return [pytest.param(name, marks=runs_here(name, dtype)) for name in names or BACKENDS]


def loop_loss(h, z, w1, b1, w2, b2, w3, b3, prefix=0):
    """float64, sample by sample and patch by patch, as the formula is written."""
    h, z = h.double(), z.double()[:, prefix:]
    w1, b1, w2, b2, w3, b3 = (t.double() for t in (w1, b1, w2, b2, w3, b3))
    silu = torch.nn.functional.silu
    hg, tg = int(h.shape[1] ** 0.5), int(z.shape[1] ** 0.5)
    g = min(hg, tg)
    kh, kt = hg // g, tg // g
    total, count = 0.0, 0
    for b in range(h.shape[0]):
        p = silu(h[b] @ w1.T + b1)
        p = silu(p @ w2.T + b2)
        p = p @ w3.T + b3  # [T, Z]
        for r in range(g):
            for c in range(g):
                pp = torch.stack([p[(r * kh + i) * hg + c * kh + j]
                                  for i in range(kh) for j in range(kh)]).mean(0)
                zz = torch.stack([z[b, (r * kt + i) * tg + c * kt + j]
                                  for i in range(kt) for j in range(kt)]).mean(0)
                cos = (pp / pp.norm().clamp_min(1e-12)) @ (zz / zz.norm().clamp_min(1e-12))
                total, count = total - cos, count + 1
    return total / count


def make_inputs(B, T, T_target, D=48, P=80, Z=40, dtype=torch.float32, target_grad=False,
                device="cpu"):
    """Hidden states [B, T, D], target [B, T_target, Z] and projector weights, all leaves on
    ``device`` (drawn on the CPU, so a seed gives the same numbers on every device)."""
    h = torch.randn(B, T, D, dtype=dtype)
    z = torch.randn(B, T_target, Z, dtype=dtype)
    ws = [torch.randn(P, D) / D ** 0.5, torch.randn(P) * 0.1, torch.randn(P, P) / P ** 0.5,
          torch.randn(P) * 0.1, torch.randn(Z, P) / P ** 0.5, torch.randn(Z) * 0.1]
    ws = [w.to(device, dtype).requires_grad_(True) for w in ws]
    return h.to(device).requires_grad_(True), z.to(device).requires_grad_(target_grad), ws


def moved(h, z, ws, device, dtype=None, target_grad=False):
    """Fresh leaves of ``h, z, ws`` on ``device`` (in ``dtype`` when given)."""
    def move(t):
        t = t.detach().to(device)
        return t.to(dtype) if dtype is not None else t

    return (move(h).requires_grad_(), move(z).requires_grad_(target_grad),
            [move(w).requires_grad_() for w in ws])


def leaves_of(inputs):
    return [t.detach().cpu().double().requires_grad_() for t in inputs]


def check_grads(loss, inputs, ref, leaves, rtol, names=NAMES, scale=None):
    """Loss and every gradient against the float64 ``ref`` of ``leaves`` (relative errors; the
    mean cosine of random data is near 0, so the loss is compared against the size of its terms
    too); ``scale[name]`` divides the reference gradient (inputs scaled by it)."""
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert abs(loss.item() - ref.item()) <= rtol * (abs(ref.item()) + 1e-2), (loss, ref)
    for name, g, rg, t in zip(names, grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        rg = rg / (scale or {}).get(name, 1.0)
        g = g.detach().cpu().double()
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        err = (g - rg).norm().item()
        assert err <= rtol * rg.norm().item() + 1e-300, f"d{name}: {err:.3e}, |ref| {rg.norm():.3e}"
    return grads


def check_against_loop(backend, h, z, ws, prefix, target_grad, rtol, **kwargs):
    """``backend``'s loss (a scalar of at least float32) and its gradients of every input
    against the float64 loop; returns the gradients."""
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=prefix, backend=backend, **kwargs)
    expected_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.dim() == 0
    inputs = [h] + ws + ([z] if target_grad else [])
    leaves = leaves_of(inputs)
    z64 = leaves[7] if target_grad else z.detach().cpu().double()
    ref = loop_loss(leaves[0], z64, *leaves[1:7], prefix=prefix)
    return check_grads(loss, inputs, ref, leaves, rtol)


def cuda_peak_extra_bytes(projector, h, z, backend):
    """Peak CUDA memory one forward + backward of ``projector.alignment_loss`` adds above what
    exists before it (inputs, weights, .grad buffers), after two calls that allocate the .grad
    buffers and let Triton autotune."""
    for _ in range(2):
        projector.zero_grad(set_to_none=False)
        projector.alignment_loss(h, z, backend=backend).backward()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    projector.alignment_loss(h, z, backend=backend).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
