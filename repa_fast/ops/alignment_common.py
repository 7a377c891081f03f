"""What every backend of the alignment op shares: argument checks, the dtype the GEMMs run in,
token pooling and overflow-free row normalisation. Depends on torch only.

:func:`check_call` runs in ``repa_alignment_loss`` before a backend is chosen and again in each
backend's public function, so a direct call is checked the same way. It reads metadata only
(types, shapes, dtypes, devices, Python ints): no tensor data, hence no device synchronisation,
and nothing ``torch.compile`` cannot trace. A bad argument raises ``TypeError`` (not a tensor,
not an int or bool, a dtype outside the rule below) or ``ValueError`` (a shape, grid, device or
count that cannot work), naming the argument, what is expected and what was given; no backend
ever computes a number from one.

The dtype rule (what ``F.linear``, hence the reference, computes, and what the fused kernels
assume):

* hidden, target and the six weights are float32, float64, float16 or bfloat16 tensors;
* the weights share one dtype (they are one module's parameters);
* with autocast off for the hidden states' device, the hidden states have the weights' dtype:
  the projector's GEMMs run in one dtype (``F.linear`` refuses mixed ones);
* with autocast on, every GEMM runs in the autocast dtype, so the hidden states and weights may
  differ, except that autocast never casts float64: float64 must be on both sides or neither
  (``F.linear`` under autocast refuses the mix, and runs float64 inputs in float64);
* the target may have any of the four dtypes: the cosine stage reads it in at least float32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

EPS = 1e-12  # F.normalize's eps
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# argument name -> (rank, layout shown in messages)
RANKS = {"hidden": (3, "[B, T, D]"), "target": (3, "[B, T', Z]"), "w1": (2, "[P, D]"),
         "b1": (1, "[P]"), "w2": (2, "[P, P]"), "b2": (1, "[P]"), "w3": (2, "[Z, P]"),
         "b3": (1, "[Z]")}


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs GEMMs in on ``device_type``; None when it is off there (or the
    device type has no autocast, as ``meta``)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the projector GEMMs run in: autocast's when autocast is on for the hidden
    states' device, else their own; float64 stays float64 (autocast never casts it)."""
    cast = autocast_dtype(hidden.device.type)
    if cast is not None and hidden.dtype != torch.float64:
        return cast
    return hidden.dtype


def in_compute_dtype(hidden: torch.Tensor, *weights: torch.Tensor) -> list[torch.Tensor]:
    """``[hidden, *weights]`` cast to :func:`compute_dtype` (differentiably, as autocast casts
    ``F.linear``'s inputs): what the fused backends hand their GEMMs."""
    dtype = compute_dtype(hidden)
    return [t.to(dtype) for t in (hidden, *weights)]


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _described(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(value, argument: str, none_ok: bool):
    # bool is an int subclass but never a count; SymInt: an int that torch.compile traces
    if (value is None and none_ok) or (
            not isinstance(value, bool) and isinstance(value, (int, torch.SymInt))):
        return value
    raise TypeError(f"{argument} must be {'an int or None' if none_ok else 'an int'}; got "
                    f"{_described(value)}")


def _check_tensors(named: dict) -> None:
    hidden = named["hidden"]
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor; got layout {t.layout}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, float64, float16 "
                            f"or bfloat16); got dtype {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on the device of hidden ({hidden.device}); got "
                             f"{t.device}")
    for name, (rank, layout) in RANKS.items():
        if named[name].dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor {layout}; got shape "
                             f"{_shape(named[name])}")


def _check_sizes(named: dict) -> None:
    hidden, target, w1 = named["hidden"], named["target"], named["w1"]
    if hidden.shape[0] == 0:
        raise ValueError(f"hidden must hold at least one sample; got an empty batch (shape "
                         f"{_shape(hidden)})")
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(f"target must have the batch size of hidden ({hidden.shape[0]}); got "
                         f"{target.shape[0]}")
    for name in ("hidden", "target"):
        if named[name].shape[1] == 0:
            raise ValueError(f"{name} must hold at least one token; got shape "
                             f"{_shape(named[name])}")
    if hidden.shape[2] == 0:
        raise ValueError(f"hidden must have at least one feature (D ≥ 1); got shape "
                         f"{_shape(hidden)}")
    if target.shape[2] == 0:
        raise ValueError(f"target must have at least one feature (Z ≥ 1); got shape "
                         f"{_shape(target)}")
    if w1.shape[0] == 0:
        raise ValueError(f"w1 must have at least one row (projector dim P ≥ 1); got shape "
                         f"{_shape(w1)}")
    d, p, z = hidden.shape[2], w1.shape[0], target.shape[2]
    expect = dict(w1=(p, d), b1=(p,), w2=(p, p), b2=(p,), w3=(z, p), b3=(z,))
    for name, shape in expect.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (nn.Linear layout, hidden "
                             f"size {d}, projector dim {p}, target dim {z}); got "
                             f"{_shape(named[name])}")


