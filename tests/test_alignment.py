"""The alignment op, every backend that runs here, against the float64 loop: loss and every
gradient, in float64 (tight), float32, float16 and bfloat16, on odd shapes (B=3, D=48, P=80,
Z=40, none a multiple of a block size: the interpreter tile is 32) and every token layout:
equal grids, either side pooled, CLS and register prefixes, the 257-token DINOv2 layout. Also
NaN inputs, clear errors, opcheck of the registered ops, torch.compile without graph breaks.

Backends: the PyTorch ``reference``; ``triton`` on the GPU, else on Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set in conftest.py), which handles fp32 and fp16 but not bf16;
``native`` when the extension ``repa_fast._C`` is built (``python setup.py build_ext
--inplace`` or ``pip install --no-build-isolation .``; CI builds it). A backend that cannot run
a case skips it, saying why. Backend-specific checks are named after their backend (``triton``:
the finish kernel, the recompute backward's buffers and FLOPs, autotuning; ``native``: its CPU
GEMM paths, the C++ argument checks, the messages when it is not built); ``-m gpu`` tests run
on a GPU only.
"""
import importlib
import os
import subprocess
import sys
import types
import weakref

import pytest
import torch
import torch.nn.functional as F

import repa_fast
from repa_fast.models import SiT
from repa_fast.models.projector import REPAProjector
from repa_fast.ops import backend_problem, describe_backends, repa_alignment_loss
from repa_fast.ops import native_extension
from repa_fast.ops.alignment_common import avg_pool_tokens, pool_ratio
from repa_fast.ops.alignment_reference import project
from repa_fast.ops.backends import auto_backend
from repa_fast.transport import projection_loss

from alignment_cases import (BACKENDS, DEVICE, HERE, NAMES, backend_device, backend_params,
                             check_against_loop, cuda_peak_extra_bytes, loop_loss, make_inputs,
                             moved, runs_here)

LAYOUTS = [
    pytest.param(25, 25, 0, id="equal-5x5"),                    # the official proj_loss
    pytest.param(25, 100, 0, id="target-10x10-pooled-to-5x5"),  # encoder grid finer
    pytest.param(100, 25, 0, id="sit-10x10-pooled-to-5x5"),     # pooled before the last GEMM
    pytest.param(16, 145, 1, id="cls-12x12-pooled-3x3"),        # CLS skipped, 12x12 onto 4x4
    pytest.param(16, 20, 4, id="4-registers"),                  # registers skipped
]
TARGET_GRAD = [pytest.param(False, id="no-target-grad"), pytest.param(True, id="target-grad")]
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
HALF_RTOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}

NATIVE_PROBLEM = backend_problem("native", "cpu")
needs_native = pytest.mark.skipif(NATIVE_PROBLEM is not None,
                                  reason=f"native extension not usable: {NATIVE_PROBLEM}")
NATIVE_CUDA_PROBLEM = (backend_problem("native", "cuda") if torch.cuda.is_available()
                       else "no CUDA device")
needs_native_cuda = pytest.mark.skipif(NATIVE_CUDA_PROBLEM is not None,
                                       reason=f"native CUDA kernels not usable: "
                                              f"{NATIVE_CUDA_PROBLEM}")
needs_triton = runs_here("triton")
needs_gpu = [pytest.mark.gpu,
             pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def backend_dtype_params(names, dtypes):
    """``(backend, dtype)`` params, each skipped where the backend cannot run the dtype."""
    return [pytest.param(name, *d.values, marks=runs_here(name, *d.values), id=f"{name}-{d.id}")
            for name in names for d in dtypes]


def registered_ops(backend):
    """Import ``backend``'s module, which registers its repa_fast:: ops."""
    return importlib.import_module(f"repa_fast.ops.alignment_{backend}")


def inputs_for(backend, *args, dtype=None, target_grad=False, **kwargs):
    """``make_inputs(*args, **kwargs)`` on the device ``backend`` runs on here, in ``dtype``."""
    h, z, ws = make_inputs(*args, **kwargs)
    return moved(h, z, ws, backend_device(backend, dtype or torch.float32), dtype, target_grad)


@pytest.fixture
def alignment_triton():
    """The Triton backend's module (it registers the repa_fast:: Triton ops)."""
    problem = backend_problem("triton", DEVICE, torch.float32)
    if problem is not None:
        pytest.skip(f"triton: {problem}")
    from repa_fast.ops import alignment_triton
    return alignment_triton


# ----------------------------------------------------------------------------- every backend

@pytest.mark.parametrize("target_grad", TARGET_GRAD)
@pytest.mark.parametrize("T, T_target, prefix", LAYOUTS)
@pytest.mark.parametrize("backend", backend_params())
def test_float32_loss_and_every_gradient(seed, backend, T, T_target, prefix, target_grad):
    h, z, ws = inputs_for(backend, 3, T, T_target, target_grad=target_grad)
    check_against_loop(backend, h, z, ws, prefix, target_grad, rtol=1e-5)
    assert z.grad is None  # grad w.r.t. target only through autograd.grad, when asked


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("target_grad", TARGET_GRAD)
@pytest.mark.parametrize("T, T_target, prefix", LAYOUTS)
@pytest.mark.parametrize("backend", backend_params("reference", "native", dtype=torch.float64))
def test_float64_tight(seed, backend, T, T_target, prefix, target_grad, recompute):
    """float64 in, float64 all the way (loss, stats, accumulation): agreement to 1e-10."""
    h, z, ws = inputs_for(backend, 3, T, T_target, dtype=torch.float64, target_grad=target_grad)
    check_against_loop(backend, h, z, ws, prefix, target_grad, rtol=1e-10, recompute=recompute)


@pytest.mark.parametrize("T, T_target", [(25, 100), (100, 25)])
@pytest.mark.parametrize("backend", backend_params("triton", "native"))
def test_saved_intermediates_mode(seed, backend, T, T_target):
    """recompute=False keeps pre-activations and activations: same numbers."""
    h, z, ws = inputs_for(backend, 3, T, T_target, target_grad=True)
    check_against_loop(backend, h, z, ws, 0, True, rtol=1e-5, recompute=False)


@pytest.mark.parametrize("backend, dtype, recompute, rtol", [
    pytest.param("reference", torch.float32, True, 1e-5, id="reference"),
    pytest.param("triton", torch.float32, True, 1e-5, marks=runs_here("triton"), id="triton"),
    pytest.param("native", torch.float64, True, 1e-10, marks=needs_native, id="native-float64"),
    pytest.param("native", torch.float32, False, 1e-5, marks=needs_native, id="native-saved"),
])
def test_dinov2_layout_257_tokens(seed, backend, dtype, recompute, rtol):
    """DINOv2 at 224px: CLS + 16x16 patch tokens, onto a 16x16 SiT grid; batch 3."""
    h, z, ws = inputs_for(backend, 3, 256, 257, dtype=dtype, target_grad=True)
    check_against_loop(backend, h, z, ws, 1, True, rtol=rtol, recompute=recompute)


@pytest.mark.parametrize("T, T_target", [(25, 25), (100, 25), (25, 100)])
@pytest.mark.parametrize("backend, dtype", backend_dtype_params(BACKENDS, HALF))
def test_half_precision(seed, backend, dtype, T, T_target):
    """bf16/fp16 GEMMs (rounded intermediates), fp32 cosine: within 1e-2 (bf16: 2e-2), the
    loss against the size of its terms (max error of the reference's fp16 loss over 200 seeds:
    2.6e-5)."""
    h, z, ws = inputs_for(backend, 3, T, T_target, dtype=dtype, target_grad=True)
    check_against_loop(backend, h, z, ws, 0, True, rtol=HALF_RTOL[dtype])


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(BACKENDS, HALF))
def test_mixed_dtypes_and_autocast(seed, backend, dtype):
    """A float32 target with half-precision hidden states keeps its dtype (and its gradient's);
    under autocast the GEMMs run in the autocast dtype and float32 weights get float32
    gradients, like autocast's F.linear."""
    h, z, ws = inputs_for(backend, 3, 25, 100, target_grad=True)
    loss = repa_alignment_loss(h.detach().to(dtype).requires_grad_(), z,
                               *[w.detach().to(dtype) for w in ws], backend=backend)
    (dz,) = torch.autograd.grad(loss, [z])
    assert dz.dtype == torch.float32
    with torch.autocast(h.device.type, dtype=dtype):
        loss = repa_alignment_loss(h, z, *ws, backend=backend)
    grads = torch.autograd.grad(loss, [h] + ws)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    ref = loop_loss(h.detach(), z.detach(), *[w.detach() for w in ws])
    # random inputs put the loss near 0: the error is absolute, a small multiple of the
    # dtype's epsilon (worst of 150 seeds: 2.6e-4 in bf16, 3.5e-5 in fp16; 6x headroom here)
    eps = torch.finfo(dtype).eps
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item()) + 0.2 * eps


