"""Attention backends for the SiT block, with dispatch that can say why a backend is unusable.

Every backend computes ``softmax(q kᵀ / sqrt(d)) v`` over tokens, on inputs laid out as
``[batch, tokens, heads, head_dim]`` (the layout flash-attn and xformers use natively).

* ``flash3``: ``flash_attn_interface.flash_attn_func`` (FlashAttention-3); CUDA sm90, fp16/bf16.
* ``flash4``: ``flash_attn.cute.flash_attn_func`` (flash-attn-4); CUDA sm90-sm103, fp16/bf16,
  head_dim 64/96/128 (so not SiT-XL's 72).
* ``flash2``: ``flash_attn.flash_attn_func`` (FlashAttention-2); CUDA sm80+, fp16/bf16.
* ``xformers``: ``xformers.ops.memory_efficient_attention``; CUDA.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; everywhere (the default).
* ``math``: explicit ``softmax(q·scale kᵀ) v``, the official ``fused_attn=False`` path;
  everywhere.

``auto`` takes the first backend of :data:`AUTO_ORDER` that supports the call (device, dtype,
head dim); SDPA always does. A backend forced by name that cannot serve a call raises a
``ValueError`` with the reason instead of silently falling back.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .backend_choice import check_choice, requested_choice

ENV_VAR = "REPA_FAST_ATTN_BACKEND"
BACKENDS = ("flash3", "flash4", "flash2", "xformers", "sdpa", "math")
AUTO_ORDER = ("flash3", "flash4", "flash2", "xformers", "sdpa")
CHOICES = ("auto",) + BACKENDS

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    name: str
    #: package import check: returns the attention function or raises ImportError.
    loader: Callable[[], Callable]
    #: why a given call (device, dtype, head_dim) cannot run here, or None if it can.
    call_problem: Callable[[torch.device, torch.dtype, int], Optional[str]]
    install_hint: str = ""


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _flash_problem(min_cc: tuple[int, int], max_cc: Optional[tuple[int, int]], label: str,
                   head_dims: Optional[tuple[int, ...]] = None):
    """Problem check of a FlashAttention build: CUDA, fp16/bf16, compute capability in range,
    and head dims (any multiple of 8 up to 256, or exactly ``head_dims`` when given)."""
    def problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        if device.type != "cuda":
            return f"{label} needs a CUDA tensor, got device {device}"
        if dtype not in _HALF:
            return f"{label} needs float16 or bfloat16 inputs, got {dtype}"
        if head_dims is not None and head_dim not in head_dims:
            return f"{label} supports head_dim in {head_dims}, got {head_dim}"
        if head_dim % 8 != 0 or head_dim > 256:
            return f"{label} needs head_dim a multiple of 8 and <= 256, got {head_dim}"
        cc = _cuda_capability(device)
        if cc < min_cc or (max_cc is not None and cc > max_cc):
            want = f"sm{min_cc[0]}{min_cc[1]}" + (f"..sm{max_cc[0]}{max_cc[1]}" if max_cc else "+")
            return f"{label} needs a GPU of compute capability {want}, got sm{cc[0]}{cc[1]}"
        return None

    return problem


def _xformers_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if device.type != "cuda":
        return f"xformers memory_efficient_attention has no operator for device {device}"
    return None


def _anywhere(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    return None


def _load_flash2() -> Callable:
    import flash_attn

    version = getattr(flash_attn, "__version__", "unknown")  # flash-attn-4 alone ships no version
    if not version.startswith("2."):
        raise ImportError(f"flash_attn {version} is not FlashAttention-2")
    from flash_attn import flash_attn_func

    return flash_attn_func


def _load_flash3() -> Callable:
    from flash_attn_interface import flash_attn_func

    return flash_attn_func


def _load_flash4() -> Callable:
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def _load_xformers() -> Callable:
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention


def _load_torch() -> Callable:
    return F.scaled_dot_product_attention


REGISTRY: dict[str, Backend] = {
    "flash3": Backend("flash3", _load_flash3, _flash_problem((9, 0), (9, 0), "FlashAttention-3"),
                      "build flash-attention's hopper/ package (flash_attn_interface)"),
    "flash4": Backend("flash4", _load_flash4, _flash_problem((9, 0), (10, 3), "FlashAttention-4",
                                                     head_dims=(64, 96, 128)),
                      "pip install 'repa_fast[flash4]'"),
    "flash2": Backend("flash2", _load_flash2, _flash_problem((8, 0), None, "FlashAttention-2"),
                      "pip install 'repa_fast[flash]'"),
    "xformers": Backend("xformers", _load_xformers, _xformers_problem,
                        "pip install 'repa_fast[xformers]'"),
    "sdpa": Backend("sdpa", _load_torch, _anywhere),
    "math": Backend("math", _load_torch, _anywhere),
}


_IMPORTED: dict[str, tuple[Optional[Callable], Optional[str]]] = {}
_RESOLVED: dict[tuple, str] = {}


def _import(name: str) -> tuple[Optional[Callable], Optional[str]]:
    """Import a backend once: ``(function, None)`` or ``(None, reason)``."""
    if name not in _IMPORTED:
        backend = REGISTRY[name]
        try:
            _IMPORTED[name] = (backend.loader(), None)
        except Exception as exc:  # ImportError, or a broken install raising anything else
            hint = f" ({backend.install_hint})" if backend.install_hint else ""
            _IMPORTED[name] = (None, f"not importable: {type(exc).__name__}: {exc}{hint}")
    return _IMPORTED[name]


def unavailable_reason(name: str, device: Optional[torch.device] = None,
                       dtype: torch.dtype = torch.bfloat16, head_dim: int = 64) -> Optional[str]:
    """Why backend ``name`` cannot run a call on ``device``/``dtype``/``head_dim``; None if it can.

    Without ``device``, the first CUDA device is assumed when present, else the CPU.
    """
    check_backend_name(name, "name")
    fn, reason = _import(name)
    if fn is None:
        return reason
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    return REGISTRY[name].call_problem(torch.device(device), dtype, head_dim)


def available_backends(device: Optional[torch.device] = None, dtype: torch.dtype = torch.bfloat16,
                       head_dim: int = 64) -> list[str]:
    """Backends that can run a call with this device, dtype and head dim."""
    return [n for n in BACKENDS if unavailable_reason(n, device, dtype, head_dim) is None]


def check_backend_name(name: str, argument: str = "attn_backend") -> str:
    return check_choice(name, CHOICES, argument)


def requested_backend(explicit: Optional[str] = None) -> str:
    """The backend asked for: the argument if given, else ``$REPA_FAST_ATTN_BACKEND``, else auto."""
    return requested_choice(explicit, CHOICES, "attn_backend", ENV_VAR)


def resolve_backend(requested: str, q: torch.Tensor) -> str:
    """The backend that will run attention on ``q`` ([B, N, H, d]) when ``requested`` is asked."""
    return _resolve(requested, q.device, q.dtype, q.shape[-1])


# torch.compile runs this eagerly while tracing and bakes the answer into the graph (it is
# guarded by the dtype/device/shape specialisation anyway), so dispatch never breaks the graph.
@torch.compiler.assume_constant_result
def _resolve(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Cached per (request, device, dtype, head_dim): one dict look-up per call after the first."""
    key = (requested, device, dtype, head_dim)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve_uncached(requested, device, dtype, head_dim)
    return name


