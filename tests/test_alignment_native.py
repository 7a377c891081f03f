"""The native C++/CUDA backend (``repa_fast._C``) against the float64 loop: loss and every
gradient, in float64 (tight), float32, bfloat16 and float16, on odd shapes (B=3, D=48, P=80,
Z=40) and every token layout: equal grids, either side pooled, CLS and register prefixes, the
257-token DINOv2 layout. Also: NaN inputs, clear errors, the message when the extension is
forced but not built, opcheck of the registered ops, torch.compile without graph breaks, and
both op backends (Triton's Python custom ops, the C++ TORCH_LIBRARY) in one process.

Tests that need the extension skip, saying why, when it is not built (``python setup.py
build_ext --inplace`` or ``pip install --no-build-isolation .`` builds it); CI builds it.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

import repa_fast
from repa_fast.models.projector import REPAProjector
from repa_fast.ops import describe_backends, repa_alignment_loss
from repa_fast.ops import backends
from repa_fast.ops.backends import auto_backend, native_import_problem

from alignment_cases import cuda_peak_extra_bytes, loop_loss, make_inputs

PROBLEM = native_import_problem()
needs_native = pytest.mark.skipif(PROBLEM is not None,
                                  reason=f"native extension not usable: {PROBLEM}")
if PROBLEM is None:
    from repa_fast.ops import alignment_native  # noqa: F401  (fake kernels, autograd)

# The numerical tests run on the GPU when there is one and the extension has CUDA kernels.
CUDA_PROBLEM = (PROBLEM or backends._native_problem(torch.device("cuda"))
                if torch.cuda.is_available() else "no CUDA device")
DEVICE = "cuda" if CUDA_PROBLEM is None else "cpu"
needs_native_cuda = pytest.mark.skipif(CUDA_PROBLEM is not None,
                                       reason=f"native CUDA kernels not usable: {CUDA_PROBLEM}")
NAMES = ["hidden", "w1", "b1", "w2", "b2", "w3", "b3", "target"]

LAYOUTS = [
    pytest.param(25, 25, 0, id="equal-5x5"),
    pytest.param(25, 100, 0, id="target-10x10-pooled-to-5x5"),
    pytest.param(100, 25, 0, id="sit-10x10-pooled-to-5x5"),
    pytest.param(16, 145, 1, id="cls-12x12-pooled-3x3"),
    pytest.param(16, 20, 4, id="4-registers"),
]


def to_device(h, z, ws, dtype=None, target_grad=False):
    def move(t):
        t = t.detach().to(DEVICE)
        return t.to(dtype) if dtype is not None else t

    return (move(h).requires_grad_(), move(z).requires_grad_(target_grad),
            [move(w).requires_grad_() for w in ws])


def check_against_loop(h, z, ws, prefix, target_grad, rtol, **kwargs):
    """Native loss and gradients vs the float64 loop; errors relative to the reference's size."""
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=prefix, backend="native", **kwargs)
    expected_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.dim() == 0
    inputs = [h] + ws + ([z] if target_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    z64 = leaves[7] if target_grad else z.detach().cpu().double()
    ref = loop_loss(leaves[0], z64, *leaves[1:7], prefix=prefix)
    ref_grads = torch.autograd.grad(ref, leaves)
    # the mean cosine of random data is near 0: compare against the size of its terms too
    assert abs(loss.item() - ref.item()) <= rtol * (abs(ref.item()) + 1e-2), (loss, ref)
    for name, g, rg, t in zip(NAMES, grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        err = (g.detach().cpu().double() - rg).norm() / rg.norm()
        assert err <= rtol, f"d{name}: relative error {err:.2e} > {rtol}"
    return loss, grads


@needs_native
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("target_grad", [False, True])
@pytest.mark.parametrize("T, T_target, prefix", LAYOUTS)
def test_float64_tight(seed, T, T_target, prefix, target_grad, recompute):
    """float64 in, float64 all the way (loss, stats, accumulation): agreement to 1e-10."""
    h, z, ws = to_device(*make_inputs(3, T, T_target), dtype=torch.float64,
                         target_grad=target_grad)
    check_against_loop(h, z, ws, prefix, target_grad, rtol=1e-10, recompute=recompute)


@needs_native
@pytest.mark.parametrize("gemm", ["auto", "aten"])
@pytest.mark.parametrize("T, T_target, prefix", LAYOUTS)
def test_float32(seed, monkeypatch, T, T_target, prefix, gemm):
    """Both CPU GEMM paths: oneDNN with fused bias + SiLU (auto) and at::mm (aten)."""
    monkeypatch.setenv("REPA_FAST_NATIVE_CPU_GEMM", gemm)
    h, z, ws = to_device(*make_inputs(3, T, T_target), target_grad=True)
    for recompute in (True, False):
        check_against_loop(h, z, ws, prefix, True, rtol=1e-5, recompute=recompute)


@needs_native
def test_cpu_gemm_setting_is_checked(monkeypatch):
    h, z, ws = make_inputs(3, 16, 16)
    monkeypatch.setenv("REPA_FAST_NATIVE_CPU_GEMM", "mkl")
    with pytest.raises(RuntimeError, match="REPA_FAST_NATIVE_CPU_GEMM must be auto, onednn or "
                                           "aten; got 'mkl'"):
        repa_alignment_loss(h, z, *ws, backend="native")
    monkeypatch.setenv("REPA_FAST_NATIVE_CPU_GEMM", "onednn")
    with pytest.raises(RuntimeError, match="REPA_FAST_NATIVE_CPU_GEMM=onednn but"):
        repa_alignment_loss(h.double(), z, *[w.double() for w in ws], backend="native")


@needs_native
def test_dinov2_layout_257_tokens(seed):
    """DINOv2 at 224px: CLS + 16x16 patch tokens, onto a 16x16 SiT grid; batch 3."""
    h, z, ws = to_device(*make_inputs(3, 256, 257), dtype=torch.float64, target_grad=True)
    check_against_loop(h, z, ws, 1, True, rtol=1e-10)
    h, z, ws = to_device(h, z, ws, dtype=torch.float32, target_grad=True)
    check_against_loop(h, z, ws, 1, True, rtol=1e-5, recompute=False)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, T_target", [(25, 25), (100, 25), (25, 100)])
def test_half_precision(seed, dtype, T, T_target):
    """bf16/fp16 GEMMs (rounded intermediates), fp32 epilogues and cosine: within 1e-2."""
    h, z, ws = to_device(*make_inputs(3, T, T_target), dtype=dtype, target_grad=True)
    check_against_loop(h, z, ws, 0, True, rtol=2e-2 if dtype == torch.bfloat16 else 1e-2)


@needs_native
def test_mixed_dtypes_and_autocast(seed):
    """A float32 target with bf16 hidden states keeps its dtype (and its gradient's); under
    autocast the GEMMs run in bf16 and float32 weights get float32 gradients."""
    h, z, ws = to_device(*make_inputs(3, 25, 100), target_grad=True)
    loss = repa_alignment_loss(h.detach().bfloat16().requires_grad_(), z,
                               *[w.detach().bfloat16() for w in ws], backend="native")
    (dz,) = torch.autograd.grad(loss, [z])
    assert dz.dtype == torch.float32
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = repa_alignment_loss(h, z, *ws, backend="native")
    grads = torch.autograd.grad(loss, [h] + ws)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    ref = loop_loss(h.detach(), z.detach(), *[w.detach() for w in ws])
    assert abs(loss.item() - ref.item()) <= 2e-2 * (abs(ref.item()) + 1e-2)


@needs_native
def test_repeatable_bitwise(seed):
    h, z, ws = to_device(*make_inputs(3, 100, 25), target_grad=True)
    runs = []
    for _ in range(2):
        loss = repa_alignment_loss(h, z, *ws, backend="native")
        runs.append([loss] + list(torch.autograd.grad(loss, [h, z] + ws)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_native
@pytest.mark.parametrize("where, bad", [("hidden", "nan"), ("hidden", "inf"), ("target", "nan"),
                                        ("weight", "nan")])
def test_non_finite_input_gives_nan_loss(seed, where, bad):
    h, z, ws = to_device(*make_inputs(3, 25, 100))
    with torch.no_grad():
        {"hidden": h, "target": z, "weight": ws[2]}[where].view(-1)[7] = float(bad)
    for recompute in (True, False):
        assert torch.isnan(repa_alignment_loss(h, z, *ws, backend="native", recompute=recompute))


@needs_native
@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(z=torch.randn(2, 16, 40)), ValueError, r"target must have the batch size of hidden \(3\); got 2"),
    (lambda a: a.update(h=torch.randn(3, 16, 50)), ValueError, r"w1 must have shape \[80, 50\].*got \[80, 48\]"),
    (lambda a: a.update(z=torch.randn(3, 16, 41)), ValueError, r"w3 must have shape \[41, 80\].*got \[40, 80\]"),
    (lambda a: a.update(z=torch.randn(3, 36, 40)), ValueError, r"SiT grid \(4x4\) and the target grid \(6x6\)"),
    (lambda a: a.update(h=torch.randn(0, 16, 48), z=torch.randn(0, 16, 40)), ValueError, "empty batch"),
    (lambda a: a.update(z=torch.randn(3, 16, 40, device="meta")), ValueError, r"target must be on the device of hidden"),
    (lambda a: a.update(h=torch.randint(0, 3, (3, 16, 48))), TypeError, r"hidden must be a floating-point tensor.*got dtype torch.int64"),
    (lambda a: a.update(prefix=16), ValueError, r"target_prefix_tokens must be in \[0, 16\)"),
])
def test_bad_input(change, error, match):
    h, z, ws = make_inputs(3, 16, 16)
    args = dict(h=h, z=z, prefix=0)
    change(args)
    with pytest.raises(error, match=match):
        repa_alignment_loss(args["h"], args["z"], *ws, target_prefix_tokens=args["prefix"],
                            backend="native")


@needs_native
def test_bad_input_to_the_registered_ops():
    """The C++ checks (TORCH_CHECK_VALUE/TYPE: Python's ValueError/TypeError, as the Python
    checks raise) name the argument, the expected and the given."""
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


def test_forced_but_not_built_says_how_to_build(monkeypatch):
    """Simulated: repa_fast._C missing from this installation (as a pure-Python install)."""
    monkeypatch.delattr(repa_fast, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "repa_fast._C", None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(backends, "_NATIVE_IMPORT", {})
    monkeypatch.setattr(backends, "native_build_record", lambda: None)
    problem = backends.native_import_problem()
    assert "repa_fast._C is not built" in problem and "REPA_FAST_BUILD_EXT=1 pip install" in problem
    assert dict(describe_backends())["native"] == problem
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
    monkeypatch.setattr(backends, "_NATIVE_IMPORT", {})
    monkeypatch.setattr(backends, "native_build_record", lambda: types.SimpleNamespace(
        BUILT=False, REASON="REPA_FAST_BUILD_EXT=0"))
    assert "was not built (REPA_FAST_BUILD_EXT=0)" in backends.native_import_problem()


@needs_native
def test_other_reasons_it_cannot_run(monkeypatch):
    from repa_fast import _C
    assert backends._native_problem(torch.device("meta"), torch.float32).startswith(
        "the native kernels run on CPU and CUDA tensors")
    assert "float8_e4m3fn" in backends._native_problem(torch.device("cpu"), torch.float8_e4m3fn)
    if not _C.WITH_CUDA:
        assert "built without its CUDA kernels" in backends._native_problem(torch.device("cuda"))
    monkeypatch.setattr(_C, "TORCH_VERSION", "2.0.0", raising=False)
    monkeypatch.setattr(backends, "_NATIVE_IMPORT", {})
    assert "built for torch 2.0.0 but this is torch" in backends.native_import_problem()


@needs_native
def test_registered_ops_pass_opcheck(seed):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch agree with the C++
    kernels, forward and backward, with non-contiguous hidden states and target."""
    h, z, ws = make_inputs(3, 16, 65, target_grad=True)
    h = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    z = z.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    fwd = torch.ops.repa_fast.native_alignment_fwd.default
    for save in (False, True):
        args = (h, z, *ws, 4, 8, 1, save)
        torch.library.opcheck(fwd, args)
        detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        loss, stats, *kept = fwd(*detached)
        for target_grad in (False, True):
            bwd_args = (torch.ones(()), *detached[:8], stats, *kept, 4, 8, 1, target_grad)
            torch.library.opcheck(torch.ops.repa_fast.native_alignment_bwd.default, bwd_args,
                                  test_utils=("test_schema", "test_faketensor"))


@needs_native
@pytest.mark.parametrize("recompute", [True, False])
def test_compiles_fullgraph_and_matches_eager(seed, recompute):
    """torch.compile(fullgraph=True) traces the op through its fake kernels and autograd
    (AOTAutograd, no graph break); forward and backward equal eager."""
    proj = REPAProjector(48, 80, 40)
    h, z = torch.randn(3, 25, 48, requires_grad=True), torch.randn(3, 101, 40)

    def run(fn):
        loss = fn(h, z)
        return [loss] + list(torch.autograd.grad(loss, [h, *proj.parameters()]))

    def step(h, z):
        return proj.alignment_loss(h, z, backend="native", target_prefix_tokens=1,
                                   recompute=recompute) * 2.0

    eager = run(step)
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True))
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@needs_native
@pytest.mark.parametrize("first", ["native", "triton"])
def test_both_op_libraries_load_in_one_process(first):
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
def test_info_reports_the_build():
    from repa_fast import _C
    from repa_fast.info import report
    text = report()
    assert "native     available" in text
    assert f"native extension: built for torch {_C.TORCH_VERSION}" in text


@pytest.mark.gpu
@needs_native_cuda
@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2),
                                         (torch.float32, 1e-4)])
@pytest.mark.parametrize("T_target", [256, 1024])
def test_gpu_sit_b_width(seed, dtype, rtol, T_target):
    """The CUDA kernels at the SiT-B/2 width (batch 4, 16x16 SiT grid; a 32x32 target grid
    pooled 2x2), against the float64 reference on the GPU."""
    h, z, ws = make_inputs(4, 256, T_target, D=768, P=2048, Z=768, target_grad=True)
    h, z = h.detach().cuda().to(dtype).requires_grad_(), z.detach().cuda().requires_grad_()
    ws = [w.detach().cuda().to(dtype).requires_grad_() for w in ws]
    for recompute in (True, False):
        loss = repa_alignment_loss(h, z, *ws, backend="native", recompute=recompute)
        grads = torch.autograd.grad(loss, [h, z] + ws)
        h64, z64 = h.detach().double().requires_grad_(), z.detach().double().requires_grad_()
        w64 = [w.detach().double().requires_grad_() for w in ws]
        ref = repa_alignment_loss(h64, z64, *w64, backend="reference")
        ref_grads = torch.autograd.grad(ref, [h64, z64] + w64)
        assert abs(loss.item() - ref.item()) <= rtol * (abs(ref.item()) + 1e-2)
        for name, g, rg in zip(["hidden", "target"] + NAMES[1:7], grads, ref_grads):
            err = ((g.double() - rg).norm() / rg.norm()).item()
            assert err <= rtol, f"d{name}: relative error {err:.2e} > {rtol}"


@pytest.mark.gpu
@needs_native_cuda
def test_gpu_memory_and_agreement_with_triton(seed):
    """bf16 at the SiT-XL/2 width, batch 32: the recomputing backward adds at most half the
    peak memory of the eager reference, and the loss agrees with the Triton kernels."""
    proj = REPAProjector(1152, 2048, 768).cuda().bfloat16()
    h = torch.randn(32, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(32, 256, 768, device="cuda", dtype=torch.bfloat16)

    assert (cuda_peak_extra_bytes(proj, h, z, "native")
            <= 0.5 * cuda_peak_extra_bytes(proj, h, z, "reference"))
    native = proj.alignment_loss(h, z, backend="native")
    if backends._triton_problem(h.device, torch.bfloat16) is None:
        triton = proj.alignment_loss(h, z, backend="triton")
        assert torch.allclose(native, triton, rtol=1e-2, atol=1e-3)
