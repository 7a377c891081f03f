"""Registry of the alignment-op backends: name -> why it cannot run a call (None when it can).

Each entry takes ``(device, dtype)`` of the call (``None`` asks about this machine in general).
``auto`` takes the first usable backend of ``AUTO_ORDER``; it never picks Triton's CPU
interpreter (correct but far too slow to train with), which must be forced.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch

ENV_VAR = "REPA_FAST_OPS_BACKEND"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the projector GEMMs run in: autocast's when autocast is on for the hidden
    states' device, else their own."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


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


# Ordered by preference.
REGISTRY: dict[str, Callable[..., Optional[str]]] = {
    "triton": _triton_problem,
    "reference": _reference_problem,
}


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend ``auto`` picks for a call on ``device`` in ``dtype``."""
    for name, problem in REGISTRY.items():
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, never chosen silently
        if problem(device, dtype) is None:
            return name
    return "reference"


def describe_backends() -> list[tuple[str, Optional[str]]]:
    """``(name, reason)`` per op backend on this machine; reason None means usable."""
    return [(name, problem()) for name, problem in REGISTRY.items()]