def _resolve_uncached(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    if requested == "auto":
        for name in AUTO_ORDER:
            if unavailable_reason(name, device, dtype, head_dim) is None:
                return name
        return "sdpa"
    reason = unavailable_reason(requested, device, dtype, head_dim)
    if reason is not None:
        raise ValueError(f"attention backend {requested!r} was forced but cannot run this call: "
                         f"{reason}. Use attn_backend='auto' or ${ENV_VAR}=auto to fall back.")
    return requested


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, H, N, d]; the exact formula of timm's non-fused path, so fused_attn=False is faithful.
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention on ``[B, N, H, d]`` inputs, returning ``[B, N, H, d]``."""
    name = resolve_backend(backend, q)
    if name in ("sdpa", "math"):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v) if name == "sdpa" else _math_attention(q, k, v)
        return out.transpose(1, 2)
    fn, _ = _import(name)
    out = fn(q, k, v)
    # FA3 (some versions) and FA4 return (out, softmax_lse).
    return out[0] if isinstance(out, tuple) else out


def describe_backends() -> list[tuple[str, Optional[str]]]:
    """``(name, reason)`` for every backend on the default device; reason None means usable."""
    return [(n, unavailable_reason(n)) for n in BACKENDS]


def import_version(module: str) -> Optional[str]:
    """The ``__version__`` of an importable module, or None."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:
        return None