@pytest.mark.parametrize("T, T_target", [(25, 100), (100, 25)])
@pytest.mark.parametrize("backend", backend_params())
def test_repeatable_bitwise(seed, backend, T, T_target):
    h, z, ws = inputs_for(backend, 3, T, T_target, target_grad=True)
    runs = []
    for _ in range(2):
        loss = repa_alignment_loss(h, z, *ws, backend=backend)
        runs.append([loss] + list(torch.autograd.grad(loss, [h, z] + ws)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("where, bad", [("hidden", "nan"), ("hidden", "inf"), ("target", "nan"),
                                        ("weight", "nan")])
@pytest.mark.parametrize("backend", backend_params())
def test_non_finite_input_gives_nan_loss(seed, backend, where, bad):
    h, z, ws = inputs_for(backend, 3, 25, 100)
    with torch.no_grad():
        {"hidden": h, "target": z, "weight": ws[2]}[where].view(-1)[7] = float(bad)
    for recompute in (True, False):
        assert torch.isnan(repa_alignment_loss(h, z, *ws, backend=backend, recompute=recompute))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(z=torch.randn(2, 16, 40)), ValueError, r"target must have the batch size of hidden \(3\); got 2"),
    (lambda a: a.update(h=torch.randn(3, 16, 50)), ValueError, r"w1 must have shape \[80, 50\].*got \[80, 48\]"),
    (lambda a: a.update(z=torch.randn(3, 16, 41)), ValueError, r"w3 must have shape \[41, 80\].*got \[40, 80\]"),
    (lambda a: a.update(z=torch.randn(3, 36, 40)), ValueError, r"SiT grid \(4x4\) and the target grid \(6x6\).*\[1, 2, 4, 8, 12, 16\]"),
    (lambda a: a.update(z=torch.randn(3, 15, 40)), ValueError, r"target must be a square number of tokens.*got 15"),
    (lambda a: a.update(h=torch.randn(0, 16, 48), z=torch.randn(0, 16, 40)), ValueError, "empty batch"),
    (lambda a: a.update(z=torch.randn(3, 16, 40, device="meta")), ValueError, rf"target must be on the device of hidden {HERE}; got meta"),
    (lambda a: a.update(z=torch.ones(3, 16, 40, dtype=torch.long)), TypeError, "target must be a floating-point tensor"),
    (lambda a: a.update(h=torch.randint(0, 3, (3, 16, 48))), TypeError, r"hidden must be a floating-point tensor.*got dtype torch.int64"),
    (lambda a: a.update(prefix=16), ValueError, r"target_prefix_tokens must be in \[0, 16\)"),
])
@pytest.mark.parametrize("backend", ["auto"] + backend_params())
def test_bad_input(backend, change, error, match):
    device = "cpu" if backend == "auto" else backend_device(backend)
    h, z, ws = make_inputs(3, 16, 16, device=device)
    args = dict(h=h, z=z, prefix=0)
    change(args)
    h, z = (t.to(ws[0].device) if t.device.type == "cpu" else t for t in (args["h"], args["z"]))
    with pytest.raises(error, match=match):
        repa_alignment_loss(h, z, *ws, target_prefix_tokens=args["prefix"], backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_siloss_fused_path_matches_official_path(seed, backend):
    """SILoss's fused path (two encoders: mean over them) against the official projector path."""
    from repa_fast.transport import SILoss

    device = backend_device(backend)
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4,
                encoder_depth=1, num_classes=5, z_dims=[40, 24], projector_dim=80).to(device)
    images, y = torch.randn(3, 4, 8, 8, device=device), torch.tensor([0, 3, 1], device=device)
    zs = [torch.randn(3, 16, 40, device=device), torch.randn(3, 16, 24, device=device)]
    results = []
    for fused in (True, False):
        torch.manual_seed(seed)
        loss_fn = SILoss(fused=fused, align_kwargs=dict(backend=backend) if fused else None)
        loss, proj = loss_fn(model, images, dict(y=y), zs)
        total = loss.mean() + 0.5 * proj
        params = [p for p in model.parameters() if p.requires_grad]
        results.append([total] + list(torch.autograd.grad(total, params)))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    params = [p for p in model.parameters() if p.requires_grad]
    index = next(i for i, p in enumerate(params) if p is model.projectors[1][4].bias)
    assert results[0][1 + index].abs().sum() > 0  # reached by proj_loss only


