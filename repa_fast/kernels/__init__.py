"""Triton device code of repa_fast, the sub-package ``repa_fast.kernels``.

Only ``@triton.jit`` functions and their autotune configs live here; host wrappers, torch ops
and autograd are in ``repa_fast.ops`` (``alignment_triton.py``). An ordinary folder of the
package: import it as ``repa_fast.kernels``; no top-level ``kernels`` module is installed.

* ``alignment_linear_silu.py``: projector GEMMs with bias + SiLU (forward) and SiLU-derivative
  + bias gradient (backward) epilogues;
* ``alignment_cosine.py``: the last projector GEMM with patch pooling and the normalised-cosine
  epilogue, its backward, and the finish kernel (one program per block of pooled rows);
* ``tiles.py``: grouped program order and block offsets shared by the kernels;
* ``autotune.py``: the tile tuner replacing ``triton.autotune`` (choices saved on disk per card
  and Triton version, exported / installed for checkpoints and ranks);
* ``tuning.py``: autotune configs (one fixed config under ``TRITON_INTERPRET=1``) and the
  M bucketing of autotune keys.
"""
# Importing the package registers every kernel with the tuner (``autotune``'s decorator), so
# tile tables from a checkpoint or the disk cache can name any of them.
from . import alignment_cosine, alignment_linear_silu  # noqa: E402,F401
