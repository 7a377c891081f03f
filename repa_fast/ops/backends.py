"""Registry of the alignment-op backends: name -> why it cannot run a call (None when it can).

Each entry takes ``(device, dtype)`` of the call (``None`` asks about this machine in general).
``auto`` takes the first usable backend of ``AUTO_ORDER`` for the call's device type. It never
picks Triton's CPU interpreter (correct but far too slow to train with), which must be forced.
The native extension (``repa_fast._C``) must be forced too. On the CPU the op is matmul-bound
and the reference already runs at ~80% of the fp32 matmul ceiling: native forward + backward
with its default recompute runs three GEMMs more and measured 0.79-0.84x the reference's speed
in 60-91% of its peak memory (float32, SiT-B/2 width, batch 2-16), ``recompute=False``
1.06-1.11x, forward alone 1.1-1.2x (benchmarks/results/*-cpu-*-native.txt). Its CUDA kernels
have not been run on a GPU yet.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Callable, Optional

import torch

from .alignment_common import compute_dtype  # noqa: F401  (re-exported: repa_fast.train)

ENV_VAR = "REPA_FAST_OPS_BACKEND"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NATIVE_BUILD_HINT = ("build it with REPA_FAST_BUILD_EXT=1 pip install --no-build-isolation . "
                     "(needs torch installed first and a C++ compiler; nvcc and CUDA_HOME add "
                     "the CUDA kernels), or python setup.py build_ext --inplace in a checkout")


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


def native_build_record() -> Optional[ModuleType]:
    """``repa_fast._build_info``, written by setup.py's extension build (None when absent)."""
    try:
        return importlib.import_module("repa_fast._build_info")
    except ImportError:
        return None


_NATIVE_IMPORT: dict = {}


def native_import_problem() -> Optional[str]:
    """Why the extension ``repa_fast._C`` cannot be used in this process (None: it loads and
    matches this torch); looked up once."""
    if "problem" not in _NATIVE_IMPORT:
        _NATIVE_IMPORT["problem"] = _find_native_import_problem()
    return _NATIVE_IMPORT["problem"]


def _find_native_import_problem() -> Optional[str]:
    try:
        from .. import _C
    except ModuleNotFoundError as error:
        if error.name not in ("repa_fast._C", None):
            return f"repa_fast._C needs {error.name}, which is missing: {error}"
        record = native_build_record()
        if record is not None and not record.BUILT:
            return (f"the extension repa_fast._C was not built ({record.REASON}); "
                    f"{NATIVE_BUILD_HINT}")
        return (f"the extension repa_fast._C is not built (this installation has no compiled "
                f"extension); {NATIVE_BUILD_HINT}")
    except (ImportError, OSError) as error:
        return (f"the extension repa_fast._C does not load ({type(error).__name__}: {error}); "
                f"rebuild it for this torch ({torch.__version__}): {NATIVE_BUILD_HINT}")
    if _C.TORCH_VERSION != torch.__version__:
        return (f"repa_fast._C was built for torch {_C.TORCH_VERSION} but this is torch "
                f"{torch.__version__} (libtorch's C++ ABI changes between versions); rebuild "
                f"it: {NATIVE_BUILD_HINT}")
    return None


def _no_cuda_reason() -> str:
    """Why the build left out the CUDA kernels, from setup.py's record of it."""
    from .. import _C
    record = native_build_record()
    if record is not None and getattr(record, "TORCH_VERSION", None) == _C.TORCH_VERSION:
        return getattr(record, "CUDA_REASON", None) or "a CPU-only build"
    return "a CPU-only build"


def native_cuda_problem() -> Optional[str]:
    """Why the loaded extension has no CUDA kernels (None when it has them)."""
    from .. import _C
    if _C.WITH_CUDA:
        return None
    return (f"repa_fast._C was built without its CUDA kernels ({_no_cuda_reason()}); rebuild "
            f"with REPA_FAST_BUILD_CUDA=1 (needs nvcc and CUDA_HOME)")


def native_build_summary() -> str:
    """One line on the extension for ``python -m repa_fast.info``: what it was built for."""
    problem = native_import_problem()
    if problem is not None:
        return f"not usable: {problem}"
    from .. import _C
    if _C.WITH_CUDA:
        return (f"built for torch {_C.TORCH_VERSION}: CPU kernels and CUDA {_C.CUDA_VERSION} "
                f"kernels (arch {_C.CUDA_ARCH_LIST or 'of the build machine GPUs'})")
    return (f"built for torch {_C.TORCH_VERSION}: CPU kernels only, no CUDA kernels "
            f"({_no_cuda_reason()})")


def _native_problem(device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> Optional[str]:
    problem = native_import_problem()
    if problem is not None:
        return problem
    try:  # registers the ops' fake kernels and autograd along with the library
        importlib.import_module("repa_fast.ops.alignment_native")
    except ImportError as error:
        return str(error)
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


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend ``auto`` picks for a call on ``device`` in ``dtype``."""
    for name in AUTO_ORDER.get(device.type, ()):
        if REGISTRY[name](device, dtype) is None:
            return name
    return "reference"


def describe_backends() -> list[tuple[str, Optional[str]]]:
    """``(name, reason)`` per op backend on this machine; reason None means usable."""
    return [(name, problem()) for name, problem in REGISTRY.items()]
