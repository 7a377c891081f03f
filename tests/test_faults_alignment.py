"""The alignment op's backends agree on bad arguments and on extreme (but finite) values.

* Every bad argument raises the same ``ValueError``/``TypeError`` (naming the argument, what
  was expected and what was given) in every backend, through ``repa_alignment_loss`` and through
  the backend's own public function, and never returns a number.
* The dtype rule: the six weights share one dtype; the hidden states have it too unless
  autocast is on for their device (then every GEMM runs in the autocast dtype, as ``F.linear``
  under autocast), except that float64 is never cast (autocast leaves it alone); the target may
  have any floating dtype.
* Finite float32 values whose squares overflow (|x| ≳ 1.8e19) give the float64 loss and
  gradients in every backend, and so do float64 values near 1e200 where the backend takes
  float64; all-zero rows give what ``F.normalize`` (ε = 1e-12) gives.

Backends: the reference, Triton (on the GPU, else on Triton's CPU interpreter) and the native
extension when it is built. Shapes are small and odd (B = 3, D = 48, P = 80, Z = 40).
"""
import pytest
import torch

from repa_fast import ops
from repa_fast.models.projector import REPAProjector
from repa_fast.ops import backend_problem, repa_alignment_loss
from repa_fast.ops.alignment_common import check_call

from alignment_cases import (HERE, NAMES, backend_device, backend_params, check_grads, leaves_of,
                             loop_loss, make_inputs)

BACKENDS = backend_params()


def direct(name):
    """The backend's own public function."""
    return getattr(ops, f"repa_alignment_loss_{name}")


def base_args(device):
    h, z, ws = make_inputs(3, 16, 16, device=device)
    return dict(hidden=h, target=z, w=ws, hidden_grid=None, target_grid=None,
                target_prefix_tokens=0, recompute=True)


def calls(backend, a):
    """The calls that must all raise: dispatch and the backend's public function (the
    reference's takes no ``recompute``; a bad one is checked through dispatch)."""
    grids = dict(hidden_grid=a["hidden_grid"], target_grid=a["target_grid"],
                 target_prefix_tokens=a["target_prefix_tokens"])
    args = (a["hidden"], a["target"], *a["w"])
    yield lambda: repa_alignment_loss(*args, **grids, recompute=a["recompute"], backend=backend)
    if backend != "reference":
        yield lambda: direct(backend)(*args, **grids, recompute=a["recompute"])
    elif a["recompute"] is True:
        yield lambda: direct(backend)(*args, **grids)


def _set(**changes):
    def change(a):
        a.update(changes)
    return change


def _weights(**changes):
    """Replace weights by name: a function of the old one."""
    def change(a):
        index = {n: i for i, n in enumerate(NAMES[1:7])}
        for name, fn in changes.items():
            a["w"][index[name]] = fn(a["w"][index[name]])
    return change


def _tensor(name, fn):
    def change(a):
        a[name] = fn(a[name])
    return change


