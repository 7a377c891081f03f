"""CKNNA (repa_fast.analysis.cknna) against a transcription of the published definition (Huh
et al. 2024, ``cknna`` of minyoungg/platonic-rep's metrics.py; the unbiased HSIC of Song et
al. 2012, eq. 5), written here with plain loops and numpy, and its properties."""
import numpy as np
import pytest
import torch

from repa_fast.analysis.cknna import (KernelStats, cknna, hsic_biased, hsic_unbiased, knn_mask,
                                      prepare_features)


# ------------------------------------------------------------------ the transcription

def nearest(kernel: np.ndarray, k: int, unbiased: bool = True) -> np.ndarray:
    """mask[i, j] = 1 for the k columns j with the largest kernel[i, j] (j != i if unbiased)."""
    n = len(kernel)
    mask = np.zeros((n, n))
    for i in range(n):
        candidates = [j for j in range(n) if j != i or not unbiased]
        for j in sorted(candidates, key=lambda j: -kernel[i, j])[:k]:
            mask[i, j] = 1.0
    return mask


def hsic_song(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """HSIC_1 = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((m−1)(m−2)) − 2/(m−2)·1ᵀK̃L̃1] / (m(m−3))."""
    m = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(m)
    return float((np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((m - 1) * (m - 2))
                  - 2.0 / (m - 2) * (one @ kt @ lt @ one)) / (m * (m - 3)))


def hsic_centred(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """The biased HSIC, tr(K·H·L·H) with H = I − 11ᵀ/m."""
    h = np.eye(len(k)) - 1.0 / len(k)
    return float(np.trace(k @ h @ l @ h))


def transcribed(a: np.ndarray, b: np.ndarray, k: int, unbiased: bool = True,
                self_excluded: bool = True) -> float:
    """CKNNA = HSIC(M∘K, M∘L) / (√(HSIC(M_K∘K, M_K∘K)·HSIC(M_L∘L, M_L∘L)) + 1e-6), M = M_K∘M_L;
    ``self_excluded=False`` is a deliberately wrong variant (tests that the test can fail)."""
    hsic = hsic_song if unbiased else hsic_centred
    kk, ll = a @ a.T, b @ b.T
    mk = nearest(kk, k, unbiased and self_excluded)
    ml = nearest(ll, k, unbiased and self_excluded)
    m = mk * ml
    return hsic(m * kk, m * ll) / (np.sqrt(hsic(mk * kk, mk * kk) * hsic(ml * ll, ml * ll))
                                   + 1e-6)


def pair(n: int, d: int, e: int, seed: int, related: float = 1.0):
    """Features of one n inputs in two spaces, ``related`` mixing a shared part in."""
    g = np.random.default_rng(seed)
    shared = g.standard_normal((n, 8))
    a = shared @ g.standard_normal((8, d)) * related + g.standard_normal((n, d))
    b = shared @ g.standard_normal((8, e)) * related + g.standard_normal((n, e))
    return a, b


# ------------------------------------------------------------------ against the transcription

@pytest.mark.parametrize("n,d,e,k,seed", [(40, 16, 24, 10, 0), (73, 5, 40, 10, 1),
                                          (100, 32, 32, 10, 2), (60, 12, 20, 3, 3)])
def test_matches_the_transcription(n, d, e, k, seed):
    a, b = pair(n, d, e, seed)
    want = transcribed(a, b, k)
    got = cknna(torch.from_numpy(a).float(), torch.from_numpy(b).float(), topk=k).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert 0.1 < want < 1  # a related pair: far from both ends, so the comparison means much
    # the masked kernels are not symmetric, so neither is the reference: the order counts
    got_ba = cknna(torch.from_numpy(b), torch.from_numpy(a), topk=k).item()
    assert got_ba == pytest.approx(transcribed(b, a, k), rel=1e-9, abs=1e-12)


def test_matches_the_transcription_biased():
    a, b = pair(50, 10, 14, 4)
    got = cknna(torch.from_numpy(a), torch.from_numpy(b), topk=10, unbiased=False).item()
    assert got == pytest.approx(transcribed(a, b, 10, unbiased=False), rel=1e-9)


def test_hsic_pieces_match():
    g = np.random.default_rng(5)
    x, y = g.standard_normal((30, 6)), g.standard_normal((30, 9))
    k, l = x @ x.T, y @ y.T  # noqa: E741
    mask = nearest(k, 5) * nearest(l, 5)
    for kk, ll in [(k, l), (mask * k, mask * l)]:  # symmetric, and masked (not symmetric)
        got = hsic_unbiased(torch.from_numpy(kk), torch.from_numpy(ll)).item()
        assert got == pytest.approx(hsic_song(kk, ll), rel=1e-10)
        got = hsic_biased(torch.from_numpy(kk), torch.from_numpy(ll)).item()
        assert got == pytest.approx(hsic_centred(kk, ll), rel=1e-10)
    assert np.array_equal(knn_mask(torch.from_numpy(k), 5).numpy(), nearest(k, 5))


def test_prepare_features_matches_the_reference_pipeline():
    """Clamp at the exact 0.95 quantile of |x| (sorted value at int(q·numel)), unit rows."""
    g = np.random.default_rng(6)
    x = g.standard_normal((20, 7)) ** 3
    limit = np.sort(np.abs(x).ravel())[int(0.95 * x.size)]
    want = np.clip(x, -limit, limit)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = prepare_features(torch.from_numpy(x).float())
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    batched = prepare_features(torch.from_numpy(np.stack([x, 2 * x])), 0.95)
    np.testing.assert_allclose(batched[1].numpy(), want, rtol=1e-12)  # per set, scale-free
    np.testing.assert_allclose(prepare_features(torch.from_numpy(x), 1.0).numpy(),
                               x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-12)


def test_the_comparison_can_fail():
    """Variants a little off the definition land outside the tolerance used above."""
    a, b = pair(60, 16, 16, 7)
    got = cknna(torch.from_numpy(a), torch.from_numpy(b), topk=10).item()
    assert got != pytest.approx(transcribed(a, b, 9), rel=1e-3)
    assert got != pytest.approx(transcribed(a, b, 10, self_excluded=False), rel=1e-3)
    assert got != pytest.approx(transcribed(a, b, 10, unbiased=False), rel=1e-3)


# ------------------------------------------------------------------ properties

def test_one_for_the_same_features_up_to_rotation_and_scale():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(80, 24, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    for b in (a, a @ rotation, 7.5 * a @ rotation, 0.2 * a):
        assert cknna(a, b).item() == pytest.approx(1.0, abs=1e-4)


def test_near_zero_for_independent_features():
    g = torch.Generator().manual_seed(9)
    values = [cknna(torch.randn(500, 32, generator=g), torch.randn(500, 48, generator=g)).item()
              for _ in range(3)]
    assert max(abs(v) for v in values) < 0.05, values
    related = cknna(*map(torch.from_numpy, pair(500, 32, 48, 9))).item()
    assert related > 0.2  # the same test with shared structure is far from 0


def test_nearly_symmetric():
    a, b = map(torch.from_numpy, pair(200, 16, 40, 10))
    ab, ba = cknna(a, b).item(), cknna(b, a).item()
    assert ab == pytest.approx(ba, rel=0.02)


def test_batched_equals_one_at_a_time_and_reference_reuse():
    g = torch.Generator().manual_seed(11)
    sets = torch.randn(5, 50, 12, generator=g)
    target = sets[2] @ torch.randn(12, 20, generator=g) + torch.randn(50, 20, generator=g)
    batched = cknna(sets, target)
    assert batched.shape == (5,) and batched.dtype == torch.float64
    stats = KernelStats(target, 10)
    for i in range(5):
        assert batched[i].item() == pytest.approx(cknna(sets[i], target).item(), rel=1e-12)
        assert cknna(sets[i], None, reference=stats).item() == pytest.approx(
            batched[i].item(), rel=1e-12)
    assert int(batched.argmax()) == 2  # the related set stands out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_on_the_gpu():
    a, b = map(torch.from_numpy, pair(120, 16, 24, 12))
    assert cknna(a.cuda(), b.cuda()).item() == pytest.approx(cknna(a, b).item(), rel=1e-9)


@pytest.mark.parametrize("n,k,message", [(3, 2, "at least 4 samples"), (20, 1, "topk"),
                                         (20, 20, "between 2 and 19")])
def test_bad_sizes_are_refused(n, k, message):
    with pytest.raises(ValueError, match=message):
        cknna(torch.randn(n, 4), torch.randn(n, 4), topk=k)


def test_different_sample_counts_are_refused():
    with pytest.raises(ValueError, match="same samples"):
        cknna(torch.randn(20, 4), torch.randn(21, 4))
