"""Evaluator (FID, sFID, IS, precision/recall with ADM's definitions): maths against closed
forms and toy sets with known answers, input checks, torch-fidelity's Inception loaded from a
local file (random weights written here, so numbers from it mean nothing), and the CLI.

The Inception forward pass dominates the run time on a CPU (images are resized to 299), so
the image sets are small and one extractor memoises activations across tests.
"""
import hashlib
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("torch_fidelity")

import repa_fast  # noqa: E402
from repa_fast import evaluate as cli  # noqa: E402
from repa_fast.evaluation import (Activations, EvaluationInputError, FeatureStats,  # noqa: E402
                                  InceptionFeatureExtractor, compute_metrics, format_summary,
                                  frechet_distance, inception_score, manifold_radii,
                                  precision_recall, write_random_inception_weights)
from repa_fast.evaluation.cache import cache_path  # noqa: E402
from repa_fast.evaluation.features import NUM_LOGITS, POOL_DIM, SPATIAL_DIM  # noqa: E402
from repa_fast.evaluation.inception import (WEIGHTS_ENV, WEIGHTS_URL,  # noqa: E402
                                            resolve_weights_path)
from repa_fast.evaluation.metrics import pairwise_sq_distances  # noqa: E402
from repa_fast.evaluation.npz import ImageBatches  # noqa: E402

N_IMAGES = 8
BATCH = 4  # memo keys are batches: prefixes of a set (--num-samples) hit the memo too


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    t0 = time.perf_counter()
    write_random_inception_weights(path, seed=0)
    print(f"random Inception weights written in {time.perf_counter() - t0:.1f}s")
    return path


@pytest.fixture(scope="session")
def extractor(weights_file):
    t0 = time.perf_counter()
    ex = InceptionFeatureExtractor(weights_file, device="cpu")
    print(f"extractor built from the local file in {time.perf_counter() - t0:.1f}s")
    return ex


class MemoExtractor:
    """The session extractor, remembering activations per batch (keyed by its bytes), so
    the many pipeline tests pay for each Inception forward pass once."""

    def __init__(self, inner: InceptionFeatureExtractor):
        self.inner, self.memo = inner, {}
        self.device, self.weights_path = inner.device, inner.weights_path

    def __call__(self, images: np.ndarray) -> Activations:
        key = (images.shape, hashlib.sha1(images.tobytes()).hexdigest())
        if key not in self.memo:
            self.memo[key] = self.inner(images)
        return self.memo[key]

    def extract(self, batches, progress=None) -> Activations:
        return InceptionFeatureExtractor.extract(self, batches, progress)


@pytest.fixture(scope="session")
def memo(extractor):
    return MemoExtractor(extractor)