CASES = [
    # grids
    ("hidden_grid=-4", _set(hidden_grid=-4), ValueError, r"hidden_grid must be a positive int; got -4"),
    ("hidden_grid=0", _set(hidden_grid=0), ValueError, r"hidden_grid must be a positive int; got 0"),
    ("hidden_grid=4.0", _set(hidden_grid=4.0), TypeError, r"hidden_grid must be an int or None; got 4\.0 \(float\)"),
    ("hidden_grid=True", _set(hidden_grid=True), TypeError, r"hidden_grid must be an int or None; got True \(bool\)"),
    ("hidden_grid='4'", _set(hidden_grid="4"), TypeError, r"hidden_grid must be an int or None; got '4' \(str\)"),
    ("target_grid=-4", _set(target_grid=-4), ValueError, r"target_grid must be a positive int; got -4"),
    ("target_grid=2.0", _set(target_grid=2.0), TypeError, r"target_grid must be an int or None; got 2\.0 \(float\)"),
    ("target_grid=False", _set(target_grid=False), TypeError, r"target_grid must be an int or None; got False \(bool\)"),
    ("hidden_grid=5 for 16 tokens", _set(hidden_grid=5), ValueError, r"hidden_grid=5 needs 25 tokens; got 16"),
    ("target_grid=3 for 16 tokens", _set(target_grid=3), ValueError, r"target_grid=3 needs 9 tokens; got 16"),
    ("hidden not square", _tensor("hidden", lambda h: h[:, :15]), ValueError, r"hidden must be a square number of tokens.*got 15"),
    ("grids not multiples", _tensor("target", lambda z: torch.cat([z, z, z[:, :4]], 1)), ValueError, r"SiT grid \(4x4\) and the target grid \(6x6\)"),
    # empty dimensions
    ("zero hidden tokens", _tensor("hidden", lambda h: h[:, :0]), ValueError, r"hidden must hold at least one token; got shape \[3, 0, 48\]"),
    ("zero target tokens", _tensor("target", lambda z: z[:, :0]), ValueError, r"target must hold at least one token; got shape \[3, 0, 40\]"),
    ("zero batch", lambda a: a.update(hidden=a["hidden"][:0], target=a["target"][:0]), ValueError, r"hidden must hold at least one sample; got an empty batch"),
    ("batch mismatch", _tensor("target", lambda z: z[:2]), ValueError, r"target must have the batch size of hidden \(3\); got 2"),
    ("zero hidden features", lambda a: (a.update(hidden=a["hidden"][..., :0]), _weights(w1=lambda w: w[:, :0])(a)), ValueError, r"hidden must have at least one feature \(D ≥ 1\); got shape \[3, 16, 0\]"),
    ("zero target features", lambda a: (a.update(target=a["target"][..., :0]), _weights(w3=lambda w: w[:0], b3=lambda b: b[:0])(a)), ValueError, r"target must have at least one feature \(Z ≥ 1\); got shape \[3, 16, 0\]"),
    ("zero projector dim", _weights(w1=lambda w: w[:0], b1=lambda b: b[:0], w2=lambda w: w[:0, :0], b2=lambda b: b[:0], w3=lambda w: w[:, :0]), ValueError, r"w1 must have at least one row \(projector dim P ≥ 1\); got shape \[0, 48\]"),
    # target prefix tokens
    ("prefix=16 of 16", _set(target_prefix_tokens=16), ValueError, r"target_prefix_tokens must be in \[0, 16\) \(target has 16 tokens\); got 16"),
    ("prefix=-1", _set(target_prefix_tokens=-1), ValueError, r"target_prefix_tokens must be in \[0, 16\).*got -1"),
    ("prefix=1.0", _set(target_prefix_tokens=1.0), TypeError, r"target_prefix_tokens must be an int; got 1\.0 \(float\)"),
    ("prefix=True", _set(target_prefix_tokens=True), TypeError, r"target_prefix_tokens must be an int; got True \(bool\)"),
    ("prefix=None", _set(target_prefix_tokens=None), TypeError, r"target_prefix_tokens must be an int; got None \(NoneType\)"),
    # dtypes
    ("w2 float64", _weights(w2=lambda w: w.double()), TypeError, r"w2 must have the dtype of w1 \(torch.float32\): the projector's weights share one dtype; got torch.float64"),
    ("b3 float16", _weights(b3=lambda b: b.half()), TypeError, r"b3 must have the dtype of w1 \(torch.float32\).*got torch.float16"),
    ("float64 weights, float32 hidden", _weights(**{n: (lambda w: w.double()) for n in NAMES[1:7]}), TypeError, r"hidden must have the dtype of the weights \(torch.float64\) when autocast is off.*got torch.float32"),
    ("float16 hidden, float32 weights", _tensor("hidden", lambda h: h.half()), TypeError, r"hidden must have the dtype of the weights \(torch.float32\) when autocast is off.*got torch.float16"),
    ("int64 hidden", _tensor("hidden", lambda h: h.long()), TypeError, r"hidden must be a floating-point tensor \(float32, float64, float16 or bfloat16\); got dtype torch.int64"),
    ("int32 target", _tensor("target", lambda z: z.int()), TypeError, r"target must be a floating-point tensor.*got dtype torch.int32"),
    ("float8 target", _tensor("target", lambda z: z.to(torch.float8_e4m3fn)), TypeError, r"target must be a floating-point tensor.*got dtype torch.float8_e4m3fn"),
    ("bool b1", _weights(b1=lambda b: b > 0), TypeError, r"b1 must be a floating-point tensor.*got dtype torch.bool"),
    ("complex w1", _weights(w1=lambda w: w.to(torch.complex64)), TypeError, r"w1 must be a floating-point tensor.*got dtype torch.complex64"),
    # ranks and shapes
    ("2-D hidden", _tensor("hidden", lambda h: h[0]), ValueError, r"hidden must be a 3-D tensor \[B, T, D\]; got shape \[16, 48\]"),
    ("4-D target", _tensor("target", lambda z: z[None]), ValueError, r"target must be a 3-D tensor \[B, T', Z\]; got shape \[1, 3, 16, 40\]"),
    ("1-D w1", _weights(w1=lambda w: w.reshape(-1)), ValueError, r"w1 must be a 2-D tensor \[P, D\]; got shape \[3840\]"),
    ("2-D b1", _weights(b1=lambda b: b[:, None]), ValueError, r"b1 must be a 1-D tensor \[P\]; got shape \[80, 1\]"),
    ("w3 transposed", _weights(w3=lambda w: w.t()), ValueError, r"w3 must have shape \[40, 80\] \(nn.Linear layout.*got \[80, 40\]"),
    ("hidden size mismatch", _tensor("hidden", lambda h: torch.cat([h, h[..., :2]], -1)), ValueError, r"w1 must have shape \[80, 50\].*got \[80, 48\]"),
    # devices, layouts, types
    ("target on meta", _tensor("target", lambda z: z.to("meta")), ValueError, rf"target must be on the device of hidden {HERE}; got meta"),
    ("w2 on meta", _weights(w2=lambda w: w.to("meta")), ValueError, rf"w2 must be on the device of hidden {HERE}; got meta"),
    ("sparse w2", _weights(w2=lambda w: w.detach().cpu().to_sparse()), TypeError, r"w2 must be a dense \(strided\) tensor; got layout torch.sparse_coo"),
    ("hidden a list", _tensor("hidden", lambda h: h.tolist()), TypeError, r"hidden must be a torch.Tensor; got list"),
    ("b2 None", _weights(b2=lambda b: None), TypeError, r"b2 must be a torch.Tensor; got NoneType"),
    ("recompute='yes'", _set(recompute="yes"), TypeError, r"recompute must be a bool; got 'yes' \(str\)"),
    ("recompute=1", _set(recompute=1), TypeError, r"recompute must be a bool; got 1 \(int\)"),
    ("recompute=None", _set(recompute=None), TypeError, r"recompute must be a bool; got None \(NoneType\)"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_raises_the_same_error_in_every_backend(backend, change, error, match):
    a = base_args(backend_device(backend))
    change(a)
    for call in calls(backend, a):
        with pytest.raises(error, match=match):
            call()


def test_the_check_reads_metadata_only():
    """``check_call`` needs no data (meta tensors: nothing to read, hence no device sync) and
    returns the grids."""
    h, z, ws = make_inputs(3, 16, 65, device="meta")
    assert check_call(h, z, *ws, None, None, 1, True) == (4, 8)
    with pytest.raises(ValueError, match=r"hidden_grid must be a positive int; got -4"):
        check_call(h, z, *ws, -4, None, 1, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_check_does_not_synchronise_the_device():
    h, z, ws = make_inputs(3, 16, 65, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert check_call(h, z, *ws, 4, 8, 1, False) == (4, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("autocast", [False, True])
def test_the_checks_trace_without_graph_breaks(autocast):
    proj = REPAProjector(48, 80, 40)

    def step(h, z):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return proj.alignment_loss(h, z, hidden_grid=5, target_grid=10, target_prefix_tokens=1,
                                       recompute=False, backend="reference")

    explanation = torch._dynamo.explain(step)(torch.randn(3, 25, 48), torch.randn(3, 101, 40))
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ----------------------------------------------------------------------------- the dtype rule

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_dtype, weight_dtype", [(torch.float32, torch.float16),
                                                        (torch.float16, torch.float32)])
def test_hidden_and_weights_may_differ_under_autocast(seed, backend, hidden_dtype, weight_dtype):
    """Under autocast every GEMM runs in the autocast dtype whatever the inputs' (as F.linear
    under autocast): all backends compute, the gradients keep the inputs' dtypes."""
    device = backend_device(backend)
    h, z, ws = make_inputs(3, 25, 100, device=device, target_grad=True)
    h = h.detach().to(hidden_dtype).requires_grad_()
    ws = [w.detach().to(weight_dtype).requires_grad_() for w in ws]
    with torch.autocast(torch.device(device).type, dtype=torch.float16):
        loss = repa_alignment_loss(h, z, *ws, backend=backend)
    inputs = [h] + ws + [z]
    grads = torch.autograd.grad(loss, inputs)
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]
    ref = loop_loss(h.detach(), z.detach(), *[w.detach() for w in ws])
    assert abs(loss.item() - ref.item()) <= 2e-2 * (abs(ref.item()) + 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_not_cast_by_autocast(seed, backend):
    """Autocast leaves float64 alone: float64 inputs stay float64 (hidden and weights must then
    both be float64); a backend without float64 says so."""
    device = backend_device(backend)
    kind = torch.device(device).type
    h, z, ws = make_inputs(3, 16, 65, dtype=torch.float64, device=device)
    with torch.autocast(kind, dtype=torch.float16):
        with pytest.raises(TypeError, match=r"hidden \(torch.float64\) and the weights "
                                            r"\(torch.float32\) must share a dtype"):
            repa_alignment_loss(h, z, *[w.float() for w in ws], target_prefix_tokens=1,
                                backend=backend)
        if backend == "triton":
            with pytest.raises(ValueError, match=r"backend 'triton'.*float64"):
                repa_alignment_loss(h, z, *ws, target_prefix_tokens=1, backend=backend)
            return
        loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=1, backend=backend)
    assert loss.dtype == torch.float64
    ref = loop_loss(h.detach(), z, *[w.detach() for w in ws], prefix=1)
    assert abs(loss.item() - ref.item()) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_may_have_another_dtype(seed, backend):
    device = backend_device(backend)
    h, z, ws = make_inputs(3, 16, 16, device=device)
    loss = repa_alignment_loss(h, z.half(), *ws, backend=backend)
    ref = loop_loss(h.detach(), z.half(), *[w.detach() for w in ws])
    assert abs(loss.item() - ref.item()) <= 1e-5


# ----------------------------------------------------------------------------- extreme values

# (T, T', prefix, target scale, projection scale (w3 and b3), target_grad)
LARGE = [
    pytest.param(25, 100, 0, 1e20, 1.0, True, id="target-1e20-pooled"),
    pytest.param(100, 25, 0, 1.0, 1e20, True, id="projection-1e20-sit-pooled"),
    pytest.param(16, 65, 1, 1e20, 1e20, True, id="both-1e20-cls"),
    pytest.param(25, 25, 0, 1e38, 1.0, False, id="target-norm-above-float32-max"),
]


def scaled_inputs(device, T, T_target, z_scale, p_scale, target_grad, dtype=torch.float32):
    """Inputs with target × z_scale and (w3, b3) × p_scale (p = p₀ × p_scale), and their
    float64 leaves before scaling: the loss is scale invariant, the gradients of the scaled
    inputs are the unscaled ones / scale."""
    h, z, ws = make_inputs(3, T, T_target, target_grad=target_grad)
    z = z.detach().clamp(-3, 3)  # × 1e38 stays below float32's 3.4e38
    leaves = leaves_of([h] + ws + [z])
    z = (z.double() * z_scale).to(device, dtype).requires_grad_(target_grad)
    ws = [(w.detach().double() * (p_scale if i >= 4 else 1.0)).to(device, dtype).requires_grad_()
          for i, w in enumerate(ws)]
    h = h.detach().to(device, dtype).requires_grad_()
    # the reference sees exactly the (rounded) scaled values, scaled back in float64
    with torch.no_grad():
        leaves[7].copy_(z.cpu().double() / z_scale)
        for i in (4, 5):
            leaves[1 + i].copy_(ws[i].cpu().double() / p_scale)
        leaves[0].copy_(h.cpu().double())
    return h, z, ws, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, T_target, prefix, z_scale, p_scale, target_grad", LARGE)
def test_large_finite_float32_values_give_the_float64_loss_and_gradients(
        seed, backend, T, T_target, prefix, z_scale, p_scale, target_grad):
    h, z, ws, leaves = scaled_inputs(backend_device(backend), T, T_target, z_scale, p_scale,
                                     target_grad)
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=prefix, backend=backend)
    ref = loop_loss(leaves[0], leaves[7], *leaves[1:7], prefix=prefix)
    inputs = [h] + ws + ([z] if target_grad else [])
    check_grads(loss, inputs, ref, leaves[:len(inputs)], 1e-5,
                scale=dict(w3=p_scale, b3=p_scale, target=z_scale))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_large_finite_float64_values(seed, backend):
    """float64 values near 1e200: |x|² overflows float64 too."""
    if backend_device(backend) is None or backend_problem(backend, "cpu",
                                                          torch.float64) is not None:
        pytest.skip(f"{backend} does not run float64 here")
    h, z, ws, leaves = scaled_inputs("cpu", 16, 65, 1e200, 1e200, True, dtype=torch.float64)
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=1, backend=backend)
    ref = loop_loss(leaves[0], leaves[7], *leaves[1:7], prefix=1)
    check_grads(loss, [h] + ws + [z], ref, leaves, 1e-10,
                scale=dict(w3=1e200, b3=1e200, target=1e200))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_values_dinov2_layout(seed, backend):
    """CLS + 16x16 target tokens onto a 16x16 SiT grid, batch 3, with target and projection
    near 1e20 (about 15 s on Triton's interpreter)."""
    h, z, ws, leaves = scaled_inputs(backend_device(backend), 256, 257, 1e20, 1e20, True)
    loss = repa_alignment_loss(h, z, *ws, target_prefix_tokens=1, backend=backend)
    ref = loop_loss(leaves[0], leaves[7], *leaves[1:7], prefix=1)
    check_grads(loss, [h] + ws + [z], ref, leaves, 1e-5,
                scale=dict(w3=1e20, b3=1e20, target=1e20))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["zero-target-rows", "zero-projection"])