@pytest.mark.parametrize("T, T_target, prefix, target_grad", [
    (49, 49, 0, True),   # 7x7 grids, 147 pooled rows
    (36, 9, 0, False),   # SiT grid finer: pooled 2x2 before the last GEMM
    (9, 37, 1, True),    # CLS skipped, target 6x6 pooled 2x2 onto 3x3
])
@pytest.mark.parametrize("backend", backend_params("triton", "native"))
def test_recompute_and_saved_backward_match_float64(seed, backend, T, T_target, prefix,
                                                    target_grad):
    """Both backward modes give the float64 gradient of every input, and agree with each other."""
    h, z, ws = inputs_for(backend, 3, T, T_target, D=40, P=72, Z=56, target_grad=target_grad)
    modes = {recompute: check_against_loop(backend, h, z, ws, prefix, target_grad, rtol=1e-5,
                                           recompute=recompute)
             for recompute in (True, False)}
    for name, a, b in zip(NAMES, modes[True], modes[False]):
        err = ((a - b).double().norm() / b.double().norm()).item()
        assert err <= 1e-6, f"d{name}: recompute and saved modes differ by {err:.2e}"


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_float16_db3_sums_unrounded_dp(seed, backend):
    """The projector's last bias gradient in float16, where the per-token gradients underflow.

    With |p| ~ 16000 (a large b3, so p's own rounding error stays small) and R = 1024 pooled
    rows, the per-token gradient dp (~1e-8) is below float16's smallest subnormal (6e-8).
    db3 = Σ_r dp_r must be summed from the unrounded values, as the float64 reference does,
    and rounded once to float16 at the end; summing dp after rounding it to float16 flushes
    everything to zero. Checked for the fused backends that run float16 here (Triton on its
    CPU interpreter without a GPU). The eager reference is plain autograd: its dp is float16,
    as in any eager float16 model, and needs loss scaling (torch.amp.GradScaler) in this
    regime, as the official fp16 training has.
    """
    problem = backend_problem(backend, DEVICE, torch.float16)
    if problem is not None:
        pytest.skip(f"{backend} cannot run float16 on {DEVICE}: {problem}")
    h, z, ws = make_inputs(64, 16, 16, D=16, P=32, Z=64)
    ws[5] = torch.randn(64) * 2000
    h, z = h.detach().to(DEVICE, torch.float16), z.detach().to(DEVICE, torch.float16)
    ws = [w.detach().to(DEVICE, torch.float16).requires_grad_() for w in ws]
    loss = repa_alignment_loss(h, z, *ws, backend=backend)
    db3 = torch.autograd.grad(loss, ws[5])[0]
    assert db3.dtype == torch.float16

    w1, b1, w2, b2, w3, b3 = (w.detach().cpu().double() for w in ws)
    p = F.linear(F.silu(F.linear(F.silu(F.linear(h.cpu().double(), w1, b1)), w2, b2)), w3, b3)
    p.requires_grad_()
    ref_loss = -F.cosine_similarity(p, z.cpu().double(), dim=-1, eps=0).mean()
    dp = torch.autograd.grad(ref_loss, p)[0].reshape(-1, p.shape[-1])
    assert 1e-9 < dp.abs().median() < 3e-8  # the regime this test is about
    ref = dp.sum(0).half().double()  # the gradient of a float16 b3 is float16
    err = ((db3.cpu().double() - ref).norm() / ref.norm()).item()
    assert err <= 2e-2, f"db3: relative error {err:.2e}"
    # the test can fail: the sum of dp rounded to float16 is far off
    rounded = dp.half().double().sum(0).half().double()
    assert (rounded - ref).norm() / ref.norm() > 0.5


# the registered ops of each fused backend: (forward, backward, target tokens, prefix, the
# forward's opcheck utils; None: all of them, the AOT dispatch tests included)
OPS = {"triton": ("alignment_loss_fwd", "alignment_loss_bwd", 64, 0,
                  ("test_schema", "test_faketensor", "test_autograd_registration")),
       "native": ("native_alignment_fwd", "native_alignment_bwd", 65, 1, None)}


