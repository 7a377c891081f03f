"""``repa_alignment_loss``: the REPA alignment op with backend dispatch (the functional form;
the module is :class:`repa_fast.models.projector.REPAProjector`), and each fused backend's own
public function (``repa_alignment_loss_triton``, ``repa_alignment_loss_native``: the op with
that backend forced).

The backend modules are imported on use only: ``alignment_triton`` needs triton,
``alignment_native`` the extension ``repa_fast._C``; importing the latter also registers its
ops' fake kernels and autograd, which ``torch.compile`` needs before it traces a call.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .alignment_common import check_call, compute_dtype
from .alignment_reference import reference_loss
from .backend_choice import requested_choice
from .backends import ENV_VAR, REGISTRY, auto_backend, backend_problem

CHOICES = ("auto",) + tuple(REGISTRY)


def requested_backend(explicit: Optional[str] = None) -> str:
    """The backend asked for: the argument if given, else ``$REPA_FAST_OPS_BACKEND``, else auto."""
    return requested_choice(explicit, CHOICES, "backend", ENV_VAR)


# the fused backends' modules, imported on use (triton needs triton, native repa_fast._C)
_MODULES = {"triton": ".alignment_triton", "native": ".alignment_native"}


@torch.compiler.assume_constant_result
def _resolve(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    # torch.compile runs this while tracing and keeps the answer (guarded by device and dtype
    # specialisation anyway), so backend dispatch never breaks the graph.
    if requested == "auto":
        name = auto_backend(device, dtype)
    else:
        reason = backend_problem(requested, device, dtype)
        if reason is not None:
            raise ValueError(f"alignment-op backend {requested!r} was forced but cannot run this "
                             f"call ({device.type}, {dtype}): {reason}. Use backend='auto' or "
                             f"${ENV_VAR}=auto to fall back to a backend that can.")
        name = requested
    if name in _MODULES:
        # imported here, eagerly even under torch.compile: the native ops' fake kernels and
        # autograd must be registered before the trace reaches the op
        importlib.import_module(_MODULES[name], __package__)
    return name


def resolved_backend(device: torch.device, dtype: torch.dtype,
                     backend: Optional[str] = None) -> str:
    """The backend a call on ``device`` in ``dtype`` runs with (``backend``, else
    ``$REPA_FAST_OPS_BACKEND``, else auto); raises as the call would for a forced backend that
    cannot run."""
    return _resolve(requested_backend(backend), torch.device(device), dtype)


def repa_alignment_loss(hidden: torch.Tensor, target: torch.Tensor,
                        w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                        w3: torch.Tensor, b3: torch.Tensor, *, hidden_grid: Optional[int] = None,
                        target_grid: Optional[int] = None, target_prefix_tokens: int = 0,
                        recompute: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """REPA alignment loss of SiT tokens ``hidden`` [B, T, D] against encoder tokens ``target``
    [B, T', Z] through the projector ``(w1, b1, w2, b2, w3, b3)`` (``nn.Linear`` layout).

    ``target_prefix_tokens`` leading target tokens (CLS, registers) are skipped; grids that
    differ by an integer factor per side are average-pooled to the coarser one. Returns a
    scalar of at least float32, differentiable in ``hidden``, the weights, and ``target`` if it
    requires grad. See :mod:`repa_fast.ops.alignment_reference` for the formula.

    ``backend`` (or ``$REPA_FAST_OPS_BACKEND``): ``auto`` takes the fused Triton kernels for
    CUDA tensors in fp32/fp16/bf16 and the PyTorch reference otherwise; ``triton``,
    ``native`` (the C++/CUDA extension ``repa_fast._C``) or ``reference`` force one (a forced
    backend that cannot run raises and says why). ``recompute`` (Triton and native): keep only
    the inputs for the backward and recompute the projector's intermediates there (default),
    or keep them (faster, more memory).

    Arguments are checked before a backend is chosen, the same way for every backend
    (:mod:`repa_fast.ops.alignment_common`): a bad one raises ``TypeError`` or ``ValueError``.
    Dtypes: float32/64, float16 or bfloat16; the weights share one dtype, which the hidden
    states have too unless autocast is on (then the GEMMs run in its dtype; float64 is never
    cast, so it must be on both sides or neither); the target may have any of the four.

    Range: every finite input whose projection ``p`` (and, where a grid is pooled, whose k×k
    sums) is finite in its dtype. |x|² overflows float32 once |x| ≳ 1.8e19 (float64: 1.3e154),
    but no backend squares unscaled rows: the reference and Triton divide each row by a power
    of two first, the native backend sums float32 rows in float64 (float64 rows scaled) and
    keeps its stats in float64. Loss and gradients therefore stay right up to the dtype's
    maximum (native float64 gradients: while row norms stay below it). Gradients are of order
    1/|p̄|: for huge rows they are tiny and may underflow in the dtype. Not covered: a projector
    output that itself overflows (huge hidden states times the weights: ``p`` is Inf, the loss
    NaN), and pooled k×k sums of values above max/k² (Inf, NaN loss; the native backend pools
    float32 in float64).
    """
    hg, tg = check_call(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid,
                        target_prefix_tokens, recompute)
    name = _resolve(requested_backend(backend), hidden.device, compute_dtype(hidden))
    args = (hidden, target, w1, b1, w2, b2, w3, b3, hg, tg, target_prefix_tokens)
    if name == "triton":
        from .alignment_triton import triton_loss  # imported by _resolve
        return triton_loss(*args, recompute)
    if name == "native":
        from .alignment_native import native_loss  # imported by _resolve
        return native_loss(*args, recompute)
    return reference_loss(*args)


def _forced(name: str, doc: str):
    """``repa_alignment_loss`` with ``backend=name``: one backend's public function (checked
    and refused exactly as a forced call of the op)."""
    def loss(hidden: torch.Tensor, target: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
             w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, *,
             hidden_grid: Optional[int] = None, target_grid: Optional[int] = None,
             target_prefix_tokens: int = 0, recompute: bool = True) -> torch.Tensor:
        return repa_alignment_loss(hidden, target, w1, b1, w2, b2, w3, b3,
                                   hidden_grid=hidden_grid, target_grid=target_grid,
                                   target_prefix_tokens=target_prefix_tokens,
                                   recompute=recompute, backend=name)

    loss.__name__ = loss.__qualname__ = f"repa_alignment_loss_{name}"
    loss.__doc__ = doc
    return loss


repa_alignment_loss_triton = _forced("triton", """The alignment loss on the fused Triton kernels
    (fp32 scalar; :mod:`repa_fast.ops.alignment_triton`). The GEMMs run in :func:`compute_dtype`
    (weights are cast to it, differentiably, as autocast would); accumulation, the cosine and
    the loss are fp32.""")
repa_alignment_loss_native = _forced("native", """The alignment loss on the native kernels
    (:mod:`repa_fast.ops.alignment_native`); a float32 scalar (float64 for float64 inputs). The
    GEMMs run in :func:`compute_dtype` (weights are cast to it, differentiably, as autocast
    would); the target keeps its dtype (read in the accumulate dtype).""")