def make_images(seed: int, n: int = N_IMAGES, size: int = 32) -> np.ndarray:
    """Smooth random colour fields (more image-like than white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float64)
    up = coarse.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    return np.clip(up + rng.normal(0, 12, up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory):
    """Set A, B = A with brighter and inverted-channel pixels (a perturbed copy), their files."""
    folder = tmp_path_factory.mktemp("sets")
    a = make_images(1)
    b = np.clip(255 - a[..., ::-1].astype(np.int64) + 40, 0, 255).astype(np.uint8)
    paths = {"a": folder / "a.npz", "b": folder / "b.npz"}
    np.savez(paths["a"], arr_0=a, arr_1=np.arange(N_IMAGES))  # labels as ADM's samples have
    np.savez_compressed(paths["b"], arr_0=b)
    return {"a": a, "b": b, **{f"{k}_path": v for k, v in paths.items()}}


def run(samples, ref, memo, **kw):
    kw.setdefault("fid_method", "eigh")  # the sqrtm path is covered on small matrices + slow test
    kw.setdefault("batch_size", BATCH)
    return compute_metrics(samples, ref, extractor=memo, **kw)


# ---------------------------------------------------------------------------------------------
# Fréchet distance

def _diag_stats(mu, var):
    return FeatureStats(mu=np.asarray(mu, float), sigma=np.diag(np.asarray(var, float)))


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(method):
    # Diagonal covariances commute: d² = Σ (μ1-μ2)² + Σ (√v1 - √v2)².
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(_diag_stats(mu1, v1), _diag_stats(mu2, v2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_methods_agree_full_rank_and_low_rank():
    rng = np.random.default_rng(1)
    d = 24
    mix = rng.normal(size=(d, d))
    full_a = FeatureStats.from_activations(rng.normal(size=(300, d)) @ mix)
    full_b = FeatureStats.from_activations(rng.normal(size=(300, d)) @ mix.T + 0.3)
    assert full_a.factor is None  # n > d: no low-rank factor kept
    # n <= d: singular covariances, the case of small sample sets
    low_a = FeatureStats.from_activations(rng.normal(size=(10, d)))
    low_b = FeatureStats.from_activations(rng.normal(size=(8, d)) + 0.5)
    assert low_a.factor is not None and low_a.factor.shape == (10, d)
    np.testing.assert_allclose(low_a.factor.T @ low_a.factor, np.cov(
        np.sqrt(9) * low_a.factor + low_a.mu, rowvar=False), atol=1e-12)
    for a, b in [(full_a, full_b), (low_a, low_b), (low_a, full_b), (full_a, low_b)]:
        ref = frechet_distance(a, b, method="sqrtm")
        assert frechet_distance(a, b, method="eigh") == pytest.approx(ref, rel=1e-7)
        # the eigh route without factors (decomposing the full Σ) gives the same
        bare = [FeatureStats(s.mu, s.sigma) for s in (a, b)]
        assert frechet_distance(*bare, method="eigh") == pytest.approx(ref, rel=1e-7)


def test_frechet_distance_zero_for_itself_shift_and_symmetry():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    a = FeatureStats.from_activations(acts)
    shift = rng.normal(size=16)
    b = FeatureStats.from_activations(acts + shift)  # same covariance, moved mean
    c = FeatureStats.from_activations(acts * 1.5)
    for method in ("sqrtm", "eigh"):
        assert abs(frechet_distance(a, a, method=method)) < 1e-9
        assert frechet_distance(a, b, method=method) == pytest.approx(shift @ shift, rel=1e-8)
        assert frechet_distance(a, c, method=method) > 0.1
        assert frechet_distance(a, c, method=method) == pytest.approx(
            frechet_distance(c, a, method=method), rel=1e-9)


def test_frechet_distance_rejects_bad_covariances_and_shapes():
    a = _diag_stats([0, 0], [1, 1])
    not_psd = _diag_stats([0, 0], [1, -1])  # sqrtm(Σ1Σ2) has an imaginary diagonal
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(a, not_psd, method="sqrtm")
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(a, _diag_stats([0, 0, 0], [1, 1, 1]))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(a, a, method="svd")
    with pytest.raises(ValueError, match="at least 2 rows"):
        FeatureStats.from_activations(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------
# Inception Score

def _is_reference(logits, split_size):
    """ADM's formula written plainly: softmax, then per split exp(mean KL(p_i || p̄))."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_known_values():
    assert inception_score(np.zeros((20, NUM_LOGITS))) == pytest.approx(1.0, abs=1e-12)
    classes = 7
    confident = np.tile(60.0 * np.eye(classes), (3, 1))  # 21 predictions, 7 classes equally
    assert inception_score(confident) == pytest.approx(classes, rel=1e-9)
    # two splits of one class each: every split is certain and uniform over nothing → 1
    one_class = np.zeros((10, classes))
    one_class[:5, 0] = one_class[5:, 1] = 60
    assert inception_score(one_class, split_size=5) == pytest.approx(1.0, rel=1e-9)
    assert inception_score(one_class, split_size=10) == pytest.approx(2.0, rel=1e-9)


def test_inception_score_matches_adm_formula_with_a_short_last_split():
    logits = np.random.default_rng(3).normal(scale=3, size=(23, 11))
    assert inception_score(logits, split_size=7) == pytest.approx(_is_reference(logits, 7),
                                                                  rel=1e-12)
    with pytest.raises(ValueError, match="split_size"):
        inception_score(logits, split_size=0)