@pytest.mark.parametrize("backend", backend_params("triton", "native"))
def test_registered_ops_pass_opcheck(seed, backend):
    """Schema, fake (meta) implementations and autograd registration agree with the kernels,
    for the forward and the backward op, with non-contiguous hidden states and target."""
    fwd_name, bwd_name, tokens, prefix, checks = OPS[backend]
    device = backend_device(backend)
    registered_ops(backend)
    h, z, ws = make_inputs(3, 16, tokens, target_grad=True, device=device)
    h = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # permuted strides
    z = z.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    fwd = getattr(torch.ops.repa_fast, fwd_name).default
    for save in (False, True):
        args = (h, z, *ws, 4, 8, prefix, save)
        torch.library.opcheck(fwd, args, **({} if checks is None else dict(test_utils=checks)))
        detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        loss, stats, *kept = fwd(*detached)
        for target_grad in (False, True):
            bwd_args = (torch.ones((), device=device), *detached[:8], stats, *kept, 4, 8, prefix,
                        target_grad)
            torch.library.opcheck(getattr(torch.ops.repa_fast, bwd_name).default, bwd_args,
                                  test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend, recompute", [
    pytest.param("triton", True, marks=needs_triton, id="triton"),
    pytest.param("native", True, marks=needs_native, id="native"),
    pytest.param("native", False, marks=needs_native, id="native-saved"),
])
def test_compiles_fullgraph_and_matches_eager(seed, backend, recompute):
    """torch.compile(fullgraph=True) traces the op through its fake kernels and autograd
    (AOTAutograd, no graph break); forward and backward equal eager."""
    device = backend_device(backend)
    proj = REPAProjector(48, 80, 40).to(device)
    h = torch.randn(3, 25, 48, device=device, requires_grad=True)
    z = torch.randn(3, 101, 40, device=device)

    def run(fn):
        loss = fn(h, z)
        return [loss] + list(torch.autograd.grad(loss, [h, *proj.parameters()]))

    def step(h, z):
        return proj.alignment_loss(h, z, backend=backend, target_prefix_tokens=1,
                                   recompute=recompute) * 2.0

    eager = run(step)
    torch._dynamo.reset()
    # Inductor's FX-graph cache key does not cover the custom ops' fake implementations: a graph
    # cached before they changed (e.g. the shape of a saved intermediate) would be reused
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = run(torch.compile(step, fullgraph=True))  # backward compiled by AOTAutograd
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2),
                                         (torch.float32, 1e-4)])
@pytest.mark.parametrize("T_target", [256, 1024])
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sit_b_width(seed, backend, T_target, dtype, rtol):
    """The CUDA kernels at the SiT-B/2 width (batch 4, 16x16 SiT grid; a 32x32 target grid
    pooled 2x2), both backward modes, against the float64 reference on the GPU."""
    problem = backend_problem(backend, "cuda", dtype)
    if problem is not None:
        pytest.skip(f"{backend}: {problem}")
    h, z, ws = make_inputs(4, 256, T_target, D=768, P=2048, Z=768, target_grad=True)
    h, z = h.detach().cuda().to(dtype).requires_grad_(), z.detach().cuda().requires_grad_()
    ws = [w.detach().cuda().to(dtype).requires_grad_() for w in ws]
    for recompute in (True, False):
        loss = repa_alignment_loss(h, z, *ws, backend=backend, recompute=recompute)
        grads = torch.autograd.grad(loss, [h, z] + ws)
        h64, z64 = h.detach().double().requires_grad_(), z.detach().double().requires_grad_()
        w64 = [w.detach().double().requires_grad_() for w in ws]
        ref = repa_alignment_loss(h64, z64, *w64, backend="reference")
        ref_grads = torch.autograd.grad(ref, [h64, z64] + w64)
        assert abs(loss.item() - ref.item()) <= rtol * (abs(ref.item()) + 1e-2)
        for name, g, rg in zip(["hidden", "target"] + NAMES[1:7], grads, ref_grads):
            err = ((g.double() - rg).norm() / rg.norm()).item()
            assert err <= rtol, f"{backend} recompute={recompute} d{name}: {err:.2e} > {rtol}"


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_at_sit_xl_width(seed, backend):
    """bf16 at the SiT-XL/2 width, batch 32: the recomputing backward adds at most half the
    peak memory of the eager reference."""
    problem = backend_problem(backend, "cuda", torch.bfloat16)
    if problem is not None:
        pytest.skip(f"{backend}: {problem}")
    proj = REPAProjector(1152, 2048, 768).cuda().bfloat16()
    h = torch.randn(32, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(32, 256, 768, device="cuda", dtype=torch.bfloat16)
    assert (cuda_peak_extra_bytes(proj, h, z, backend)
            <= 0.5 * cuda_peak_extra_bytes(proj, h, z, "reference"))


# ----------------------------------------------------------------------------- dispatch

def test_equal_grids_is_official_projection_loss(seed):
    proj = REPAProjector(48, 80, 40)
    h, z = torch.randn(3, 25, 48), torch.randn(3, 25, 40)
    assert torch.allclose(proj.alignment_loss(h, z), projection_loss([z], [proj(h)]), atol=1e-6)
    assert list(proj.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias",
                                       "4.weight", "4.bias"]


def test_sit_projectors_are_repa_projectors(seed):
    model = SiT(input_size=8, hidden_size=32, depth=2, num_heads=2, encoder_depth=1,
                num_classes=5, z_dims=[8], projector_dim=16)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    _, hidden = model.forward_with_hidden(x, t, y)
    _, zs = model(x, t, y)
    z = torch.randn(2, 16, 8)
    fused = model.projectors[0].alignment_loss(hidden, z)
    assert torch.allclose(fused, projection_loss([z], zs), atol=1e-6)


def test_explicit_grids_and_backend_choice(monkeypatch):
    h, z, ws = make_inputs(2, 16, 16)
    with pytest.raises(ValueError, match=r"hidden_grid=5 needs 25 tokens; got 16"):
        repa_alignment_loss(h, z, *ws, hidden_grid=5)
    assert torch.isfinite(repa_alignment_loss(h, z, *ws, backend="reference"))
    with pytest.raises(ValueError, match=r"backend must be one of auto, triton, native, reference; got .cuda."):
        repa_alignment_loss(h, z, *ws, backend="cuda")
    monkeypatch.setenv("REPA_FAST_OPS_BACKEND", "tritonn")
    with pytest.raises(ValueError, match=r"REPA_FAST_OPS_BACKEND must be one of"):
        repa_alignment_loss(h, z, *ws)


def test_backend_problem_names_the_backends():
    assert backend_problem("reference") is None
    assert backend_problem("reference", "meta", torch.float64) is None
    assert dict(describe_backends()) == {name: backend_problem(name) for name in BACKENDS}
    with pytest.raises(ValueError, match=r"unknown alignment-op backend 'cuda'; the backends "
                                         r"are triton, native, reference"):
        backend_problem("cuda")


@needs_triton
def test_triton_backend_choice(monkeypatch):
    assert auto_backend(torch.device("cpu"), torch.float32) == "reference"
    assert auto_backend(torch.device("cpu"), torch.float16) == "reference"
    reasons = dict(describe_backends())
    assert reasons["reference"] is None
    monkeypatch.setenv("REPA_FAST_OPS_BACKEND", "triton")
    h, z, ws = make_inputs(3, 16, 16, device=DEVICE)
    forced = repa_alignment_loss(h, z, *ws)
    assert torch.allclose(forced, repa_alignment_loss(h, z, *ws, backend="reference"), atol=1e-6)


def test_traces_without_graph_breaks():
    proj = REPAProjector(48, 80, 40)
    explanation = torch._dynamo.explain(proj.alignment_loss)(torch.randn(3, 25, 48),
                                                             torch.randn(3, 100, 40))
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ----------------------------------------------------------------------------- triton

@needs_triton
@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(h=a["h"].double(), ws=[w.double() for w in a["ws"]]), r"backend 'triton'.*float64"),
    (lambda a: a.update(h=a["h"].bfloat16(), ws=[w.bfloat16() for w in a["ws"]]), r"interpreter computes bfloat16 wrongly"),
])
def test_triton_refuses_float64_and_interpreted_bfloat16(change, match):
    if torch.cuda.is_available() and "bfloat16" in match:
        pytest.skip("bf16 runs on the GPU")
    h, z, ws = make_inputs(3, 16, 16, device=DEVICE)
    args = dict(h=h, z=z, ws=ws)
    change(args)
    with pytest.raises(ValueError, match=match):
        repa_alignment_loss(args["h"], args["z"], *args["ws"], backend="triton")


