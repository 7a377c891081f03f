"""Evaluator pieces: Fréchet distance (ADM's scipy ``sqrtm`` vs the ``eigh`` route), precision/
recall distances (float16 as ADM vs float32) and the Inception forward pass (images/s).

GPU machine: the real sizes (2048-dim covariances from 50 000 activations; 10 000 reference vs
10 000 sample features; batch 200 of 256px images). CPU: small sizes so the suite always runs;
those numbers say nothing about a real evaluation. The Inception weights are random (written
to a temporary file), which does not change the speed.
"""
import numpy as np
import pytest
import torch

from bench_utils import DEVICE, ON_GPU, timed

pytest.importorskip("scipy")
pytest.importorskip("torch_fidelity")

from repa_fast.evaluation import (FeatureStats, InceptionFeatureExtractor,  # noqa: E402
                                  frechet_distance, precision_recall,
                                  write_random_inception_weights)

DIM = 2048 if ON_GPU else 256           # sqrtm of 2048² takes ~20 s on a 2-core CPU
N_STATS = 50000 if ON_GPU else 2000
N_PR = 10000 if ON_GPU else 1000
IMAGES, SIZE = (200, 256) if ON_GPU else (4, 64)


@pytest.fixture(scope="module")
def stats_pair():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)
    a = rng.normal(size=(N_STATS, DIM)).astype(np.float32) @ mix.astype(np.float32)
    b = a[: N_STATS // 2] * 1.1 + 0.05
    return FeatureStats.from_activations(a), FeatureStats.from_activations(b)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance(benchmark, stats_pair, method):
    timed(benchmark, lambda: frechet_distance(*stats_pair, method=method), rounds=3, warmup=1)
    benchmark.extra_info.update(dim=DIM, method=method)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_precision_recall(benchmark, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ref = torch.randn(N_PR, 2048, device=DEVICE, generator=gen).relu()
    samples = torch.randn(N_PR, 2048, device=DEVICE, generator=gen).relu() * 1.05
    timed(benchmark, lambda: precision_recall(ref, samples, dtype=dtype, device=DEVICE),
          rounds=3, warmup=1)
    benchmark.extra_info.update(n_ref=N_PR, n_samples=N_PR, dtype=dtype)


def test_inception_forward(benchmark, tmp_path_factory):
    weights = write_random_inception_weights(tmp_path_factory.mktemp("w") / "random.pth")
    extractor = InceptionFeatureExtractor(weights, device=DEVICE)
    images = np.random.default_rng(0).integers(0, 256, (IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    timed(benchmark, lambda: extractor(images), rounds=3, warmup=1)
    benchmark.extra_info.update(images=IMAGES, size=SIZE,
                                images_per_s=IMAGES / benchmark.stats.stats.median)
