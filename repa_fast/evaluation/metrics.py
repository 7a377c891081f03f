"""The metric maths of ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``).

Pure numpy / scipy / torch on feature arrays; nothing here knows about Inception or files.

* Fréchet distance of two Gaussians ``N(μ1, Σ1)``, ``N(μ2, Σ2)`` (FID on pool features, sFID on
  spatial features)::

      d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½

* Inception Score over splits of ``split_size`` rows, ``p = softmax(logits)``::

      IS = mean over splits of exp( mean_i KL(p_i ‖ mean_j p_j) )

* Improved precision / recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour balls: a
  point is "in the manifold" of a set when it lies within the k-th-neighbour radius of some
  member of that set. precision = share of samples in the reference manifold, recall = share
  of references in the sample manifold.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

FID_METHODS = ("sqrtm", "eigh")
DISTANCE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set, float64.

    ``factor`` (``k × d`` with ``Σ = factorᵀ · factor``) is kept when the statistics come from
    fewer rows than dimensions (``k = n ≤ d``): the ``eigh`` Fréchet method then works in the
    ``k``-dimensional row space instead of decomposing the ``d × d`` covariance.
    """

    mu: np.ndarray
    sigma: np.ndarray
    factor: Optional[np.ndarray] = None

    @classmethod
    def from_activations(cls, activations: np.ndarray) -> "FeatureStats":
        """``μ`` = row mean, ``Σ`` = unbiased covariance (``np.cov``, ``ddof=1``) as ADM.

        Both in float64 (ADM's mean stays in float32; the difference is ~1e-7 relative).
        """
        # One float64 copy, centred and scaled in place (50 000 × 2048 is 800 MB already).
        factor = np.array(activations, dtype=np.float64)
        if factor.ndim != 2:
            raise ValueError(f"activations: expected a 2-D array (N, d), got shape {factor.shape}")
        n, d = factor.shape
        if n < 2:
            raise ValueError(f"activations: a covariance needs at least 2 rows, got {n}")
        mu = factor.mean(axis=0)
        factor -= mu
        factor /= np.sqrt(n - 1)
        sigma = factor.T @ factor
        return cls(mu=mu, sigma=sigma, factor=factor if n <= d else None)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def _check_pair(a: FeatureStats, b: FeatureStats) -> None:
    if a.mu.ndim != 1 or b.mu.ndim != 1 or a.mu.shape != b.mu.shape:
        raise ValueError(f"mean vectors differ in shape: {a.mu.shape} vs {b.mu.shape}")
    d = a.mu.shape[0]
    if a.sigma.shape != (d, d) or b.sigma.shape != (d, d):
        raise ValueError(f"covariances must both be ({d}, {d}), got {a.sigma.shape} and "
                         f"{b.sigma.shape}")


def trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """``tr (Σ1 Σ2)^½`` with ``scipy.linalg.sqrtm``, handled exactly as ADM (and TTUR) do.

    The product may be nearly singular: when ``sqrtm`` returns non-finite values, ``eps`` is
    added to both diagonals and the root taken again. Round-off can leave a small imaginary
    part; it is dropped unless the diagonal's imaginary part exceeds ``1e-3`` (then the
    covariances are not valid, and a ``ValueError`` says so).
    """
    from scipy import linalg  # scipy is an optional dependency (the ``eval`` extra)

    with warnings.catch_warnings():
        # ADM passes disp=False (deprecated since SciPy 1.16), which silences the singular /
        # ill-conditioned notice; the finiteness check below is what acts on it.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: the covariance product is singular; adding {eps} to "
                      "the diagonal of both covariance estimates", RuntimeWarning, stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"Fréchet distance: sqrtm(Σ1·Σ2) has an imaginary component of "
                             f"{worst:.3g}; the covariances are not positive semi-definite")
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_root(sigma: np.ndarray) -> np.ndarray:
    """Symmetric ``Σ^½`` from ``eigh``, negative round-off eigenvalues clamped to 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product_eigh(a: FeatureStats, b: FeatureStats) -> float:
    """``tr (Σ1 Σ2)^½`` from symmetric eigenvalues, exact in exact arithmetic.

    With any factor ``Σ1 = Lᵀ L``, ``Σ1 Σ2`` has the same non-zero eigenvalues as the
    symmetric PSD matrix ``L Σ2 Lᵀ``, so ``tr (Σ1 Σ2)^½ = Σ_i √λ_i(L Σ2 Lᵀ)``. ``L`` is the
    centred-activation factor when one side came from ``n ≤ d`` rows (an ``n × n`` problem),
    else ``Σ1^½`` from ``eigh``. When both sides have factors the eigenvalues are the squared
    singular values of ``L1 L2ᵀ``.
    """
    if a.factor is not None and b.factor is not None:
        return float(np.linalg.svd(a.factor @ b.factor.T, compute_uv=False).sum())
    if a.factor is None and b.factor is not None:
        a, b = b, a  # tr (Σ1 Σ2)^½ = tr (Σ2 Σ1)^½: put the factored side first
    root = a.factor if a.factor is not None else _psd_root(a.sigma)
    inner = root @ b.sigma @ root.T
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats, method: str = "sqrtm",
                     eps: float = 1e-6) -> float:
    """Fréchet distance ``‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½``.

    ``method="sqrtm"`` is ADM's computation (``scipy.linalg.sqrtm``; see
    :func:`trace_sqrt_product_sqrtm`). ``method="eigh"`` computes the same trace from
    symmetric eigenvalues (:func:`trace_sqrt_product_eigh`): much faster, and it never goes
    complex, but it is not the reference computation. Like ADM the result is not clamped, so
    identical inputs can give a tiny negative value from round-off.
    """
    if method not in FID_METHODS:
        raise ValueError(f"method: expected one of {FID_METHODS}, got {method!r}")
    _check_pair(a, b)
    diff = a.mu - b.mu
    if method == "sqrtm":
        tr_covmean = trace_sqrt_product_sqrtm(a.sigma, b.sigma, eps)
    else:
        tr_covmean = trace_sqrt_product_eigh(a, b)
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's Inception Score: ``p = softmax(logits)``, per split of ``split_size`` rows
    ``exp(mean_i Σ_c p_ic (log p_ic − log mean_j p_jc))``, averaged over splits (the last
    split may be shorter, as in ADM).

    Computed in float64 from ``log_softmax`` so that a probability that underflows to 0 adds
    0 instead of ADM's ``0 · log 0 = nan``; otherwise the same numbers.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"logits: expected a non-empty 2-D array (N, classes), got shape "
                         f"{x.shape}")
    if split_size < 1:
        raise ValueError(f"split_size: expected a positive integer, got {split_size}")
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        kl = (p * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor,
                          dtype: str = "float16") -> torch.Tensor:
    """Squared Euclidean distances ``max(‖u_i‖² − 2 u_i·v_j + ‖v_j‖², 0)``, float32 ``(n, m)``.

    ``dtype="float16"`` reproduces ADM's TensorFlow graph, which casts the features to half
    precision and evaluates the formula there: squares rounded to half, sums and products
    accumulated in float32, every result rounded to half; like ADM it falls back to float32
    for a block where any half-precision value overflows. ``"float32"`` skips the rounding.
    """
    if dtype not in DISTANCE_DTYPES:
        raise ValueError(f"distance dtype: expected one of {DISTANCE_DTYPES}, got {dtype!r}")
    if dtype == "float16":
        half = torch.float16
        u16, v16 = u.to(half).float(), v.to(half).float()
        norm_u = (u16 * u16).to(half).float().sum(1).to(half)
        norm_v = (v16 * v16).to(half).float().sum(1).to(half)
        dots = (u16 @ v16.T).to(half)
        dist = ((norm_u[:, None] - 2 * dots) + norm_v[None, :]).clamp_min(0)
        if torch.isfinite(dist).all():
            return dist.float()
    u32, v32 = u.float(), v.float()
    norm_u, norm_v = (u32 * u32).sum(1), (v32 * v32).sum(1)
    return ((norm_u[:, None] - 2 * (u32 @ v32.T)) + norm_v[None, :]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000,
                   dtype: str = "float16") -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour in the same set.

    The row itself (distance 0) is the 0-th neighbour, as in ADM's ``np.partition`` over the
    full distance row; rows are processed ``batch_size`` at a time against all columns.
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per "
                         f"set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for start in range(0, n, batch_size):
        rows = features[start:start + batch_size]
        dist = torch.cat([pairwise_sq_distances(rows, features[c:c + batch_size], dtype)
                          for c in range(0, n, batch_size)], dim=1)
        radii[start:start + len(rows)] = torch.kthvalue(dist, k + 1, dim=1).values
    return radii


def precision_recall(ref: Union[np.ndarray, torch.Tensor], samples: Union[np.ndarray, torch.Tensor],
                     k: int = 3, batch_size: int = 10000, dtype: str = "float16",
                     device: Union[str, torch.device, None] = None) -> tuple[float, float]:
    """ADM's ``ManifoldEstimator`` precision and recall with ``k``-NN radii.

    ``precision`` = share of ``samples`` inside some reference ball (‖s − r‖² ≤ radius²(r)),
    ``recall`` = share of ``ref`` inside some sample ball. Distances are squared, compared in
    float32, computed in blocks of ``batch_size × batch_size`` (ADM: 10000).
    """
    if k < 1:
        raise ValueError(f"k: expected a positive integer, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ref_t = torch.as_tensor(np.asarray(ref, dtype=np.float32) if isinstance(ref, np.ndarray)
                            else ref, dtype=torch.float32, device=dev)
    sam_t = torch.as_tensor(np.asarray(samples, dtype=np.float32)
                            if isinstance(samples, np.ndarray) else samples,
                            dtype=torch.float32, device=dev)
    if ref_t.ndim != 2 or sam_t.ndim != 2 or ref_t.shape[1] != sam_t.shape[1]:
        raise ValueError(f"precision/recall: expected two 2-D feature arrays of equal width, got "
                         f"{tuple(ref_t.shape)} and {tuple(sam_t.shape)}")
    radii_ref = manifold_radii(ref_t, k, batch_size, dtype)
    radii_sam = manifold_radii(sam_t, k, batch_size, dtype)
    ref_in = torch.zeros(len(ref_t), dtype=torch.bool, device=dev)
    sam_in = torch.zeros(len(sam_t), dtype=torch.bool, device=dev)
    for r0 in range(0, len(ref_t), batch_size):
        r1 = r0 + batch_size
        for s0 in range(0, len(sam_t), batch_size):
            s1 = s0 + batch_size
            dist = pairwise_sq_distances(ref_t[r0:r1], sam_t[s0:s1], dtype)
            ref_in[r0:r1] |= (dist <= radii_sam[None, s0:s1]).any(dim=1)
            sam_in[s0:s1] |= (dist <= radii_ref[r0:r1, None]).any(dim=0)
    return float(sam_in.double().mean()), float(ref_in.double().mean())
