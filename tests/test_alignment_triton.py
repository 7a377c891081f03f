"""The fused Triton alignment op against the float64 loop: loss and every gradient.

Without a GPU the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set in
conftest.py), which handles fp32 and fp16 but not bf16; bf16 and speed are checked on a GPU
(``-m gpu`` tests below and ``benchmarks/``). Shapes are small and deliberately not multiples
of any block size (the interpreter tile is 32): B=3, D=48, P=80, Z=40.
"""
import pytest
import torch

from repa_fast.models.projector import REPAProjector
from repa_fast.ops import describe_backends, repa_alignment_loss
from repa_fast.ops import alignment_triton  # noqa: F401  (registers the repa_fast:: ops)
from repa_fast.ops.backends import auto_backend

from alignment_cases import DEVICE, cuda_peak_extra_bytes, loop_loss
from alignment_cases import make_inputs as _make_inputs


def make_inputs(*args, **kwargs):
    """The shared inputs on DEVICE: the GPU where there is one (Triton has no CPU backend),
    else the CPU for Triton's interpreter."""
    return _make_inputs(*args, device=DEVICE, **kwargs)


def check_against_loop(h, z, ws, prefix, target_grad, rtol, **kwargs):
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=prefix, backend="triton", **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    inputs = [h] + ws + ([z] if target_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    z64 = leaves[7] if target_grad else z.detach().cpu().double()
    ref = loop_loss(leaves[0], z64, *leaves[1:7], prefix=prefix)
    ref_grads = torch.autograd.grad(ref, leaves)
    # the mean cosine of random data is near 0: compare against the size of its terms too
    assert abs(loss.item() - ref.item()) <= rtol * (abs(ref.item()) + 1e-2), (loss, ref)
    names = ["hidden", "w1", "b1", "w2", "b2", "w3", "b3", "target"]
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == dict(zip(names, inputs))[name].dtype
        err = (g.detach().cpu().double() - rg).norm() / rg.norm()
        assert err <= rtol, f"d{name}: relative error {err:.2e} > {rtol}"


@pytest.mark.parametrize("T, T_target, prefix", [
    (25, 25, 0),     # equal 5x5 grids: the official proj_loss
    (25, 100, 0),    # encoder grid finer: target pooled 2x2
    (100, 25, 0),    # SiT grid finer: pooled before the last GEMM
    (16, 145, 1),    # CLS skipped, 12x12 target pooled 3x3 onto 4x4
    (16, 20, 4),     # four registers skipped
])
@pytest.mark.parametrize("target_grad", [False, True])
def test_fp32_loss_and_every_gradient(seed, T, T_target, prefix, target_grad):
    h, z, ws = make_inputs(3, T, T_target, target_grad=target_grad)
    to = dict(device=DEVICE)
    h, z = h.detach().to(**to).requires_grad_(), z.detach().to(**to).requires_grad_(target_grad)
    ws = [w.detach().to(**to).requires_grad_() for w in ws]
    check_against_loop(h, z, ws, prefix, target_grad, rtol=1e-5)


def test_dinov2_layout_257_tokens(seed):
    """DINOv2 at 224px: CLS + 16x16 patch tokens, onto a 16x16 SiT grid; batch 3."""
    h, z, ws = make_inputs(3, 256, 257, target_grad=True)
    check_against_loop(h, z, ws, 1, True, rtol=1e-5)


@pytest.mark.parametrize("T, T_target", [(25, 100), (100, 25)])
def test_saved_intermediates_mode(seed, T, T_target):
    """recompute=False keeps pre-activations and activations: same numbers."""
    h, z, ws = make_inputs(3, T, T_target, target_grad=True)
    check_against_loop(h, z, ws, 0, True, rtol=1e-5, recompute=False)


@pytest.mark.parametrize("T, T_target", [(25, 25), (100, 25), (25, 100)])
def test_fp16(seed, T, T_target):
    h, z, ws = make_inputs(3, T, T_target, dtype=torch.float16, target_grad=True)
    check_against_loop(h, z, ws, 0, True, rtol=1e-2)


def test_autocast_runs_gemms_in_autocast_dtype(seed):
    """fp32 weights under autocast: fp16 GEMMs, fp32 weight gradients, like autocast's F.linear."""
    h, z, ws = make_inputs(3, 25, 25)
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = repa_alignment_loss(h, z, *ws, backend="triton")
    grads = torch.autograd.grad(loss, [h] + ws)
    assert all(g.dtype == torch.float32 for g in grads)
    ref = loop_loss(h.detach(), z, *[w.detach() for w in ws])
    assert abs(loss.item() - ref.item()) <= 2e-2 * (abs(ref.item()) + 1e-2)


def test_repeatable_bitwise(seed):
    h, z, ws = make_inputs(3, 25, 100)
    runs = []
    for _ in range(2):
        loss = repa_alignment_loss(h, z, *ws, backend="triton")
        runs.append([loss] + list(torch.autograd.grad(loss, [h] + ws)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_input_gives_nan_loss(seed, bad):
    h, z, ws = make_inputs(3, 25, 25)
    with torch.no_grad():
        h[1, 7, 3] = float(bad)
    assert torch.isnan(repa_alignment_loss(h, z, *ws, backend="triton"))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(z=torch.randn(2, 16, 40)), ValueError, r"target must have the batch size of hidden \(3\); got 2"),
    (lambda a: a.update(h=torch.randn(3, 16, 50)), ValueError, r"w1 must have shape \[80, 50\].*got \[80, 48\]"),
    (lambda a: a.update(z=torch.randn(3, 16, 41)), ValueError, r"w3 must have shape \[41, 80\].*got \[40, 80\]"),
    (lambda a: a.update(z=torch.randn(3, 36, 40)), ValueError, r"SiT grid \(4x4\) and the target grid \(6x6\)"),
    (lambda a: a.update(h=torch.randn(0, 16, 48), z=torch.randn(0, 16, 40)), ValueError, "empty batch"),
    (lambda a: a.update(z=torch.randn(3, 16, 40, device="meta")), ValueError, r"target must be on the device of hidden"),
    (lambda a: a.update(h=a["h"].double(), ws=[w.double() for w in a["ws"]]), ValueError, r"backend 'triton'.*float64"),
    (lambda a: a.update(h=a["h"].bfloat16(), ws=[w.bfloat16() for w in a["ws"]]), ValueError, r"interpreter computes bfloat16 wrongly"),
])
def test_bad_input(change, error, match):
    if torch.cuda.is_available() and "bfloat16" in match:
        pytest.skip("bf16 runs on the GPU")
    h, z, ws = make_inputs(3, 16, 16)
    args = dict(h=h, z=z, ws=ws)
    change(args)
    h, z = (t.to(DEVICE) if t.device.type == "cpu" else t for t in (args["h"], args["z"]))
    with pytest.raises(error, match=match):
        repa_alignment_loss(h, z, *args["ws"], backend="triton")


