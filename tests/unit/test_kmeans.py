import faiss
import numpy as np
import pytest

from rdistill.algo.kmeans import (
    LocalShards,
    _rowwise_dot,
    fit_kmeans,
    kmeanspp,
    merge_costs,
    nearest_centroid,
    pca_project,
    split_gains,
)
from rdistill.dev.planted import make_concepts, sample_pairs


def sse(x, c):
    _, d = nearest_centroid(x, c)
    return float(d.sum(dtype=np.float64))


@pytest.fixture(scope="module")
def planted_images():
    concepts = make_concepts(40, 64, seed=5)
    return sample_pairs(concepts, 8000, seed=6).img_emb


def test_fit_kmeans_at_least_as_good_as_faiss(planted_images):
    x, k = planted_images, 40
    ref = faiss.Kmeans(x.shape[1], k, niter=20, seed=1, nredo=1)
    ref.train(x)
    centroids, stats = fit_kmeans(x, k, seed=1)
    assert centroids.shape == (k, x.shape[1]) and centroids.dtype == np.float32
    assert sse(x, centroids) <= sse(x, ref.centroids) * 1.001
    assert stats.sse_final <= stats.sse_lloyd * (1 + 1e-6)
    assert abs(stats.sse_final - sse(x, centroids)) < 1e-3 * stats.sse_final


def test_refinement_only_lowers_sse(planted_images):
    plain, s0 = fit_kmeans(planted_images, 40, init="random", refine_rounds=0, seed=2)
    refined, s1 = fit_kmeans(planted_images, 40, init="random", refine_rounds=8, seed=2)
    assert s0.sse_final == pytest.approx(s1.sse_lloyd)
    assert s1.sse_final < s0.sse_final
    assert s1.refine_moves > 0


def test_kmeanspp_picks_distinct_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    seeds = kmeanspp(x, 50, rng)
    assert seeds.shape == (50,) and len(set(seeds.tolist())) == 50 and seeds.max() < 500


def test_kmeanspp_spreads_seeds_over_separated_blobs():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 16)).astype(np.float32) * 10
    sizes = [400, 200, 100, 50, 20, 10]  # heavy-tailed: plain random seeding would miss the small blobs
    x = np.concatenate([c + rng.standard_normal((s, 16)).astype(np.float32) * 0.1 for c, s in zip(centres, sizes)])
    blob = np.repeat(np.arange(6), sizes)
    assert sorted(blob[kmeanspp(x, 6, rng)].tolist()) == list(range(6))


def test_pca_projection_keeps_the_top_components():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, 5)) * [10, 5, 1, 0.1, 0.1]).astype(np.float32) @ np.linalg.qr(
        rng.standard_normal((5, 5))
    )[0].astype(np.float32)
    p = pca_project(x, 2)
    assert p.shape == (300, 2)
    np.testing.assert_allclose(np.sort(p.var(0)), [25, 100], rtol=0.3)
    assert pca_project(x, 8) is x


def test_kmeanspp_with_fewer_distinct_points_than_k():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)
    seeds = kmeanspp(x, 5, np.random.default_rng(0))
    assert seeds.shape == (5,) and len(set(seeds.tolist())) == 5


def test_split_gains_match_explicit_bisection():
    rng = np.random.default_rng(1)
    # cluster 0: two well-separated blobs along axis 0; cluster 1: one tight blob
    a = rng.normal(0, 0.05, (100, 4)) + [1, 0, 0, 0]
    b = rng.normal(0, 0.05, (100, 4)) - [1, 0, 0, 0]
    c = rng.normal(0, 0.05, (50, 4)) + [0, 5, 0, 0]
    x = np.concatenate([a, b, c]).astype(np.float32)
    labels = np.array([0] * 200 + [1] * 50)
    shards = LocalShards.from_array(x, shard_rows=64)  # the clusters straddle shards
    for s in shards.shards:
        s.labels = labels[s.offset : s.offset + s.n]
    gain = split_gains(shards, np.arange(2), 2, 4, seed=0)
    upper = np.concatenate([s.upper for s in shards.shards])

    def cluster_sse(p):
        return ((p - p.mean(0)) ** 2).sum()

    expected = cluster_sse(x[:200]) - cluster_sse(x[:100]) - cluster_sse(x[100:200])
    assert gain[0] == pytest.approx(expected, rel=1e-3)
    assert gain[1] < 0.05 * gain[0]
    assert upper[:100].all() != upper[100:200].any() and len(set(upper[:100])) == len(set(upper[100:200])) == 1


def test_merge_costs_are_ward_increases():
    centroids = np.array([[0, 0], [1, 0], [10, 0]], dtype=np.float32)
    cost, partner = merge_costs(centroids, np.array([3, 1, 2]))
    assert partner[0] == 1 and cost[0] == pytest.approx(3 * 1 / 4 * 1.0)
    assert partner[2] == 1 and cost[2] == pytest.approx(1 * 2 / 3 * 81.0)
    cost, _ = merge_costs(centroids, np.array([3, 1, 0]))
    assert cost[2] == 0.0 and cost[0] == 0.0  # an empty cluster merges for free


def test_fit_kmeans_refuses_too_few_points():
    with pytest.raises(ValueError, match="at least k=10"):
        fit_kmeans(np.zeros((5, 3), dtype=np.float32), 10)


def test_rowwise_dot_over_every_row_and_over_a_subset():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = rng.standard_normal((7, 16)).astype(np.float32)
    for idx in (np.arange(300), np.sort(rng.choice(300, 120, replace=False))):
        rows = rng.integers(0, 7, idx.size)
        want = np.array([float(x[i].astype(np.float64) @ y[r]) for i, r in zip(idx, rows)])
        np.testing.assert_allclose(_rowwise_dot(x, idx, y, rows), want, rtol=1e-5, atol=1e-5)