# ---------------------------------------------------------------------------------------------
# precision / recall

def _line(values, dim=8, scale=1.0):
    """Points on a line (first coordinate), embedded in ``dim`` dimensions."""
    x = np.zeros((len(values), dim), np.float32)
    x[:, 0] = np.asarray(values, np.float32) * scale
    return x


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("batch_size", [3, 10000])
def test_precision_recall_on_toy_sets_with_known_answers(dtype, batch_size):
    pr = partial(precision_recall, k=3, batch_size=batch_size, dtype=dtype)
    ten = _line(range(10))
    assert pr(ten, ten) == (1.0, 1.0)
    assert pr(ten, _line(range(1000, 1010))) == (0.0, 0.0)
    # samples 0..4 inside ref 0..9: all samples covered; sample 3-NN radii are 3,2,2,2,3, so
    # their balls reach ref points 0..7 only → recall 8/10
    assert pr(ten, _line(range(5))) == (1.0, 0.8)
    # 4 of 14 samples far away: precision 10/14; every ref point is a sample → recall 1
    assert pr(ten, _line(list(range(10)) + [500, 501, 502, 503])) == (pytest.approx(10 / 14), 1.0)


def test_precision_recall_float16_falls_back_to_float32_on_overflow():
    big = _line(range(10), scale=1000.0)  # squared distances up to 8.1e7 > float16's 65504
    d16 = pairwise_sq_distances(torch.from_numpy(big), torch.from_numpy(big), "float16")
    d32 = pairwise_sq_distances(torch.from_numpy(big), torch.from_numpy(big), "float32")
    assert torch.isfinite(d16).all() and torch.equal(d16, d32)
    assert precision_recall(big, _line(range(5), scale=1000.0)) == (1.0, 0.8)


def test_float16_distances_round_as_adms_graph():
    """ADM: U, V cast to half; squares (half), row sums (float32 accumulation, half result),
    U·Vᵀ (float32 accumulation, half result), then norm_u − 2·UVᵀ + norm_v in half. Short
    rows of values in [0.5, 3) keep every float32 sum exact, so any order gives the same; the
    rounding of the squares changes about one norm in six here."""
    rng = np.random.default_rng(4)
    u = rng.uniform(0.5, 3, size=(40, 4)).astype(np.float32)
    v = rng.uniform(0.5, 3, size=(30, 4)).astype(np.float32)
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = (u16 * u16).sum(1, dtype=np.float32).astype(np.float16)
    norm_v = (v16 * v16).sum(1, dtype=np.float32).astype(np.float16)
    dots = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    expected = np.maximum(norm_u[:, None] - np.float16(2) * dots + norm_v[None, :], 0)
    got = pairwise_sq_distances(torch.from_numpy(u), torch.from_numpy(v), "float16")
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


def test_manifold_radii_and_argument_checks():
    radii = manifold_radii(torch.from_numpy(_line(range(5))), k=3, dtype="float32")
    assert radii.tolist() == [9.0, 4.0, 4.0, 4.0, 9.0]  # squared 3rd-neighbour distances
    with pytest.raises(ValueError, match="more than 3"):
        manifold_radii(torch.from_numpy(_line(range(3))), k=3)
    with pytest.raises(ValueError, match="equal width"):
        precision_recall(_line(range(5), dim=4), _line(range(5), dim=5))