def test_triton_too_large_for_32_bit_offsets_is_refused(alignment_triton):
    h = torch.zeros(1, 1, 48, device=DEVICE).expand(1, 8192 ** 2, 48)  # 3.2e9, none allocated
    z = torch.zeros(1, 1, 40, device=DEVICE).expand(1, 8192 ** 2, 40)
    _, _, ws = make_inputs(1, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="32-bit offsets.*split the batch"):
        repa_alignment_loss(h, z, *ws, backend="triton")


def test_triton_tf32_setting_read_through_either_torch_api(alignment_triton):
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flag")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert alignment_triton._tf32_allowed()
        matmul.fp32_precision = "ieee"
        assert not alignment_triton._tf32_allowed()
    finally:
        matmul.fp32_precision = before


def test_triton_autotuning_leaves_no_stale_partial_sums(seed, monkeypatch, alignment_triton):
    """On a GPU the autotuner runs every config into the same partial-sum buffers; a winner
    with larger blocks writes fewer slots. Simulate it with two configs per kernel (the
    larger one winning) and check the very first call, the one that autotunes."""
    import triton
    from repa_fast.kernels import alignment_cosine, alignment_linear_silu

    def config(bm, bn):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 4})

    for kernel in (alignment_cosine.project_cosine_fwd_kernel,
                   alignment_cosine.project_cosine_bwd_kernel,
                   alignment_linear_silu.linear_grad_silu_kernel,
                   alignment_linear_silu.linear_bias_silu_kernel):
        runs = []

        def bench(kernel_call, quantiles=None, runs=runs, **kwargs):
            kernel_call()
            runs.append(1)
            return [10.0 - len(runs)] * 3  # each config looks faster than the one before

        monkeypatch.setattr(kernel, "configs", [config(32, 32), config(64, 64)])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench)
    h, z, ws = make_inputs(3, 100, 100, Z=100, target_grad=True, device=DEVICE)
    check_against_loop("triton", h, z, ws, 0, True, rtol=1e-5)


def float64_stats(h, z, ws, prefix):
    """(loss, cos, max(|p|, ε), max(|z|, ε)) per pooled row, in float64."""
    h, z = h.detach().cpu().double(), z.detach().cpu().double()[:, prefix:]
    hg, tg = int(h.shape[1] ** 0.5), int(z.shape[1] ** 0.5)
    kh, kt = pool_ratio(hg, tg)
    p = avg_pool_tokens(project(h, *(w.detach().cpu().double() for w in ws)), hg, kh)
    z = avg_pool_tokens(z, tg, kt)
    p, z = p.reshape(-1, p.shape[-1]), z.reshape(-1, z.shape[-1])
    norm_p, norm_z = p.norm(dim=1).clamp_min(1e-12), z.norm(dim=1).clamp_min(1e-12)
    cos = (p * z).sum(1) / (norm_p * norm_z)
    return -cos.mean(), cos, norm_p, norm_z