def _check_dtypes(named: dict) -> None:
    hidden, w1 = named["hidden"], named["w1"]
    for name in ("b1", "w2", "b2", "w3", "b3"):
        if named[name].dtype != w1.dtype:
            raise TypeError(f"{name} must have the dtype of w1 ({w1.dtype}): the projector's "
                            f"weights share one dtype; got {named[name].dtype}")
    if hidden.dtype == w1.dtype:
        return
    # only a mixed call asks about autocast (meta tensors, for one, have none)
    if autocast_dtype(hidden.device.type) is None:
        raise TypeError(f"hidden must have the dtype of the weights ({w1.dtype}) when autocast "
                        f"is off (the projector's GEMMs run in one dtype, as F.linear does); got "
                        f"{hidden.dtype}. Cast one of them, or call under torch.autocast")
    if torch.float64 in (hidden.dtype, w1.dtype):
        raise TypeError(f"hidden ({hidden.dtype}) and the weights ({w1.dtype}) must share a "
                        f"dtype when either is float64: autocast never casts float64 (F.linear "
                        f"under autocast refuses the mix)")


def square_side(tokens: int, argument: str) -> int:
    """The side of a row-major square grid of ``tokens`` tokens (raises if not a square)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{argument} must be a square number of tokens (a row-major square "
                         f"grid), or pass the grid size explicitly; got {tokens} tokens")
    return side


def _grid(grid, tokens: int, argument: str) -> int:
    if grid is None:
        return square_side(tokens, argument)
    if grid < 1:
        raise ValueError(f"{argument}_grid must be a positive int; got {grid}")
    if grid * grid != tokens:
        raise ValueError(f"{argument}_grid={grid} needs {grid * grid} tokens; got {tokens}")
    return grid


def pool_ratio(hidden_grid: int, target_grid: int) -> tuple[int, int]:
    """``(k_hidden, k_target)``: the pooling factor of each side (1 = not pooled)."""
    if hidden_grid == target_grid:
        return 1, 1
    if hidden_grid % target_grid == 0:
        return hidden_grid // target_grid, 1
    if target_grid % hidden_grid == 0:
        return 1, target_grid // hidden_grid
    fits = sorted({d for d in range(1, hidden_grid + 1) if hidden_grid % d == 0}
                  | {hidden_grid * m for m in (2, 3, 4)})
    raise ValueError(f"the SiT grid ({hidden_grid}x{hidden_grid}) and the target grid "
                     f"({target_grid}x{target_grid}) must differ by an integer factor per side; "
                     f"target grids that would work with this SiT grid: {fits}")


def avg_pool_tokens(x: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Average-pool row-major grid tokens [B, grid², C] over k×k patches -> [B, (grid/k)², C]."""
    if k == 1:
        return x
    b, _, c = x.shape
    g = grid // k
    return x.reshape(b, g, k, g, k, c).mean(dim=(2, 4)).reshape(b, g * g, c)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` = x / max(|x|, ε) without overflow, for every finite x.

    With m = max_i |x_i| ≥ 1 and s = 2^⌊log₂ m⌋ (so that m/s ∈ [1, 2)):
    x / max(|x|, ε) = (x/s) / max(|x/s|, ε/s), and |x/s|² ≤ 4·dim cannot overflow. Division by
    a power of two is exact, hence bitwise F.normalize where |x|² does not overflow; s is a
    constant of the row for autograd (the result does not depend on it). Rows with m < 1 (zero
    rows included) are not scaled; NaN/Inf rows stay NaN. Cost: a row maximum and one more
    elementwise division per side, small beside the projector's GEMMs.
    """
    m = x.detach().abs().amax(dim=-1, keepdim=True)
    mantissa, _ = torch.frexp(m)  # m = mantissa·2^e, mantissa ∈ [0.5, 1): m/(2·mantissa) = 2^(e−1)
    scale = torch.where(m >= 1, m / (2 * mantissa), torch.ones_like(m))
    x = x / scale
    return x / x.norm(2, -1, keepdim=True).clamp_min(EPS / scale)


def check_call(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid=None, target_grid=None,
               target_prefix_tokens=0, recompute=True) -> tuple[int, int]:
    """Check one call of the op (module docstring); returns the SiT and target grid sides
    ``(hg, tg)``, which differ by an integer factor per side."""
    named = dict(hidden=hidden, target=target, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3)
    _check_tensors(named)
    _check_sizes(named)
    _check_dtypes(named)
    _int(hidden_grid, "hidden_grid", True)
    _int(target_grid, "target_grid", True)
    prefix = _int(target_prefix_tokens, "target_prefix_tokens", False)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool; got {_described(recompute)}")
    tokens = target.shape[1]
    if not 0 <= prefix < tokens:
        raise ValueError(f"target_prefix_tokens must be in [0, {tokens}) (target has {tokens} "
                         f"tokens); got {prefix}")
    hg = _grid(hidden_grid, hidden.shape[1], "hidden")
    tg = _grid(target_grid, tokens - prefix, "target")
    pool_ratio(hg, tg)  # raises for grids that do not divide
    return hg, tg