def test_zero_rows_follow_f_normalize(seed, backend, case):
    """A zero row is divided by ε = 1e-12 (F.normalize): its cosine is 0 and the gradient of
    the other side through it is 0, of itself 1/ε-sized; every backend gives the float64
    loop's numbers."""
    h, z, ws = make_inputs(3, 25, 25, device=backend_device(backend), target_grad=True)
    with torch.no_grad():
        if case == "zero-target-rows":
            z[:, 3] = 0
            z[1, 17] = 0
        else:
            ws[4].zero_()
            ws[5].zero_()
    inputs = [h] + ws + [z]
    leaves = leaves_of(inputs)
    ref = loop_loss(leaves[0], leaves[7], *leaves[1:7])
    loss = repa_alignment_loss(h, z, *ws, backend=backend)
    check_grads(loss, inputs, ref, leaves, 1e-5)
    if case == "zero-projection":
        assert loss.item() == 0.0


def test_scaled_reference_normalises_exactly_as_f_normalize(seed):
    """The reference scales rows by powers of two before its norms: for ordinary values the
    loss is bitwise the official F.normalize one."""
    from repa_fast.transport import projection_loss

    proj = REPAProjector(48, 80, 40)
    h, z = torch.randn(3, 25, 48) * 7, torch.randn(3, 25, 40) * 30
    assert torch.equal(proj.alignment_loss(h, z, backend="reference"),
                       projection_loss([z], [proj(h)]))
    # scale invariant: |z|² ≈ 1e63 would overflow float32 without the scaling
    torch.testing.assert_close(proj.alignment_loss(h, z * 1e30, backend="reference"),
                               proj.alignment_loss(h, z, backend="reference"))
