"""``compute_metrics``: samples + reference → FID, sFID, IS, precision, recall (ADM's recipe).

Order of work: check every input (headers, keys, counts, settings) before loading the
Inception weights, so a bad call fails in a second; then the activations of the samples and
of the reference images; then the metrics. Statistics stored in the reference (``mu``/
``sigma``, ``mu_s``/``sigma_s``) are used instead of statistics of its images, as ADM does;
precision/recall always need the reference images (``arr_0``).
"""
from __future__ import annotations

import importlib.metadata
import os
import time
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..version import __version__
from .cache import load_cached, save_cached
from .errors import EvaluationInputError
from .features import Activations
from .inception import InceptionFeatureExtractor, resolve_device, sha256_file
from .metrics import (DISTANCE_DTYPES, FID_METHODS, FeatureStats, frechet_distance,
                      inception_score, precision_recall)
from .npz import IMAGES_KEY, ImageBatches, PathLike, npz_keys, read_reference_stats

ImageSource = Union[PathLike, np.ndarray]
Log = Callable[[str], None]

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise EvaluationInputError(f"{name}: expected a positive integer, got {value!r}")


def _progress(log: Log, label: str, total: int) -> Callable[[int], None]:
    """A callback that logs at every further tenth of ``total`` images."""
    next_mark = [max(1, total // 10)]

    def report(done: int) -> None:
        if done >= next_mark[0] or done == total:
            log(f"  {label}: {done}/{total} images")
            while next_mark[0] <= done:
                next_mark[0] += max(1, total // 10)
    return report


def _activations(images: ImageBatches, count: int, extractor: InceptionFeatureExtractor,
                 batch_size: int, use_cache: bool, weights_sha: Optional[str], log: Log,
                 label: str) -> tuple[Activations, str]:
    """Activations of the first ``count`` images and where they came from."""
    if use_cache and images.path is not None and weights_sha is not None:
        cached = load_cached(images.path, weights_sha, count)
        if cached is not None:
            log(f"{label}: {count} activations from the cache beside {images.path.name}")
            return cached, "cache"
    log(f"{label}: Inception activations of {count} images ({images.name}, "
        f"{images.shape[1]}×{images.shape[2]}) on {extractor.device}, batch {batch_size}")
    acts = extractor.extract(images.batches(batch_size, count), _progress(log, label, count))
    if use_cache and images.path is not None and weights_sha is not None:
        log(f"{label}: cached at {save_cached(images.path, weights_sha, acts)}")
    return acts, "computed"


def compute_metrics(samples: ImageSource, ref: ImageSource, *,
                    extractor: Optional[InceptionFeatureExtractor] = None,
                    weights: Optional[PathLike] = None,
                    device: Union[str, torch.device, None] = None,
                    batch_size: int = 128,
                    num_samples: Optional[int] = None,
                    exact_count: bool = False,
                    fid_method: str = "sqrtm",
                    is_split_size: int = 5000,
                    pr_k: int = 3,
                    pr_batch_size: int = 10000,
                    pr_distance_dtype: str = "float16",
                    cache: bool = False,
                    log: Optional[Log] = None) -> dict:
    """FID, sFID, Inception Score, precision and recall of ``samples`` against ``ref``.

    ``samples``: ``.npz`` path with ``arr_0`` (uint8 N×H×W×3) or such an array.
    ``ref``: ``.npz`` path with ``arr_0`` and/or stored ``mu``, ``sigma``, ``mu_s``,
    ``sigma_s``, or an image array.
    ``extractor``: a loaded :class:`InceptionFeatureExtractor` to reuse (then ``weights``
    and ``device`` are its own); otherwise one is built from ``weights`` on ``device``
    (``None``: CUDA if available).
    ``num_samples``: use the first ``num_samples`` samples (an error if there are fewer;
    with ``exact_count`` also if there are more).
    ``fid_method``: ``"sqrtm"`` (ADM) or ``"eigh"`` (see :func:`.metrics.frechet_distance`).
    ``is_split_size``, ``pr_k``, ``pr_batch_size``, ``pr_distance_dtype``: ADM's IS splits
    and ``ManifoldEstimator`` settings (5000, 3, 10000, float16 distances).
    ``cache``: reuse/write activations beside each ``.npz`` (:mod:`.cache`).

    Returns a JSON-ready dict: the five metrics (``None`` when not computed, with the reason
    under ``not_computed``), counts, where each statistic came from, settings and versions.
    """
    log = log or (lambda message: None)
    started = time.perf_counter()
    for name, value in (("--batch-size", batch_size), ("--num-samples", num_samples),
                        ("is_split_size", is_split_size), ("pr_k", pr_k),
                        ("pr_batch_size", pr_batch_size)):
        _positive(name, value)
    if fid_method not in FID_METHODS:
        raise EvaluationInputError(f"--fid-method: expected one of {FID_METHODS}, got "
                                   f"{fid_method!r}")
    if pr_distance_dtype not in DISTANCE_DTYPES:
        raise EvaluationInputError(f"--pr-distance-dtype: expected one of {DISTANCE_DTYPES}, "
                                   f"got {pr_distance_dtype!r}")
    if exact_count and num_samples is None:
        raise EvaluationInputError("--exact-count: needs --num-samples N (the exact count to "
                                   "require)")

    sample_images = ImageBatches(samples, "--samples")
    n_samples = len(sample_images)
    if num_samples is not None:
        if n_samples < num_samples:
            raise EvaluationInputError(
                f"--num-samples: asked for {num_samples} samples, but --samples "
                f"({sample_images.name}) has only {n_samples}")
        if exact_count and n_samples != num_samples:
            raise EvaluationInputError(
                f"--exact-count: expected exactly --num-samples {num_samples} samples, but "
                f"--samples ({sample_images.name}) has {n_samples}")
        n_samples = num_samples
    if n_samples < 2:
        raise EvaluationInputError(f"--samples: needs at least 2 images for a covariance, got "
                                   f"{n_samples}")

    stored: dict[str, FeatureStats] = {}
    if isinstance(ref, np.ndarray):
        ref_images: Optional[ImageBatches] = ImageBatches(ref, "--ref")
    else:
        keys = npz_keys(ref, "--ref")
        stored = read_reference_stats(ref, "--ref")
        ref_images = ImageBatches(ref, "--ref") if IMAGES_KEY in keys else None
        if ref_images is None and "pool" not in stored:
            raise EvaluationInputError(
                f"--ref: {ref} has neither images ('{IMAGES_KEY}') nor pool statistics "
                f"('mu' and 'sigma'); its keys are {keys}")
    if ref_images is not None and len(ref_images) < 2 and not {"pool", "spatial"} <= set(stored):
        raise EvaluationInputError(f"--ref: needs at least 2 images for a covariance, got "
                                   f"{len(ref_images)}")

    if extractor is None:
        extractor = InceptionFeatureExtractor(weights, resolve_device(device))
    weights_sha = sha256_file(extractor.weights_path) if cache else None

    sample_acts, sample_source = _activations(sample_images, n_samples, extractor, batch_size,
                                              cache, weights_sha, log, "samples")
    ref_acts, ref_source = None, None
    if ref_images is not None:
        ref_acts, ref_source = _activations(ref_images, len(ref_images), extractor, batch_size,
                                            cache, weights_sha, log, "reference")

    results: dict[str, Optional[float]] = {m: None for m in METRICS}
    not_computed: dict[str, str] = {}
    ref_statistics: dict[str, str] = {}
    t_metrics = time.perf_counter()

    for kind, metric, mu_key, sigma_key in (("pool", "fid", "mu", "sigma"),
                                           ("spatial", "sfid", "mu_s", "sigma_s")):
        if kind in stored:
            ref_stats = stored[kind]
            ref_statistics[kind] = f"stored in the reference file ({mu_key}, {sigma_key})"
        elif ref_acts is not None:
            ref_stats = FeatureStats.from_activations(getattr(ref_acts, kind))
            ref_statistics[kind] = f"computed from {len(ref_acts)} reference images"
        else:
            not_computed[metric] = (f"the reference has no '{mu_key}'/'{sigma_key}' statistics "
                                    f"and no images ('{IMAGES_KEY}') to compute them from")
            continue
        log(f"{metric}: Fréchet distance ({fid_method}), reference statistics "
            f"{ref_statistics[kind]}")
        sample_stats = FeatureStats.from_activations(getattr(sample_acts, kind))
        results[metric] = frechet_distance(sample_stats, ref_stats, method=fid_method)

    results["inception_score"] = inception_score(sample_acts.logits, split_size=is_split_size)

    if ref_acts is None:
        reason = (f"precision/recall need the reference images ('{IMAGES_KEY}'); the reference "
                  "holds statistics only")
        not_computed["precision"] = not_computed["recall"] = reason
    elif min(len(ref_acts), len(sample_acts)) <= pr_k:
        reason = (f"precision/recall with k={pr_k} need more than {pr_k} images on each side, got "
                  f"{len(sample_acts)} samples and {len(ref_acts)} reference images")
        not_computed["precision"] = not_computed["recall"] = reason
    else:
        log(f"precision/recall: k={pr_k}, {pr_distance_dtype} distances on {extractor.device}")
        results["precision"], results["recall"] = precision_recall(
            ref_acts.pool, sample_acts.pool, k=pr_k, batch_size=pr_batch_size,
            dtype=pr_distance_dtype, device=extractor.device)

    return {
        **results,
        "not_computed": not_computed,
        "num_samples": len(sample_acts),
        "num_samples_in_file": len(sample_images),
        "num_ref_images": None if ref_acts is None else len(ref_acts),
        "samples": "<array>" if isinstance(samples, np.ndarray) else os.fspath(samples),
        "ref": "<array>" if isinstance(ref, np.ndarray) else os.fspath(ref),
        "reference_statistics": ref_statistics,
        "activations": {"samples": sample_source, "reference": ref_source},
        "inception_weights": os.fspath(extractor.weights_path),
        "device": str(extractor.device),
        "settings": {"batch_size": batch_size, "fid_method": fid_method,
                     "is_split_size": is_split_size, "is_logits": "logits_unbiased (no bias)",
                     "pr_k": pr_k, "pr_batch_size": pr_batch_size,
                     "pr_distance_dtype": pr_distance_dtype},
        "versions": {"repa_fast": __version__, "torch": torch.__version__,
                     "torch_fidelity": _version("torch-fidelity"), "scipy": _version("scipy"),
                     "numpy": np.__version__},
        "seconds": {"total": round(time.perf_counter() - started, 3),
                    "metrics": round(time.perf_counter() - t_metrics, 3)},
    }


def format_summary(result: dict) -> str:
    """One line: ``FID 2.06  sFID 4.50  IS 274.3  precision 0.82  recall 0.59  (50000 samples
    vs ref VIRTUAL_imagenet256_labeled.npz)``; ``n/a`` for a metric not computed."""
    def fmt(value: Optional[float], spec: str) -> str:
        # round(...) + 0.0 turns a round-off -1e-12 into "0.00", not "-0.00"
        return "n/a" if value is None else format(round(value, 4) + 0.0, spec)
    ref = os.path.basename(result["ref"])
    stored = " stored stats" if any(v.startswith("stored") for v in
                                    result["reference_statistics"].values()) else ""
    return (f"FID {fmt(result['fid'], '.2f')}  sFID {fmt(result['sfid'], '.2f')}  "
            f"IS {fmt(result['inception_score'], '.1f')}  "
            f"precision {fmt(result['precision'], '.2f')}  recall {fmt(result['recall'], '.2f')}"
            f"  ({result['num_samples']} samples vs ref {ref}{stored})")