def test_backend_choice(monkeypatch):
    assert auto_backend(torch.device("cpu"), torch.float32) == "reference"
    assert auto_backend(torch.device("cpu"), torch.float16) == "reference"
    reasons = dict(describe_backends())
    assert reasons["reference"] is None
    monkeypatch.setenv("REPA_FAST_OPS_BACKEND", "triton")
    h, z, ws = make_inputs(3, 16, 16)
    forced = repa_alignment_loss(h, z, *ws)
    assert torch.allclose(forced, repa_alignment_loss(h, z, *ws, backend="reference"), atol=1e-6)


def test_custom_ops_pass_opcheck(seed):
    """Schema, fake (meta) implementations and autograd registration agree with the kernels,
    for the forward and the backward op, with a non-contiguous hidden and target."""
    h, z, ws = make_inputs(3, 16, 64, target_grad=True)
    h = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # permuted strides
    z = z.detach()[:, :, :].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    fwd = torch.ops.repa_fast.alignment_loss_fwd.default
    for save in (False, True):
        args = (h, z, *ws, 4, 8, 0, save)
        torch.library.opcheck(fwd, args, test_utils=checks)
        loss, stats, *inter = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                    for a in args])
        for target_grad in (False, True):
            bwd_args = (torch.ones((), device=DEVICE), h.detach(), z.detach(),
                        *[w.detach() for w in ws],
                        stats, *inter, 4, 8, 0, target_grad)
            torch.library.opcheck(torch.ops.repa_fast.alignment_loss_bwd.default, bwd_args,
                                  test_utils=("test_schema", "test_faketensor"))


def test_autotuning_leaves_no_stale_partial_sums(seed, monkeypatch):
    """On a GPU the autotuner runs every config into the same partial-sum buffers; a winner
    with larger blocks writes fewer slots. Simulate it with two configs per kernel (the
    larger one winning) and check the very first call, the one that autotunes."""
    import triton
    from repa_fast.kernels import cosine, linear_silu

    def config(bm, bn):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 4})

    for kernel in (cosine.project_cosine_fwd_kernel, cosine.project_cosine_bwd_kernel,
                   linear_silu.linear_grad_silu_kernel, linear_silu.linear_bias_silu_kernel):
        runs = []

        def bench(kernel_call, quantiles=None, runs=runs, **kwargs):
            kernel_call()
            runs.append(1)
            return [10.0 - len(runs)] * 3  # each config looks faster than the one before

        monkeypatch.setattr(kernel, "configs", [config(32, 32), config(64, 64)])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench)
    h, z, ws = make_inputs(3, 100, 100, Z=100, target_grad=True)
    check_against_loop(h, z, ws, 0, True, rtol=1e-5)


