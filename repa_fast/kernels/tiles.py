"""Tile indexing shared by the kernels: which block a program owns, and its offsets."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row blocks share the column blocks they read (L2 reuse)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_here = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_here
    pid_n = (pid % per_group) // rows_here
    return pid_m, pid_n


@triton.jit
def block_range(pid, BLOCK: tl.constexpr, limit):
    """Offsets ``pid·BLOCK + [0, BLOCK)`` of one block and the mask of those below ``limit``."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < limit
