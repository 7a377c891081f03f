"""Triton device code of repa_fast, installed as ``repa_fast.kernels``.

Only ``@triton.jit`` functions live here; host wrappers and autograd functions are in
``repa_fast.ops``. Import through the package (``import repa_fast.kernels``): this folder is
mapped to ``repa_fast.kernels`` by ``setup.py`` and is never a top-level module.
"""
