"""Facts about the optional C++/CUDA extension ``repa_fast._C``: whether it loads here, what it
was built for, and how to build it. Loading it is what registers the native ops; this module
only asks (the registry, :mod:`repa_fast.info`) and never imports a backend.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

NATIVE_BUILD_HINT = ("build it with REPA_FAST_BUILD_EXT=1 pip install --no-build-isolation . "
                     "(needs torch installed first and a C++ compiler; nvcc and CUDA_HOME add "
                     "the CUDA kernels), or python setup.py build_ext --inplace in a checkout")


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