# ---------------------------------------------------------------------------------------------
# reading and checking .npz input (none of this needs the Inception weights)

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_streamed_batches_equal_the_array(tmp_path, save):
    images = make_images(5, n=11, size=8)
    save(tmp_path / "x.npz", arr_0=images)
    batches = list(ImageBatches(tmp_path / "x.npz", "--samples").batches(4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    limited = list(ImageBatches(tmp_path / "x.npz", "--samples").batches(4, limit=6))
    np.testing.assert_array_equal(np.concatenate(limited), images[:6])
    # Fortran order is not streamed but still read right
    np.savez(tmp_path / "f.npz", arr_0=np.asfortranarray(images))
    np.testing.assert_array_equal(np.concatenate(list(
        ImageBatches(tmp_path / "f.npz", "--samples").batches(5))), images)


def _input_error(tmp_path, samples, match, ref=None, **kw):
    """compute_metrics must fail on the input (matching ``match``) before it looks for the
    weights: the weights path given here does not exist."""
    if ref is None:
        ref = tmp_path / "ok_ref.npz"
        np.savez(ref, arr_0=make_images(0, n=4, size=8))
    with pytest.raises(EvaluationInputError, match=match) as info:
        compute_metrics(samples, ref, weights=tmp_path / "no-weights.pth", device="cpu", **kw)
    assert "no-weights.pth" not in str(info.value)
    return str(info.value)


def test_bad_image_arrays_are_named_with_expected_and_given(tmp_path):
    cases = {
        "float": (np.zeros((4, 8, 8, 3), np.float32), r"--samples.*uint8.*float32"),
        "gray": (np.zeros((4, 8, 8), np.uint8), r"--samples.*N×H×W×3.*\(4, 8, 8\)"),
        "chw": (np.zeros((4, 3, 8, 8), np.uint8), r"channels first"),
        "empty": (np.zeros((0, 8, 8, 3), np.uint8), r"non-empty"),
        "object": (np.empty((4, 8, 8, 3), object), r"--samples.*uint8.*got object"),
    }
    for name, (array, pattern) in cases.items():
        np.savez(tmp_path / f"{name}.npz", arr_0=array)
        _input_error(tmp_path, tmp_path / f"{name}.npz", match=pattern)
        _input_error(tmp_path, array, match=pattern)  # the in-memory path checks the same
    np.savez(tmp_path / "ref_float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float64))
    _input_error(tmp_path, tmp_path / "ok_ref.npz", ref=tmp_path / "ref_float.npz",
                 match=r"--ref.*float64")


def test_missing_files_keys_and_bad_statistics(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=make_images(0, n=4, size=8))
    msg = _input_error(tmp_path, tmp_path / "nope.npz", match="--samples: file not found")
    assert str(tmp_path / "nope.npz") in msg
    _input_error(tmp_path, good, ref=tmp_path / "nope_ref.npz", match="--ref: file not found")
    (tmp_path / "text.npz").write_text("not a zip")
    _input_error(tmp_path, tmp_path / "text.npz", match="expected a .npz file")
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(4))
    _input_error(tmp_path, tmp_path / "labels.npz", match=r"no 'arr_0'.*\['arr_1'\]")
    # reference: neither images nor statistics, half a pair, wrong shapes
    _input_error(tmp_path, good, ref=tmp_path / "labels.npz", match="neither images")
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(POOL_DIM))
    _input_error(tmp_path, good, ref=tmp_path / "mu_only.npz", match="'mu' but not 'sigma'")
    np.savez(tmp_path / "small.npz", mu=np.zeros(10), sigma=np.eye(10))
    _input_error(tmp_path, good, ref=tmp_path / "small.npz", match=r"\(2048,\).*got \(10,\)")


def test_sample_counts_and_settings(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, arr_0=make_images(0, n=6, size=8))
    _input_error(tmp_path, path, match=r"--num-samples: asked for 10.*only 6", num_samples=10)
    _input_error(tmp_path, path, match=r"--exact-count: expected exactly.*4.*has 6",
                 num_samples=4, exact_count=True)
    _input_error(tmp_path, path, match="--exact-count: needs --num-samples", exact_count=True)
    _input_error(tmp_path, path, match="--batch-size", batch_size=0)
    _input_error(tmp_path, path, match="--fid-method", fid_method="exact")
    np.savez(tmp_path / "one.npz", arr_0=make_images(0, n=1, size=8))
    _input_error(tmp_path, tmp_path / "one.npz", match="at least 2 images")


# ---------------------------------------------------------------------------------------------
# Inception weights from a local file

def test_weights_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    assert WEIGHTS_URL == URL_INCEPTION_V3


def test_missing_weights_name_the_file_and_the_url(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    missing = tmp_path / "absent.pth"
    with pytest.raises(EvaluationInputError) as info:
        InceptionFeatureExtractor(missing, device="cpu")
    assert str(missing) in str(info.value) and WEIGHTS_URL in str(info.value)
    assert "--inception-weights" in str(info.value)
    monkeypatch.chdir(tmp_path)  # the default path is relative: ckpts/pt_inception-...pth
    with pytest.raises(EvaluationInputError, match="pt_inception-2015-12-05-6726825d.pth"):
        resolve_weights_path(None)
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(EvaluationInputError, match=WEIGHTS_ENV):
        resolve_weights_path(None)
    missing.write_bytes(b"")
    assert resolve_weights_path(None) == missing


def test_weights_that_are_not_an_inception_state_dict(tmp_path):
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(EvaluationInputError, match=r"text.pth is a text file \(starting "
                                                   r"'hello'\), not a PyTorch state dict"):
        InceptionFeatureExtractor(tmp_path / "text.pth", device="cpu")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(EvaluationInputError, match="does not fit torch-fidelity's Inception"):
        InceptionFeatureExtractor(tmp_path / "wrong.pth", device="cpu")
    with pytest.raises(EvaluationInputError, match="--device"):
        InceptionFeatureExtractor(tmp_path / "wrong.pth", device="tpu")


def test_extractor_holds_the_weights_from_the_file(extractor, weights_file):
    saved = torch.load(weights_file, weights_only=True)
    loaded = extractor.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k].cpu()) for k in saved)
    assert extractor.weights_path == weights_file


