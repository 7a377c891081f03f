"""Registry of the alignment-op backends: name -> why it cannot run a call (None when it can).

Each entry takes ``(device, dtype)`` of the call (``None`` asks about this machine in general);
:func:`backend_problem` is the public question. ``auto`` takes the first usable backend of
``AUTO_ORDER`` for the call's device type. It never picks Triton's CPU interpreter (correct
but far too slow to train with), which must be forced. The native extension
(``repa_fast._C``) must be forced too. This module imports no backend: it answers from the
installation (:mod:`repa_fast.ops.native_extension` for the extension) so that asking is cheap
and the backends never depend on it.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional, Union

import torch

from .native_extension import native_cuda_problem, native_import_problem

ENV_VAR = "REPA_FAST_OPS_BACKEND"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _reference_problem(device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> Optional[str]:
    return None  # plain PyTorch: runs on every device and dtype


def _find_setup_problem() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it comes with Linux CUDA builds of torch; pip install triton)"
    if not hasattr(torch.library, "custom_op"):
        return f"needs torch>=2.4 for torch.library.custom_op; torch is {torch.__version__}"
    return None


_SETUP_PROBLEM = _find_setup_problem()  # a constant of the installation: look once


def triton_interpreted() -> bool:
    """Whether Triton kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    from ..kernels.tuning import INTERPRET
    return INTERPRET


def _triton_problem(device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> Optional[str]:
    problem = _SETUP_PROBLEM
    if problem is not None:
        return problem
    kind = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if triton_interpreted():
            return "TRITON_INTERPRET=1 is set, so Triton cannot launch on CUDA tensors"
        if torch.version.hip is not None:
            return "ROCm: the kernels are written and tested for NVIDIA GPUs only"
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return (f"needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper, "
                    f"Blackwell) for bf16 and TF32 tensor cores; this one is "
                    f"{capability[0]}.{capability[1]}")
    elif kind == "cpu":
        if not triton_interpreted():
            return ("no CUDA device: Triton kernels need a GPU, or TRITON_INTERPRET=1 (set before "
                    "repa_fast is imported) to run them slowly on Triton's CPU interpreter")
    else:
        return f"Triton kernels run on CUDA tensors; got a {kind} tensor"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16; got {dtype}"
    if dtype == torch.bfloat16 and kind == "cpu":
        return "Triton's CPU interpreter computes bfloat16 wrongly (tl.dot, adds); use float32/16"
    return None


def _native_problem(device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> Optional[str]:
    problem = native_import_problem()
    if problem is not None:
        return problem
    kind = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if torch.version.hip is not None:
            return "ROCm: the native CUDA kernels are written for NVIDIA GPUs only"
        problem = native_cuda_problem()
        if problem is not None:
            return problem
    elif kind != "cpu":
        return f"the native kernels run on CPU and CUDA tensors; got a {kind} tensor"
    if dtype is not None and dtype not in NATIVE_DTYPES:
        return f"the native kernels take float32, float64, float16 or bfloat16; got {dtype}"
    return None


# Every backend, in the order describe_backends lists them.
REGISTRY: dict[str, Callable[..., Optional[str]]] = {
    "triton": _triton_problem,
    "native": _native_problem,
    "reference": _reference_problem,
}

# What auto tries, by device type, in order (the reference runs everywhere else).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "reference"),
    "cpu": ("reference",),
}


def backend_problem(name: str, device: Union[torch.device, str, None] = None,
                    dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why backend ``name`` cannot run a call on ``device`` in ``dtype`` (None when it can);
    without them, why it cannot run on this machine at all. An unknown name raises
    ``ValueError`` naming the backends."""
    problem = REGISTRY.get(name)
    if problem is None:
        raise ValueError(f"unknown alignment-op backend {name!r}; the backends are "
                         f"{', '.join(REGISTRY)}")
    return problem(None if device is None else torch.device(device), dtype)


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend ``auto`` picks for a call on ``device`` in ``dtype``."""
    for name in AUTO_ORDER.get(device.type, ()):
        if backend_problem(name, device, dtype) is None:
            return name
    return "reference"


def describe_backends() -> list[tuple[str, Optional[str]]]:
    """``(name, reason)`` per op backend on this machine; reason None means usable."""
    return [(name, problem()) for name, problem in REGISTRY.items()]
