"""Autotuning set-up shared by the kernels: GPU config lists, one fixed config under the interpreter.

Autotune keys use ``M_BUCKET`` (M rounded up to a power of two) instead of M, so a new batch
size in the same bucket reuses the tuned config instead of benchmarking again. The tuner itself
(choices saved on disk, shared between ranks and checkpoints) is ``autotune.py``.

``REPA_FAST_INTERPRET_CONFIGS=2`` (read at import, like ``TRITON_INTERPRET``) gives the
interpreter a second config (:data:`INTERPRETED_TILES`), so the tuner's logic runs for real in
CPU tests; the default is one config (no tuning).
"""
from __future__ import annotations

import os

import triton

# Read when this module is imported, like @triton.jit reads it at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
INTERPRET_CONFIGS = max(1, int(os.environ.get("REPA_FAST_INTERPRET_CONFIGS", "1") or 1))


def m_bucket(m: int) -> int:
    """The autotune bucket of a row count: the next power of two (at least 64)."""
    return max(64, 1 << (int(m) - 1).bit_length())


def interpreted_tiles() -> list[tuple[int, int, int]]:
    """The ``(BLOCK_M, BLOCK_N, BLOCK_K)`` tiles the interpreter uses (the first one unless
    ``REPA_FAST_INTERPRET_CONFIGS`` asks for more)."""
    return INTERPRETED_TILES[:INTERPRET_CONFIGS]


def matmul_configs(gpu: list[tuple[int, int, int, int, int]], interpreted=None):
    """``triton.Config`` list from ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` tuples.

    Under ``TRITON_INTERPRET=1`` a single small config is used (:func:`interpreted_tiles`):
    one config means no benchmarking, and the interpreter's cost is per program, so tiles stay
    moderate while test shapes still span several tiles in every dimension. ``interpreted``
    (a tile or list of tiles) replaces the default tiles.
    """
    if INTERPRET:
        tiles = interpreted_tiles() if interpreted is None else (
            [interpreted] if isinstance(interpreted[0], int) else list(interpreted))
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 4})
                for bm, bn, bk in tiles]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in gpu]


# Large-K GEMMs of the projector (K = hidden size or projector dim, N = projector dim). None may
# spill registers on sm_90 in bf16, fp16 or fp32, with Triton 3.6 or 3.8
# (tests/kernel_compile_check.py --all): at most 64 accumulator elements per thread, so 128x256
# with 8 warps (spilled in fp32, and in bf16 in the backward's epilogue) became 64x256, 128x128
# with 4 warps was dropped, and 128x64 takes BLOCK_K = 32 (64 spills in fp32 with Triton 3.6).
GEMM_CONFIGS = [
    (128, 128, 64, 8, 4),
    (64, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 64, 4, 3),
]
INTERPRETED_TILE = (32, 32, 32)
# the second one (larger blocks: fewer partial-sum slots) only with REPA_FAST_INTERPRET_CONFIGS=2
INTERPRETED_TILES = [INTERPRETED_TILE, (64, 64, 16)]


def min_block(configs: list[tuple[int, ...]], index: int) -> int:
    """The smallest block size at ``index`` (0: BLOCK_M, 1: BLOCK_N) over the configs in use:
    buffers of per-block partial sums are sized with it, so their shape does not depend on the
    config autotuning picks (the kernels' ``reset_to_zero`` clears what losing configs wrote)."""
    if INTERPRET:
        return min(t[index] for t in interpreted_tiles())
    return min(c[index] for c in configs)