def test_compiles_fullgraph_and_matches_eager(seed, monkeypatch):
    # Inductor's FX-graph cache key does not cover the custom ops' fake implementations: a graph
    # cached before they changed (e.g. the shape of a saved intermediate) would be reused
    monkeypatch.setattr("torch._inductor.config.fx_graph_cache", False)
    proj = REPAProjector(48, 80, 40).to(DEVICE)
    h = torch.randn(3, 25, 48, device=DEVICE, requires_grad=True)
    z = torch.randn(3, 100, 40, device=DEVICE)

    def run(fn):
        loss = fn(h, z)
        return [loss] + list(torch.autograd.grad(loss, [h, *proj.parameters()]))

    def step(h, z):
        return proj.alignment_loss(h, z, backend="triton") * 2.0

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))  # backward compiled by AOTAutograd
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_gpu_half_precision_at_sit_b_width(seed, dtype, rtol):
    h, z, ws = make_inputs(4, 256, 1024, D=768, P=2048, Z=768, target_grad=True)
    h, z = h.detach().cuda().to(dtype).requires_grad_(), z.detach().cuda().requires_grad_()
    ws = [w.detach().cuda().to(dtype).requires_grad_() for w in ws]
    loss = repa_alignment_loss(h, z, *ws, backend="triton")
    grads = torch.autograd.grad(loss, [h, z] + ws)
    h64, z64 = h.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in ws]
    ref = repa_alignment_loss(h64, z64, *w64, backend="reference")
    ref_grads = torch.autograd.grad(ref, [h64, z64] + w64)
    assert abs(loss.item() - ref.item()) <= rtol * (abs(ref.item()) + 1e-2)
    for g, rg in zip(grads, ref_grads):
        assert (g.double() - rg).norm() <= rtol * rg.norm()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_siloss_fused_path_matches_official_path(seed, backend):
    """SILoss's fused path (two encoders: mean over them) against the official projector path."""
    from repa_fast.models import SiT
    from repa_fast.transport import SILoss

    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4,
                encoder_depth=1, num_classes=5, z_dims=[40, 24], projector_dim=80).to(DEVICE)
    images, y = torch.randn(3, 4, 8, 8, device=DEVICE), torch.tensor([0, 3, 1], device=DEVICE)
    zs = [torch.randn(3, 16, 40, device=DEVICE), torch.randn(3, 16, 24, device=DEVICE)]
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compile_fullgraph_and_memory(seed):
    """bf16 at the SiT-XL/2 width: compiles without graph breaks, matches eager, and the
    recompute mode adds at most half the peak memory of the eager reference."""
    proj = REPAProjector(1152, 2048, 768).cuda().bfloat16()
    h = torch.randn(32, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(32, 256, 768, device="cuda", dtype=torch.bfloat16)

    assert (cuda_peak_extra_bytes(proj, h, z, "triton")
            <= 0.5 * cuda_peak_extra_bytes(proj, h, z, "reference"))
    step = torch.compile(lambda h, z: proj.alignment_loss(h, z, backend="triton"), fullgraph=True)
    eager = proj.alignment_loss(h, z, backend="triton")
    assert torch.allclose(step(h, z), eager, rtol=1e-3, atol=1e-4)


def test_too_large_for_32_bit_offsets_is_refused():
    h = torch.zeros(1, 1, 48, device=DEVICE).expand(1, 8192 ** 2, 48)  # 3.2e9, none allocated
    z = torch.zeros(1, 1, 40, device=DEVICE).expand(1, 8192 ** 2, 40)
    _, _, ws = make_inputs(1, 4, 4)
    with pytest.raises(ValueError, match="32-bit offsets.*split the batch"):
        repa_alignment_loss(h, z, *ws, backend="triton")


def test_tf32_setting_read_through_either_torch_api():
    from repa_fast.ops.alignment_triton import _tf32_allowed

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flag")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert _tf32_allowed()
        matmul.fp32_precision = "ieee"
        assert not _tf32_allowed()
    finally:
        matmul.fp32_precision = before
