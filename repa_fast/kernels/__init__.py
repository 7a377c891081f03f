"""Triton device code of repa_fast, installed as ``repa_fast.kernels``.

Only ``@triton.jit`` functions and their autotune configs live here; host wrappers, torch ops
and autograd are in ``repa_fast.ops`` (``alignment_triton.py``). Import through the package
(``import repa_fast.kernels``): this folder is mapped to ``repa_fast.kernels`` by ``setup.py``
and is never a top-level module.

* ``linear_silu.py``: projector GEMMs with bias + SiLU (forward) and SiLU-derivative + bias
  gradient (backward) epilogues;
* ``cosine.py``: the last projector GEMM with patch pooling and the normalised-cosine epilogue,
  its backward, and the finish kernel (one program per block of pooled rows);
* ``tiles.py``: grouped program order and block offsets shared by the kernels;
* ``autotune.py``: the tile tuner replacing ``triton.autotune`` (choices saved on disk per card
  and Triton version, exported / installed for checkpoints and ranks);
* ``tuning.py``: autotune configs (one fixed config under ``TRITON_INTERPRET=1``) and the
  M bucketing of autotune keys.
"""
