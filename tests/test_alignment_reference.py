"""The alignment op's reference backend against an explicit float64 loop, and its errors."""
import pytest
import torch

from repa_fast.models import SiT
from repa_fast.models.projector import REPAProjector
from repa_fast.ops import repa_alignment_loss
from repa_fast.transport import projection_loss

from alignment_cases import loop_loss, make_inputs


@pytest.mark.parametrize("T, T_target, prefix", [
    (25, 25, 0),     # equal grids: the official proj_loss
    (25, 100, 0),    # encoder grid finer: the target is pooled 2x2
    (100, 25, 0),    # SiT grid finer: the projected tokens are pooled 2x2
    (16, 145, 1),    # CLS token skipped, 12x12 target pooled 3x3 onto 4x4
    (16, 20, 4),     # registers skipped
])
@pytest.mark.parametrize("target_grad", [False, True])
def test_loss_and_every_gradient_against_float64_loop(seed, T, T_target, prefix, target_grad):
    h, z, ws = make_inputs(3, T, T_target, target_grad=target_grad)
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=prefix)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    inputs = [h] + ws + ([z] if target_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    h64, w64 = leaves[0], leaves[1:7]
    z64 = leaves[7] if target_grad else z.detach().double()
    ref = loop_loss(h64, z64, *w64, prefix=prefix)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7
    for g, rg in zip(grads, ref_grads):
        assert (g.double() - rg).norm() <= 1e-5 * rg.norm() + 1e-9
    assert z.grad is None  # grad w.r.t. target only through autograd.grad, when asked


def test_float16_inputs(seed):
    h, z, ws = make_inputs(3, 25, 100, dtype=torch.float16)
    loss = repa_alignment_loss(h, z, *ws)
    ref = loop_loss(h.detach(), z, *[w.detach() for w in ws])
    # a mean of cosines of random data is near 0: the tolerance also scales with its terms
    # (max error over 200 seeds: 2.6e-5)
    assert abs(loss.item() - ref.item()) <= 1e-2 * (abs(ref.item()) + 1e-2)


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


def test_nan_input_gives_nan_loss(seed):
    h, z, ws = make_inputs(2, 16, 16)
    with torch.no_grad():
        h[0, 3, 5] = float("nan")
    assert torch.isnan(repa_alignment_loss(h, z, *ws))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(z=torch.randn(2, 16, 40)), ValueError, r"target must have the batch size of hidden \(3\); got 2"),
    (lambda a: a.update(h=torch.randn(3, 16, 50)), ValueError, r"w1 must have shape \[80, 50\].*got \[80, 48\]"),
    (lambda a: a.update(z=torch.randn(3, 16, 41)), ValueError, r"w3 must have shape \[41, 80\].*got \[40, 80\]"),
    (lambda a: a.update(z=torch.randn(3, 36, 40)), ValueError, r"SiT grid \(4x4\) and the target grid \(6x6\).*\[1, 2, 4, 8, 12, 16\]"),
    (lambda a: a.update(z=torch.randn(3, 15, 40)), ValueError, r"target must be a square number of tokens.*got 15"),
    (lambda a: a.update(h=torch.randn(0, 16, 48), z=torch.randn(0, 16, 40)), ValueError, "empty batch"),
    (lambda a: a.update(z=torch.randn(3, 16, 40, device="meta")), ValueError, r"target must be on the device of hidden \(cpu\); got meta"),
    (lambda a: a.update(z=torch.ones(3, 16, 40, dtype=torch.long)), TypeError, "target must be a floating-point tensor"),
    (lambda a: a.update(prefix=16), ValueError, r"target_prefix_tokens must be in \[0, 16\)"),
])
def test_bad_input(change, error, match):
    h, z, ws = make_inputs(3, 16, 16)
    args = dict(h=h, z=z, prefix=0)
    change(args)
    with pytest.raises(error, match=match):
        repa_alignment_loss(args["h"], args["z"], *ws, target_prefix_tokens=args["prefix"])


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


def test_traces_without_graph_breaks():
    proj = REPAProjector(48, 80, 40)
    explanation = torch._dynamo.explain(proj.alignment_loss)(torch.randn(3, 25, 48),
                                                             torch.randn(3, 100, 40))
    assert explanation.graph_break_count == 0, explanation.break_reasons
