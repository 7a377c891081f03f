"""``python -m repa_fast.info``: versions, devices, and which backends can run here (and why not)."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__
from .attention import AUTO_ORDER, ENV_VAR as ATTN_ENV, describe_backends as attention_backends
from .attention import resolve_backend
from .attention.backends import import_version
from .ops import ENV_VAR as OPS_ENV, describe_backends as op_backends
from .ops.backends import auto_backend as auto_op_backend, native_build_summary, triton_interpreted

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
    lines.append(f"  native extension: {native_build_summary()}")
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


def _backend_lines(entries) -> list[str]:
    return [f"  {name:<10} " + ("available" if reason is None else f"unavailable: {reason}")
            for name, reason in entries]


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
