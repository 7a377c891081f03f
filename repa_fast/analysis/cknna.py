"""CKNNA, the mutual-nearest-neighbour CKA of Huh et al. 2024 ("The Platonic Representation
Hypothesis"), as ``cknna`` of their ``metrics.py`` (minyoungg/platonic-rep), batched.

For features ``A`` [n, d] and ``B`` [n, e] of the same n inputs:

* linear kernels ``K = A·Aᵀ``, ``L = B·Bᵀ`` [n, n];
* k-NN masks: ``M_K[i, j] = 1`` when j is one of the k largest entries of row i of K, the
  diagonal excluded (``unbiased``: K's diagonal is set to −∞ first; the biased variant lets
  i count as its own neighbour); ``M = M_K ∘ M_L``: j is a neighbour of i in both spaces;
* the unbiased HSIC of Song et al. 2012 (eq. 5), with K̃, L̃ = K, L with zero diagonals::

      HSIC(K, L) = [ Σ_ij K̃_ij·L̃_ji + (1ᵀK̃1)(1ᵀL̃1) / ((m−1)(m−2)) − 2·1ᵀK̃L̃1 / (m−2) ]
                   / (m(m−3))

  (the biased one: ``tr(K·H·L·H)``, ``H = I − 11ᵀ/m``);
* ``CKNNA = HSIC(M∘K, M∘L) / (√(HSIC(M_K∘K, M_K∘K) · HSIC(M_L∘L, M_L∘L)) + 1e−6)``.

The masked kernels are not symmetric, and the reference keeps them so (``Σ K̃_ij·L̃_ji`` and
``1ᵀK̃L̃1`` as written above): CKNNA(A, B) and CKNNA(B, A) differ slightly. Here ``1ᵀK̃L̃1 =
(K̃ᵀ1)·(L̃1)`` is a dot product of column and row sums, so one HSIC costs O(n²), not the
reference's O(n³) matrix product. Kernels and sums are float64 whatever the input's dtype.

Before the metric, the reference pipeline (``measure_alignment.py``) clamps the features at
the ``q`` quantile of their absolute values (``remove_outliers``, exact, q = 0.95) and
L2-normalises each row (``compute_score(normalize=True)``): :func:`prepare_features`.
"""
from __future__ import annotations

from typing import Optional

import torch

EPS = 1e-6  # the reference's guard in the denominator


def prepare_features(x: torch.Tensor, quantile: float = 0.95) -> torch.Tensor:
    """Features ``[..., n, d]`` clamped to ``±`` the ``quantile`` of ``|x|`` over each
    ``[n, d]`` set (the reference's exact ``remove_outliers``: the sorted value at index
    ``int(q·n·d)``; 1 = no clamp), then each row scaled to unit L2 norm; float64."""
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1]; got {quantile}")
    x = x.double()
    if quantile < 1:
        flat = x.abs().flatten(-2)
        limit = flat.sort(dim=-1).values[..., int(quantile * flat.shape[-1])]
        limit = limit[..., None, None]
        x = torch.minimum(torch.maximum(x, -limit), limit)
    return torch.nn.functional.normalize(x, dim=-1)


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    """``x·xᵀ`` [..., n, n] in float64."""
    x = x.double()
    return x @ x.transpose(-1, -2)


def knn_mask(kernel: torch.Tensor, topk: int, unbiased: bool = True) -> torch.Tensor:
    """1 where column j is among the ``topk`` largest of row i (``unbiased``: i itself
    excluded), else 0; same shape and dtype as ``kernel``."""
    scores = kernel
    if unbiased:
        eye = torch.eye(kernel.shape[-1], dtype=torch.bool, device=kernel.device)
        scores = kernel.masked_fill(eye, float("-inf"))
    index = scores.topk(topk, dim=-1).indices
    return torch.zeros_like(kernel).scatter_(-1, index, 1.0)


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Song et al.'s unbiased HSIC of ``[..., m, m]`` kernels (module doc), O(m²)."""
    m = k.shape[-1]
    eye = torch.eye(m, dtype=torch.bool, device=k.device)
    k, l = k.masked_fill(eye, 0), l.masked_fill(eye, 0)  # noqa: E741
    trace = (k * l.transpose(-1, -2)).sum((-2, -1))
    sums = k.sum((-2, -1)) * l.sum((-2, -1)) / ((m - 1) * (m - 2))
    cross = (k.sum(-2) * l.sum(-1)).sum(-1)  # 1ᵀ·K̃·L̃·1
    return (trace + sums - 2 * cross / (m - 2)) / (m * (m - 3))


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """``tr(K·H·L·H)`` of ``[..., m, m]`` kernels: ``Σ_ij (H·K·H)_ij·L_ji``, O(m²)."""
    centred = k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + \
        k.mean((-2, -1), keepdim=True)
    return (centred * l.transpose(-1, -2)).sum((-2, -1))


def check_sizes(n: int, topk: int, unbiased: bool) -> None:
    if n < 4:
        raise ValueError(f"CKNNA needs at least 4 samples (the unbiased HSIC divides by "
                         f"n(n-3)); got {n}")
    top = n - 1 if unbiased else n
    if not 2 <= topk <= top:
        raise ValueError(f"topk must be between 2 and {top} for {n} samples; got {topk}")


class KernelStats:
    """One side of CKNNA, reused against many others: its kernel, k-NN mask and self-term
    ``HSIC(M∘K, M∘K)``."""

    def __init__(self, feats: torch.Tensor, topk: int, unbiased: bool = True):
        check_sizes(feats.shape[-2], topk, unbiased)
        self.topk, self.unbiased = topk, unbiased
        self.hsic = hsic_unbiased if unbiased else hsic_biased
        self.kernel = linear_kernel(feats)
        self.mask = knn_mask(self.kernel, topk, unbiased)
        masked = self.mask * self.kernel
        self.self_term = self.hsic(masked, masked)


def cknna_stats(a: KernelStats, b: KernelStats) -> torch.Tensor:
    """CKNNA from precomputed sides (their leading dimensions broadcast)."""
    if (a.topk, a.unbiased) != (b.topk, b.unbiased):
        raise ValueError("both sides of CKNNA need the same topk and unbiased settings")
    mask = a.mask * b.mask
    cross = a.hsic(mask * a.kernel, mask * b.kernel)
    return cross / (torch.sqrt(a.self_term * b.self_term) + EPS)


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int = 10,
          unbiased: bool = True, reference: Optional[KernelStats] = None) -> torch.Tensor:
    """CKNNA of ``feats_a`` [..., n, d] against ``feats_b`` [..., n, e] (leading dimensions
    broadcast: many blocks against one encoder), float64 [...]. ``reference``: ``feats_b``'s
    :class:`KernelStats`, computed once by the caller (``feats_b`` is then ignored). No
    feature preprocessing here: see :func:`prepare_features`."""
    if feats_b is not None and feats_a.shape[-2] != feats_b.shape[-2]:
        raise ValueError(f"feats_a and feats_b must hold the same samples; got "
                         f"{feats_a.shape[-2]} and {feats_b.shape[-2]} rows")
    other = reference if reference is not None else KernelStats(feats_b, topk, unbiased)
    return cknna_stats(KernelStats(feats_a, topk, unbiased), other)