class LaunchRecorder:
    """Stands in for a @triton.jit kernel: records each launch grid, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("T, T_target, prefix, block", [
    (49, 49, 0, 16),    # R = 147 rows: 10 programs, the last one 3 rows
    (16, 65, 1, 8),     # CLS skipped, target pooled 2x2: R = 48 rows, 6 full programs
    (256, 257, 1, 512),  # DINOv2 layout: R = 3 x 256 = 768 rows, the second program half empty
])
def test_triton_finish_kernel_runs_a_grid_of_row_blocks(seed, monkeypatch, alignment_triton, T,
                                                        T_target, prefix, block):
    """``cosine_finish_kernel`` runs one program per block of pooled rows: loss and per-row
    stats against float64 on row counts spanning several blocks with a ragged last block."""
    h, z, ws = make_inputs(3, T, T_target, device=DEVICE)
    finish = LaunchRecorder(alignment_triton.cosine_finish_kernel)
    monkeypatch.setattr(alignment_triton, "cosine_finish_kernel", finish)
    monkeypatch.setattr(alignment_triton, "FINISH_BLOCK", block)
    grid, grid_t = int(T ** 0.5), int((T_target - prefix) ** 0.5)
    loss, stats, *_ = torch.ops.repa_fast.alignment_loss_fwd(
        h.detach(), z.detach(), *[w.detach() for w in ws], grid, grid_t, prefix, False)
    ref_loss, cos, norm_p, norm_z = float64_stats(h, z, ws, prefix)
    rows = cos.numel()
    assert finish.grids == [(-(-rows // block),)] and finish.grids[0][0] > 1
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    # cos, the norms scaled by 2^-k (overflow-free), k_p, k_z
    assert stats.shape == (5, rows) and stats.dtype == torch.float32
    stats = stats.cpu().double()
    torch.testing.assert_close(stats[0], cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats[1] * 2 ** stats[3], norm_p, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats[2] * 2 ** stats[4], norm_z, rtol=1e-5, atol=0)


def test_triton_finish_kernel_sum_is_repeatable_and_nan_propagates(seed, monkeypatch,
                                                                   alignment_triton):
    """The two-level sum has a fixed order (bitwise repeatable); a NaN row makes the loss NaN
    whichever block holds it."""
    monkeypatch.setattr(alignment_triton, "FINISH_BLOCK", 16)
    h, z, ws = make_inputs(3, 49, 49, device=DEVICE)
    args = (h.detach(), z.detach(), *[w.detach() for w in ws], 7, 7, 0, False)
    first = torch.ops.repa_fast.alignment_loss_fwd(*args)[0]
    assert torch.equal(first, torch.ops.repa_fast.alignment_loss_fwd(*args)[0])
    with torch.no_grad():
        args[1][2, 48, 5] = float("nan")  # the last row, in the ragged last block
    assert torch.isnan(torch.ops.repa_fast.alignment_loss_fwd(*args)[0])


def test_triton_recompute_backward_holds_at_most_three_projector_buffers(seed, monkeypatch,
                                                                         alignment_triton):
    """The buffer schedule of alignment_triton's docstring: counting the saved pre2, at most
    three [M, P] buffers' worth is alive after any launch of the recompute backward."""
    B, T, P = 3, 25, 72
    h, z, ws = make_inputs(B, T, T, D=40, P=P, Z=56, device=DEVICE)
    made, alive = [], []

    def tracked(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            for t in (out if isinstance(out, tuple) else (out,)):
                if t.dim() == 2 and t.shape[1] == P:
                    made.append(weakref.ref(t))
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for ref in made if (t := ref()) is not None}
            alive.append(1 + sum(storages.values()) / (B * T * P * 4))  # 1: the saved pre2
            return out
        return wrapper

    loss = repa_alignment_loss(h, z, *ws, backend="triton", recompute=True)
    for name in ("linear_bias_silu", "linear_grad_silu"):
        monkeypatch.setattr(alignment_triton, name, tracked(getattr(alignment_triton, name)))
    monkeypatch.setattr(F, "silu", tracked(F.silu))
    torch.autograd.grad(loss, [h] + ws)
    assert len(alive) == 1 + 1 + 2 * alignment_triton.RECOMPUTE_CHUNKS  # silu, dpre2, halves
    half = -(-B * T // 2) / (B * T)  # the first of two row halves of an odd M
    assert max(alive) <= 2 + 2 * half + 1e-9, alive
    assert max(alive) > 2.9  # pre2, dpre2 and a half's pre1 and s1 (or pre1 and dpre1)


def _gemm_2d(name):
    def flops(a, b, *rest, **kwargs):
        if a.dim() != 2 or b.dim() != 2:
            raise AssertionError(f"{name} on {a.dim()}-d x {b.dim()}-d: count it in this test")
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return flops


def _addmm_flops(bias, a, b, *rest, **kwargs):
    return _gemm_2d("addmm")(a, b)


def _linear_flops(x, w, *rest, **kwargs):
    return 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]


def _unexpected(name):
    def flops(*args, **kwargs):
        raise AssertionError(f"the backward called {name}: count its FLOPs in this test")
    return flops


# the Triton backend's host launchers of GEMM kernels: FLOPs = 2·M·N·K of the GEMM each launches
LAUNCHERS = {
    "linear_bias_silu": lambda x, w, b, **kw: 2 * x.shape[0] * w.shape[0] * x.shape[1],
    "linear_grad_silu": lambda g, w, pre, geo: 2 * pre.shape[0] * pre.shape[1] * g.shape[1],
    "project_cosine_forward": lambda s2, w3, b3, t, geo: 2 * geo.rows * w3.shape[0] * w3.shape[1],
    "project_cosine_backward": lambda grad, s2, w3, *rest: (
        2 * rest[-2].rows * w3.shape[0] * w3.shape[1]),
}
# every torch entry point of a GEMM (the weight gradients and dh go to cuBLAS)
TORCH_GEMMS = [
    (torch.Tensor, "mm", _gemm_2d("Tensor.mm")), (torch, "mm", _gemm_2d("torch.mm")),
    (torch.Tensor, "matmul", _gemm_2d("Tensor.matmul")),
    (torch.Tensor, "__matmul__", _gemm_2d("@")), (torch, "matmul", _gemm_2d("torch.matmul")),
    (torch, "addmm", _addmm_flops), (torch.Tensor, "addmm", _addmm_flops),
    (torch.Tensor, "addmm_", _addmm_flops),
    (F, "linear", _linear_flops), (torch, "bmm", _unexpected("torch.bmm")),
    (torch.Tensor, "bmm", _unexpected("Tensor.bmm")), (torch, "einsum", _unexpected("einsum")),
    (torch, "baddbmm", _unexpected("baddbmm")), (torch, "tensordot", _unexpected("tensordot")),
]


