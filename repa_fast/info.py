"""``python -m repa_fast.info``: versions, devices, and which backends can run here (and why not)."""
from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import sys
from typing import Optional

import torch

from . import __version__
from .ops.attention import AUTO_ORDER, ENV_VAR as ATTN_ENV, describe_backends as attention_backends
from .ops.attention import resolve_backend
from .ops.attention import import_version
from .ops import ENV_VAR as OPS_ENV, describe_backends as op_backends
from .ops.backends import auto_backend as auto_op_backend, triton_interpreted
from .ops.native_extension import NATIVE_BUILD_HINT, native_build_summary, native_import_problem

# (label, module to import for the version)
OPTIONAL_PACKAGES = [
    ("triton", "triton"),
    ("timm", "timm"),
    ("numpy", "numpy"),
    ("flash-attn (FA2)", "flash_attn"),
    ("flash-attn (FA3 hopper)", "flash_attn_interface"),
    ("flash-attn-4", "flash_attn.cute"),
    ("xformers", "xformers"),
    ("deepspeed", "deepspeed"),
    ("nvidia-dali", "nvidia.dali"),
    ("diffusers", "diffusers"),
    ("safetensors", "safetensors"),
]

# The lowest versions the package's code needs, from an audit of the torch APIs it calls
# (README "Requirements"), and the versions it is checked with. torch: custom_op,
# register_fake/register_autograd, is_autocast_enabled(device)/get_autocast_dtype and the CPU
# fused AdamW are 2.4; torch.serialization.safe_globals is 2.5; nothing needs more (the new
# fp32_precision API of 2.9 is read only where the legacy allow_tf32 flag refuses). Triton:
# the kernels are compiled for sm_90 in CI with 3.6 (the GPU image's) and 3.8 (CI's).
TORCH_MINIMUM = (2, 5)
TORCH_CHECKED = "2.14 in CI; 2.11 on the GPU machines via benchmarks/gpu_check.sh"
TRITON_MINIMUM = (3, 6)
TRITON_CHECKED = "3.6 and 3.8 (kernels compiled for sm_90 in CI with both)"


def _major_minor(version: str) -> Optional[tuple[int, int]]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def version_status(name: str, version: Optional[str], minimum: tuple[int, int],
                   checked: str) -> str:
    """One line: the installed version and whether it meets the minimum this package needs."""
    need = ".".join(map(str, minimum))
    if version is None:
        return f"  {name:<8} not installed (needs >= {need}; checked with {checked})"
    found = _major_minor(version)
    verdict = ("ok" if found is not None and found >= minimum
               else f"TOO OLD or unknown: needs >= {need}")
    return f"  {name:<8} {version}: {verdict} (needs >= {need}; checked with {checked})"


def version_lines() -> list[str]:
    return ["versions (minimums from the API audit; README \"Requirements\"):",
            version_status("torch", torch.__version__, TORCH_MINIMUM, TORCH_CHECKED),
            version_status("triton", import_version("triton"), TRITON_MINIMUM, TRITON_CHECKED)]


def report() -> str:
    lines = [f"repa_fast {__version__}",
             f"python {platform.python_version()} on {platform.platform()}",
             f"torch {torch.__version__} (built with CUDA {torch.version.cuda or 'none'})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            lines.append(f"  cuda:{i} {torch.cuda.get_device_name(i)} (sm{cc[0]}{cc[1]})")
    else:
        lines.append("  no CUDA device: everything runs on the CPU")
    lines += version_lines()
    lines.append("packages:")
    for label, module in OPTIONAL_PACKAGES:
        version = import_version(module)
        lines.append(f"  {label:<24} {version or 'not installed'}")
    lines.append(f"attention backends (auto order {' > '.join(AUTO_ORDER)}; "
                 f"force with attn_backend= or ${ATTN_ENV}):")
    lines += _backend_lines(attention_backends())
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float32):
        probe = torch.empty(1, 1, 1, 72, dtype=dtype, device=device)
        lines.append(f"  auto picks {resolve_backend('auto', probe)} for {dtype} head_dim 72 "
                     f"on {device.type}")
    lines.append(f"alignment-op backends (force with backend= or ${OPS_ENV}):")
    op_lines = _backend_lines(op_backends())
    if triton_interpreted():
        op_lines = [line.replace("available", "available on Triton's CPU interpreter (slow: "
                                 "tests only, auto never picks it)", 1)
                    if line.split()[0] == "triton" else line for line in op_lines]
    lines += op_lines
    # what the C++/CUDA extension was built for (or why it is missing)
    lines.append(f"  native extension: {native_extension_line()}")
    for dtype in (torch.bfloat16, torch.float32):
        lines.append(f"  auto picks {auto_op_backend(device, dtype)} for {dtype} on {device.type}")
    from .data.loaders import dali_problem  # imported here: only the report needs it
    problem = dali_problem()
    decode = "nvJPEG on the GPU" if torch.cuda.is_available() else "on the CPU (no GPU)"
    lines.append("data loader backends:")
    lines.append("  dali       " + (f"available, decodes {decode}" if problem is None
                                    else f"unavailable: {problem}"))
    lines.append("  torch      available (worker processes, Pillow decode)")
    lines.append(f"  auto picks {'dali' if problem is None else 'torch'}")
    return "\n".join(lines)


def native_extension_line() -> str:
    """Whether the C++/CUDA extension was never built (optional: ``pip install .`` leaves it
    out unless asked), was built but does not load here, or what it was built for."""
    try:
        found = importlib.util.find_spec("repa_fast._C")
    except (ImportError, ValueError):
        found = None
    if found is None:
        return ("not built (optional: the alignment op runs on its reference and Triton "
                f"backends without it); {NATIVE_BUILD_HINT}")
    problem = native_import_problem()
    if problem is not None:
        return f"built ({found.origin}) but fails to load: {problem}"
    return native_build_summary()


def _backend_lines(entries) -> list[str]:
    return [f"  {name:<10} " + ("available" if reason is None else f"unavailable: {reason}")
            for name, reason in entries]


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m repa_fast.info",
        description="Print repa_fast's version, torch and Triton versions against the minimums "
                    "this package needs, the devices, the optional packages, and which "
                    "attention, alignment-op and data-loader backends run here (and why the "
                    "others do not).")


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
