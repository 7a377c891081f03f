"""The Triton alignment op's finish kernel (a grid of row blocks) and its two backward modes.

* ``cosine_finish_kernel`` runs one program per block of pooled rows: loss and per-row stats
  against float64 on row counts spanning several blocks with a ragged last block;
* ``recompute=True`` (forward keeps pre2) and ``recompute=False`` (forward keeps pre1, s1, pre2,
  s2) give the float64 gradients of every input;
* the recompute backward runs each GEMM once: its GEMM FLOPs are at most 1.2x those of the
  ``recompute=False`` backward (only GEMM1 is recomputed).

Kernels run on Triton's CPU interpreter without a GPU (conftest.py); shapes are small and not
multiples of the interpreter's 32-wide tiles.
"""
import pytest
import torch
import torch.nn.functional as F

from repa_fast.ops import repa_alignment_loss
from repa_fast.ops import alignment_triton
from repa_fast.ops.alignment_reference import avg_pool_tokens, pool_ratio, project

from alignment_cases import loop_loss, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-12


def to_device(h, z, ws, target_grad):
    h = h.detach().to(DEVICE).requires_grad_()
    z = z.detach().to(DEVICE).requires_grad_(target_grad)
    return h, z, [w.detach().to(DEVICE).requires_grad_() for w in ws]


def float64_stats(h, z, ws, prefix):
    """(loss, cos, max(|p|, ε), max(|z|, ε)) per pooled row, in float64."""
    h, z = h.detach().cpu().double(), z.detach().cpu().double()[:, prefix:]
    hg, tg = int(h.shape[1] ** 0.5), int(z.shape[1] ** 0.5)
    kh, kt = pool_ratio(hg, tg)
    p = avg_pool_tokens(project(h, *(w.detach().cpu().double() for w in ws)), hg, kh)
    z = avg_pool_tokens(z, tg, kt)
    p, z = p.reshape(-1, p.shape[-1]), z.reshape(-1, z.shape[-1])
    norm_p, norm_z = p.norm(dim=1).clamp_min(EPS), z.norm(dim=1).clamp_min(EPS)
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
def test_finish_kernel_runs_a_grid_of_row_blocks(seed, monkeypatch, T, T_target, prefix, block):
    h, z, ws = make_inputs(3, T, T_target)
    h, z, ws = to_device(h, z, ws, False)
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


def test_finish_kernel_sum_is_repeatable_and_nan_propagates(seed, monkeypatch):
    """The two-level sum has a fixed order (bitwise repeatable); a NaN row makes the loss NaN
    whichever block holds it."""
    monkeypatch.setattr(alignment_triton, "FINISH_BLOCK", 16)
    h, z, ws = to_device(*make_inputs(3, 49, 49), False)
    args = (h.detach(), z.detach(), *[w.detach() for w in ws], 7, 7, 0, False)
    first = torch.ops.repa_fast.alignment_loss_fwd(*args)[0]
    assert torch.equal(first, torch.ops.repa_fast.alignment_loss_fwd(*args)[0])
    with torch.no_grad():
        args[1][2, 48, 5] = float("nan")  # the last row, in the ragged last block
    assert torch.isnan(torch.ops.repa_fast.alignment_loss_fwd(*args)[0])


@pytest.mark.parametrize("T, T_target, prefix, target_grad", [
    (49, 49, 0, True),   # 7x7 grids, 147 pooled rows
    (36, 9, 0, False),   # SiT grid finer: pooled 2x2 before the last GEMM
    (9, 37, 1, True),    # CLS skipped, target 6x6 pooled 2x2 onto 3x3
])
def test_recompute_and_saved_backward_match_float64(seed, T, T_target, prefix, target_grad):
    """Both backward modes give the float64 gradient of every input, and agree with each other."""
    h, z, ws = make_inputs(3, T, T_target, D=40, P=72, Z=56, target_grad=target_grad)
    h, z, ws = to_device(h, z, ws, target_grad)
    inputs = [h] + ws + ([z] if target_grad else [])
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    z64 = leaves[7] if target_grad else z.detach().cpu().double()
    ref = loop_loss(leaves[0], z64, *leaves[1:7], prefix=prefix)
    ref_grads = torch.autograd.grad(ref, leaves)
    names = ["hidden", "w1", "b1", "w2", "b2", "w3", "b3", "target"]
    modes = {}
    for recompute in (True, False):
        loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=prefix, backend="triton",
                                   recompute=recompute)
        assert abs(loss.item() - ref.item()) <= 1e-5 * (abs(ref.item()) + 1e-2)
        grads = torch.autograd.grad(loss, inputs)
        for name, g, rg in zip(names, grads, ref_grads):
            err = ((g.detach().cpu().double() - rg).norm() / rg.norm()).item()
            assert err <= 1e-5, f"recompute={recompute} d{name}: relative error {err:.2e}"
        modes[recompute] = grads
    for name, a, b in zip(names, modes[True], modes[False]):
        err = ((a - b).double().norm() / b.double().norm()).item()
        assert err <= 1e-6, f"d{name}: recompute and saved modes differ by {err:.2e}"


def test_recompute_backward_holds_at_most_three_projector_buffers(seed, monkeypatch):
    """The buffer schedule of the module docstring: counting the saved pre2, at most three
    [M, P] buffers' worth is alive after any launch of the recompute backward."""
    import weakref

    B, T, P = 3, 25, 72
    h, z, ws = make_inputs(B, T, T, D=40, P=P, Z=56)
    h, z, ws = to_device(h, z, ws, False)
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


# ----------------------------------------------------------------------------- GEMM FLOPs

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


# the op's host launchers of GEMM kernels: FLOPs = 2·M·N·K of the GEMM each one launches
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


def backward_gemm_flops(monkeypatch, h, z, ws, recompute):
    """``(backward GEMM FLOPs, per-launcher FLOPs of the forward)`` of one loss."""
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


def test_recompute_backward_runs_each_gemm_once(seed, monkeypatch):
    """SiT-XL proportions scaled down 16x (D = 1152, P = 2048, Z = 768 -> 72, 128, 48): the
    recompute backward's GEMM FLOPs are at most 1.2x those of the saved-intermediates backward;
    recomputing GEMM1 twice and GEMM2 once, as it did before, would be 1.50x."""
    B, T, D, P, Z = 3, 25, 72, 128, 48
    h, z, ws = make_inputs(B, T, T, D=D, P=P, Z=Z, target_grad=True)
    h, z, ws = to_device(h, z, ws, True)
    saved, forward, saved_log = backward_gemm_flops(monkeypatch, h, z, ws, recompute=False)
    recomputed, _, log = backward_gemm_flops(monkeypatch, h, z, ws, recompute=True)
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