def test_activations_shapes_logits_and_spatial_layout(extractor, image_sets):
    images = image_sets["a"][:2]
    hooked = {}
    handle = extractor.model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: hooked.setdefault("out", output.clone()))
    try:
        acts = extractor(images)
    finally:
        handle.remove()
    assert acts.pool.shape == (2, POOL_DIM) and acts.spatial.shape == (2, SPATIAL_DIM)
    assert acts.logits.shape == (2, NUM_LOGITS) and acts.pool.dtype == np.float32
    assert np.isfinite(acts.pool).all() and acts.pool.std(0).mean() > 0
    # ADM's IS logits: pool_3 · W without the bias
    fc = extractor.model.fc
    unbiased = acts.pool @ fc.weight.detach().numpy().T
    np.testing.assert_allclose(acts.logits, unbiased, rtol=1e-4, atol=1e-5)
    assert not np.allclose(acts.logits, unbiased + fc.bias.detach().numpy())
    # mixed_6/conv: 192×17×17 ReLU output, channels 0-6, flattened as H, W, C (TensorFlow)
    out = hooked["out"]
    assert out.shape == (2, 192, 17, 17)
    np.testing.assert_array_equal(acts.spatial.reshape(2, 17, 17, 7),
                                  out[:, :7].permute(0, 2, 3, 1).numpy())
    # batching does not change the activations
    parts = extractor.extract([images[:1], images[1:]])
    for name in ("pool", "spatial", "logits"):
        np.testing.assert_allclose(getattr(parts, name), getattr(acts, name), rtol=1e-4,
                                   atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the pipeline (random-weight Inception; only relations between results are meaningful)

def test_fid_of_a_set_against_itself_and_a_perturbed_copy(memo, image_sets):
    same = run(image_sets["a_path"], image_sets["a_path"], memo)
    assert abs(same["fid"]) < 1e-8 and abs(same["sfid"]) < 1e-8
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["inception_score"] >= 1.0 and same["not_computed"] == {}
    ab = run(image_sets["a_path"], image_sets["b_path"], memo)
    ba = run(image_sets["b_path"], image_sets["a_path"], memo)
    assert ab["fid"] > 1e-3 and ab["sfid"] > 1e-3
    assert ab["fid"] == pytest.approx(ba["fid"], rel=1e-6)
    assert ab["sfid"] == pytest.approx(ba["sfid"], rel=1e-6)
    assert ab["num_samples"] == ab["num_ref_images"] == N_IMAGES
    assert ab["device"] == "cpu" and ab["inception_weights"] == str(memo.weights_path)
    # the in-memory API gives the same
    arrays = run(image_sets["a"], image_sets["b"], memo)
    assert arrays["fid"] == ab["fid"] and arrays["recall"] == ab["recall"]
    line = format_summary(ab)
    assert line.startswith("FID ") and f"({N_IMAGES} samples vs ref b.npz)" in line


def test_stored_reference_statistics_give_the_same_fid(memo, image_sets, tmp_path):
    ref_acts = memo.extract(ImageBatches(image_sets["a"], "ref").batches(BATCH))  # as the pipeline
    pool = FeatureStats.from_activations(ref_acts.pool)
    spatial = FeatureStats.from_activations(ref_acts.spatial)
    stats = dict(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    np.savez(tmp_path / "stats_only.npz", **stats)
    np.savez(tmp_path / "stats_and_images.npz", arr_0=image_sets["a"], **stats)

    from_images = run(image_sets["b_path"], image_sets["a_path"], memo)
    from_stats = run(image_sets["b_path"], tmp_path / "stats_only.npz", memo)
    both = run(image_sets["b_path"], tmp_path / "stats_and_images.npz", memo)
    for result in (from_stats, both):
        assert result["fid"] == pytest.approx(from_images["fid"], rel=1e-6)
        assert result["sfid"] == pytest.approx(from_images["sfid"], rel=1e-6)
        assert result["reference_statistics"]["pool"].startswith("stored")
        assert result["inception_score"] == from_images["inception_score"]
    assert from_images["reference_statistics"]["pool"].startswith(f"computed from {N_IMAGES}")
    assert from_stats["precision"] is None and from_stats["recall"] is None
    assert "reference images" in from_stats["not_computed"]["precision"]
    assert from_stats["num_ref_images"] is None
    assert both["precision"] == from_images["precision"] and both["not_computed"] == {}
    assert "stored stats" in format_summary(from_stats) and "n/a" in format_summary(from_stats)

    # pool statistics only, no images: sFID cannot be computed either
    np.savez(tmp_path / "pool_only.npz", mu=pool.mu, sigma=pool.sigma)
    pool_only = run(image_sets["b_path"], tmp_path / "pool_only.npz", memo)
    assert pool_only["fid"] == pytest.approx(from_images["fid"], rel=1e-6)
    assert pool_only["sfid"] is None and "mu_s" in pool_only["not_computed"]["sfid"]


def test_num_samples_takes_the_first_samples(memo, image_sets):
    result = run(image_sets["a_path"], image_sets["b_path"], memo, num_samples=BATCH)
    assert result["num_samples"] == BATCH and result["num_samples_in_file"] == N_IMAGES
    exact = run(image_sets["a_path"], image_sets["b_path"], memo, num_samples=N_IMAGES,
                exact_count=True)
    assert exact["num_samples"] == N_IMAGES


def test_activation_cache_is_reused_and_invalidated(memo, image_sets, tmp_path):
    path = tmp_path / "cached.npz"
    np.savez(path, arr_0=image_sets["a"])
    first = run(path, image_sets["b_path"], memo, cache=True)
    assert first["activations"]["samples"] == "computed" and cache_path(path).is_file()
    assert cache_path(path).name == "cached.inception-acts.npz"
    again = run(path, image_sets["b_path"], memo, cache=True)
    assert again["activations"]["samples"] == "cache" and again["fid"] == first["fid"]
    assert run(path, image_sets["b_path"], memo, cache=True,
               num_samples=BATCH)["activations"]["samples"] == "cache"
    np.savez(path, arr_0=image_sets["b"])  # new content: the cache no longer matches
    os.utime(path, ns=(1, 1))
    changed = run(path, image_sets["b_path"], memo, cache=True)
    assert changed["activations"]["samples"] == "computed" and abs(changed["fid"]) < 1e-8


# ---------------------------------------------------------------------------------------------
# command line

def _cli_env():
    """The subprocess imports the same repa_fast as this test (installed copy or checkout)."""
    env = {k: v for k, v in os.environ.items() if k != WEIGHTS_ENV}
    package_parent = str(Path(repa_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def test_cli_end_to_end_writes_json(weights_file, tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=make_images(7, n=4))
    np.savez(tmp_path / "r.npz", arr_0=make_images(8, n=5))
    out = tmp_path / "out" / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "repa_fast.evaluate", "--samples", str(tmp_path / "s.npz"),
         "--ref", str(tmp_path / "r.npz"), "--inception-weights", str(weights_file),
         "--out", str(out), "--device", "cpu", "--batch-size", "5", "--fid-method", "eigh"],
        cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert isinstance(result[key], float), key
    assert result["num_samples"] == 4 and result["num_ref_images"] == 5
    assert result["inception_weights"] == str(weights_file) and result["device"] == "cpu"
    assert "FID " in proc.stdout and "(4 samples vs ref r.npz)" in proc.stdout


def test_cli_exit_code_2_on_bad_input_in_a_subprocess(tmp_path):
    np.savez(tmp_path / "good.npz", arr_0=make_images(7, n=4, size=8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    proc = subprocess.run([sys.executable, "-m", "repa_fast.evaluate", "--samples", "float.npz",
                           "--ref", "good.npz", "--device", "cpu"],
                          cwd=tmp_path, env=_cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "--samples: 'arr_0' in float.npz must be uint8" in proc.stderr
    assert "got float32" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("case", ["missing_weights", "missing_ref", "too_few", "bad_device"])
def test_cli_main_returns_2_on_bad_input(case, tmp_path, weights_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.savez("good.npz", arr_0=make_images(7, n=4, size=8))
    args = {"missing_weights": ["--samples", "good.npz", "--ref", "good.npz",
                                "--inception-weights", "nowhere/w.pth"],
            "missing_ref": ["--samples", "good.npz", "--ref", "absent.npz"],
            "too_few": ["--samples", "good.npz", "--ref", "good.npz", "--num-samples", "50000"],
            "bad_device": ["--samples", "good.npz", "--ref", "good.npz", "--device", "gpu0",
                           "--inception-weights", str(weights_file)]}[case]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    expected = {"missing_weights": [WEIGHTS_URL, "nowhere/w.pth", "--inception-weights"],
                "missing_ref": ["--ref: file not found", "absent.npz"],
                "too_few": ["--num-samples: asked for 50000", "only 4"],
                "bad_device": ["--device", "gpu0"]}[case]
    for text in expected:
        assert text in err
    with pytest.raises(SystemExit) as info:  # argparse: usage errors exit 2 as well
        cli.main(["--samples", "good.npz"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--samples", "good.npz", "--ref", "good.npz", "--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err


def test_cli_prints_json_to_stdout_without_out(memo, image_sets, monkeypatch, capsys):
    # In process, with the memoised extractor, to test the stdout path cheaply.
    monkeypatch.setattr(cli, "compute_metrics", partial(compute_metrics, extractor=memo))
    code = cli.main(["--samples", str(image_sets["a_path"]), "--ref", str(image_sets["b_path"]),
                     "--fid-method", "eigh", "--batch-size", str(BATCH), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["num_samples"] == N_IMAGES and result["fid"] > 0
    assert captured.err.startswith("FID ")


# ---------------------------------------------------------------------------------------------
# slow: ADM's scipy sqrtm on the full 2048 / 2023-dimensional covariances

@pytest.mark.slow
def test_sqrtm_and_eigh_agree_on_real_sized_covariances(memo, image_sets):
    sqrtm = run(image_sets["a_path"], image_sets["b_path"], memo, fid_method="sqrtm")
    eigh = run(image_sets["a_path"], image_sets["b_path"], memo, fid_method="eigh")
    assert sqrtm["fid"] == pytest.approx(eigh["fid"], rel=1e-4)
    assert sqrtm["sfid"] == pytest.approx(eigh["sfid"], rel=1e-4)