def backward_gemm_flops(monkeypatch, alignment_triton, h, z, ws, recompute):
    """``(backward GEMM FLOPs, per-launcher FLOPs of the forward, backward log)`` of one loss."""
    log = []

    def counted(fn, flops, name):
        def wrapper(*args, **kwargs):
            log.append((name, flops(*args, **kwargs)))
            return fn(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        for name, flops in LAUNCHERS.items():
            patch.setattr(alignment_triton, name,
                          counted(getattr(alignment_triton, name), flops, name))
        for owner, name, flops in TORCH_GEMMS:
            patch.setattr(owner, name, counted(getattr(owner, name), flops, name))
        loss = repa_alignment_loss(h, z, *ws, backend="triton", recompute=recompute)
        forward = list(log)
        log.clear()
        torch.autograd.grad(loss, [h, z] + ws)
    return sum(f for _, f in log), forward, log


def test_triton_recompute_backward_runs_each_gemm_once(seed, monkeypatch, alignment_triton):
    """SiT-XL proportions scaled down 16x (D = 1152, P = 2048, Z = 768 -> 72, 128, 48): the
    recompute backward's GEMM FLOPs are at most 1.2x those of the saved-intermediates backward
    (only GEMM1 is recomputed); recomputing GEMM1 twice and GEMM2 once, as it did before, would
    be 1.50x."""
    B, T, D, P, Z = 3, 25, 72, 128, 48
    h, z, ws = make_inputs(B, T, T, D=D, P=P, Z=Z, target_grad=True, device=DEVICE)
    saved, forward, saved_log = backward_gemm_flops(monkeypatch, alignment_triton, h, z, ws,
                                                    recompute=False)
    recomputed, _, log = backward_gemm_flops(monkeypatch, alignment_triton, h, z, ws,
                                             recompute=True)
    M = B * T
    gemm1, gemm2 = 2 * M * P * D, 2 * M * P * P
    assert [name for name, _ in forward] == ["linear_bias_silu", "linear_bias_silu",
                                             "project_cosine_forward"]
    assert [f for _, f in forward[:2]] == [gemm1, gemm2]
    assert not any(name == "linear_bias_silu" for name, _ in saved_log)
    # the saved-intermediates backward: p recomputed in the cosine backward, dW3, dpre2, dW2,
    # dpre1, dW1, dh
    gemm3 = 2 * M * P * Z
    assert saved == 3 * gemm3 + 2 * gemm2 + 2 * gemm1, saved_log
    # recompute: GEMM1 once more, nothing else
    assert recomputed == saved + gemm1, log
    assert recomputed <= 1.2 * saved, (recomputed / saved, log)
    # for the record: the ratios of the other schemes at these (and XL) proportions
    full_recompute = (saved + gemm1 + gemm2) / saved      # GEMM1 and GEMM2 once each: 1.37
    double_gemm1 = (saved + 2 * gemm1 + gemm2) / saved   # the earlier backward: 1.50
    assert full_recompute > 1.2 and double_gemm1 > 1.2
    assert abs(recomputed / saved - 1.13) < 0.01 and abs(double_gemm1 - 1.50) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_triton_compile_fullgraph(seed):
    """bf16 at the SiT-XL/2 width: compiles without graph breaks and matches eager (its
    memory: test_gpu_memory_at_sit_xl_width)."""
    proj = REPAProjector(1152, 2048, 768).cuda().bfloat16()
    h = torch.randn(32, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(32, 256, 768, device="cuda", dtype=torch.bfloat16)
    step = torch.compile(lambda h, z: proj.alignment_loss(h, z, backend="triton"), fullgraph=True)
    eager = proj.alignment_loss(h, z, backend="triton")
    assert torch.allclose(step(h, z), eager, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- native

@needs_native
@pytest.mark.parametrize("gemm", ["auto", "aten"])
@pytest.mark.parametrize("T, T_target, prefix", LAYOUTS)
def test_native_float32_both_cpu_gemm_paths(seed, monkeypatch, T, T_target, prefix, gemm):
    """Both CPU GEMM paths: oneDNN with fused bias + SiLU (auto) and at::mm (aten)."""
    monkeypatch.setenv("REPA_FAST_NATIVE_CPU_GEMM", gemm)
    h, z, ws = inputs_for("native", 3, T, T_target, target_grad=True)
    for recompute in (True, False):
        check_against_loop("native", h, z, ws, prefix, True, rtol=1e-5, recompute=recompute)


@needs_native
def test_native_cpu_gemm_setting_is_checked(monkeypatch):
    h, z, ws = make_inputs(3, 16, 16)
    monkeypatch.setenv("REPA_FAST_NATIVE_CPU_GEMM", "mkl")
    with pytest.raises(RuntimeError, match="REPA_FAST_NATIVE_CPU_GEMM must be auto, onednn or "
                                           "aten; got 'mkl'"):
        repa_alignment_loss(h, z, *ws, backend="native")
    monkeypatch.setenv("REPA_FAST_NATIVE_CPU_GEMM", "onednn")
    with pytest.raises(RuntimeError, match="REPA_FAST_NATIVE_CPU_GEMM=onednn but"):
        repa_alignment_loss(h.double(), z, *[w.double() for w in ws], backend="native")


@needs_native
def test_native_bad_input_to_the_registered_ops():
    """The C++ checks (TORCH_CHECK_VALUE/TYPE: Python's ValueError/TypeError, as the Python
    checks raise) name the argument, the expected and the given."""
    registered_ops("native")
    h, z, ws = make_inputs(3, 16, 16)
    h, z, ws = h.detach(), z.detach(), [w.detach() for w in ws]
    fwd = torch.ops.repa_fast.native_alignment_fwd
    with pytest.raises(TypeError, match=r"w2 must have the dtype of hidden \(Float\).*got Double"):
        fwd(h, z, ws[0], ws[1], ws[2].double(), *ws[3:], 4, 4, 0, False)
    with pytest.raises(TypeError, match=r"target must be float32, float64, float16 or bfloat16; got Long"):
        fwd(h, z.long(), *ws, 4, 4, 0, False)
    with pytest.raises(ValueError, match=r"hidden_grid=5 needs 25 tokens.*got 16"):
        fwd(h, z, *ws, 5, 4, 0, False)
    with pytest.raises(ValueError, match=r"hidden_grid must be a positive int; got -4"):
        fwd(h, z, *ws, -4, 4, 0, False)
    with pytest.raises(ValueError, match=r"hidden_grid must be a positive int; got 0"):
        fwd(h[:, :0], z, *ws, 0, 4, 0, False)
    with pytest.raises(ValueError, match=r"target_grid=3 needs 9 tokens.*got 15"):
        fwd(h, z, *ws, 4, 3, 1, False)
    with pytest.raises(ValueError, match=r"hidden_grid=4000000000 needs over 2\^63 tokens.*got 16"):
        fwd(h, z, *ws, 4_000_000_000, 4, 0, False)
    with pytest.raises(ValueError, match=r"SiT grid \(4x4\) and the target grid \(3x3\)"):
        fwd(h, z[:, :9], *ws, 4, 3, 0, False)
    with pytest.raises(ValueError, match=r"b3 must have shape \[40\].*got \[41\]"):
        fwd(h, z, *ws[:5], torch.zeros(41), 4, 4, 0, False)
    loss, stats, *kept = fwd(h, z, *ws, 4, 4, 0, False)
    assert stats.dtype == torch.float64  # the norms of float32 rows may exceed float32's range
    bwd = torch.ops.repa_fast.native_alignment_bwd
    with pytest.raises(ValueError, match=r"stats must be the \[3, 48\] Double tensor.*got \[3, 47\]"):
        bwd(torch.ones(()), h, z, *ws, stats[:, :47], *kept, 4, 4, 0, False)
    with pytest.raises(ValueError, match=r"stats must be the \[3, 48\] Double tensor.*Float"):
        bwd(torch.ones(()), h, z, *ws, stats.float(), *kept, 4, 4, 0, False)
    with pytest.raises(ValueError, match=r"grad_loss must be a one-element tensor.*\[2\]"):
        bwd(torch.ones(2), h, z, *ws, stats, *kept, 4, 4, 0, False)
    with pytest.raises(ValueError, match=r"pre1, pre2 and proj must be given together"):
        bwd(torch.ones(()), h, z, *ws, stats, torch.ones(48, 80), *kept[1:], 4, 4, 0, False)


def test_native_forced_but_not_built_says_how_to_build(monkeypatch):
    """Simulated: repa_fast._C missing from this installation (as a pure-Python install)."""
    monkeypatch.delattr(repa_fast, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "repa_fast._C", None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(native_extension, "_NATIVE_IMPORT", {})
    monkeypatch.setattr(native_extension, "native_build_record", lambda: None)
    problem = native_extension.native_import_problem()
    assert "repa_fast._C is not built" in problem and "REPA_FAST_BUILD_EXT=1 pip install" in problem
    assert dict(describe_backends())["native"] == problem
    assert backend_problem("native", "cpu", torch.float32) == problem
    assert auto_backend(torch.device("cpu"), torch.float32) == "reference"
    h, z, ws = make_inputs(3, 16, 16)
    with pytest.raises(ValueError, match=r"backend 'native' was forced but cannot run this call "
                                         r"\(cpu, torch.float32\): the extension repa_fast._C "
                                         r"is not built.*REPA_FAST_BUILD_EXT=1"):
        repa_alignment_loss(h, z, *ws, backend="native")
    monkeypatch.setenv("REPA_FAST_OPS_BACKEND", "native")
    with pytest.raises(ValueError, match="repa_fast._C is not built"):
        repa_alignment_loss(h, z, *ws)
    # a build skipped or failed at install time says so
    monkeypatch.setattr(native_extension, "_NATIVE_IMPORT", {})
    monkeypatch.setattr(native_extension, "native_build_record", lambda: types.SimpleNamespace(
        BUILT=False, REASON="REPA_FAST_BUILD_EXT=0"))
    assert "was not built (REPA_FAST_BUILD_EXT=0)" in native_extension.native_import_problem()


@needs_native
def test_native_other_reasons_it_cannot_run(monkeypatch):
    from repa_fast import _C
    assert backend_problem("native", torch.device("meta"), torch.float32).startswith(
        "the native kernels run on CPU and CUDA tensors")
    assert "float8_e4m3fn" in backend_problem("native", torch.device("cpu"), torch.float8_e4m3fn)
    if not _C.WITH_CUDA:
        assert "built without its CUDA kernels" in backend_problem("native", torch.device("cuda"))
    monkeypatch.setattr(_C, "TORCH_VERSION", "2.0.0", raising=False)
    monkeypatch.setattr(native_extension, "_NATIVE_IMPORT", {})
    assert "built for torch 2.0.0 but this is torch" in native_extension.native_import_problem()


@needs_native
@pytest.mark.parametrize("first", ["native", "triton"])
def test_native_and_triton_op_libraries_load_in_one_process(first):
    """The C++ TORCH_LIBRARY(repa_fast) and the Triton backend's Python custom ops (FRAGMENTs
    of the same namespace) register together, in either order, and both run."""
    imports = ["import repa_fast.ops.alignment_native", "import repa_fast.ops.alignment_triton"]
    if first == "triton":
        imports.reverse()
    code = "\n".join(["import os", "os.environ.setdefault('TRITON_INTERPRET', '1')", *imports,
                      "import torch",
                      "from repa_fast.ops import repa_alignment_loss",
                      "h = torch.randn(2, 16, 48); z = torch.randn(2, 16, 40)",
                      "ws = [torch.randn(80, 48) / 7, torch.zeros(80), torch.randn(80, 80) / 9,"
                      " torch.zeros(80), torch.randn(40, 80) / 9, torch.zeros(40)]",
                      "a = repa_alignment_loss(h, z, *ws, backend='native')",
                      "b = repa_alignment_loss(h, z, *ws, backend='triton')",
                      "assert torch.allclose(a, b, atol=1e-5), (a, b)",
                      "print(sorted(n for n in dir(torch.ops.repa_fast) if 'alignment' in n))"])
    # run beside the package this test imports (installed or checkout), not the working directory's
    here = os.path.dirname(os.path.dirname(os.path.abspath(repa_fast.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here)
    assert out.returncode == 0, out.stderr
    assert "'alignment_loss_fwd'" in out.stdout and "'native_alignment_fwd'" in out.stdout


@needs_native
def test_native_info_reports_the_build():
    from repa_fast import _C
    from repa_fast.info import report
    text = report()
    assert "native     available" in text
    assert f"native extension: built for torch {_C.TORCH_VERSION}" in text


@pytest.mark.gpu
@needs_native_cuda
def test_gpu_native_agrees_with_triton(seed):
    """bf16 at the SiT-XL/2 width, batch 32: the native loss agrees with the Triton kernels."""
    proj = REPAProjector(1152, 2048, 768).cuda().bfloat16()
    h = torch.randn(32, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(32, 256, 768, device="cuda", dtype=torch.bfloat16)
    native = proj.alignment_loss(h, z, backend="native")
    if backend_problem("triton", h.device, torch.bfloat16) is None:
        triton = proj.alignment_loss(h, z, backend="triton")
        assert torch.allclose(native, triton, rtol=1e-2, atol=1e-3)
