"""The sharded k-means: exact, order-free reductions (any grouping of the shards gives the same centroids bit for
bit), phases redone after lost shards give the result of an uninterrupted fit, and the fit is as good as FAISS's
and stable in the shard size."""

import faiss
import numpy as np
import pytest

from rdistill.algo.kmeans import (
    FixedPoint,
    LocalShards,
    ShardsLost,
    add_partials,
    decode,
    fit_sharded,
    nearest_centroid,
    run_on_shards,
)
from rdistill.dev.planted import make_concepts, sample_pairs


@pytest.fixture(scope="module")
def sample():
    return sample_pairs(make_concepts(30, 48, noise=0.5, seed=3), 6000, seed=4).img_emb


class GroupedShards(LocalShards):
    """The shards split over ``groups`` holders, each adding its own shards, the holders' totals then added in a
    shuffled order: what a Ray pool does with its actors, without Ray."""

    def __init__(self, shards, groups: int, seed: int = 0):
        super().__init__(shards)
        self.groups = [list(g) for g in np.array_split(np.random.default_rng(seed).permutation(len(shards)), groups)]

    def call(self, op, *args, **kwargs):
        total = None
        for g in self.groups:
            part = run_on_shards([self.shards[j] for j in sorted(g)], self.fp, op, *args, **kwargs)
            total = add_partials(total, part)
        return decode(total, self.fp)


def _fit(shards, **kw):
    return fit_sharded(shards, 30, seed=7, niter=6, **kw)


def test_any_grouping_of_the_shards_gives_the_same_centroids_bit_for_bit(sample):
    ref, ref_stats = _fit(LocalShards.from_array(sample, 500))
    for groups in (2, 3, 12):
        c, stats = _fit(GroupedShards(LocalShards.from_array(sample, 500).shards, groups, seed=groups))
        np.testing.assert_array_equal(c, ref)
        assert stats == ref_stats
    assert ref_stats.shards == 12 and ref_stats.refine_moves > 0  # refinement ran, so its ops were reduced too


def test_fixed_point_sums_are_exact_and_order_free():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((5, 7)) * 10.0 ** rng.integers(-8, 3) for _ in range(50)]
    fp = FixedPoint.for_sample(rows=1000, max_sqnorm=100.0)
    a = b = None
    for p in parts:
        a = add_partials(a, {"sums": fp.encode(p)})
    for p in reversed(parts):
        b = add_partials(b, {"sums": fp.encode(p)})
    np.testing.assert_array_equal(a["sums"], b["sums"])
    np.testing.assert_allclose(fp.decode(a["sums"]), np.sum(parts, axis=0), atol=len(parts) * 2.0**-fp.bits)
    assert 20 <= fp.bits <= 52


class FlakyShards(LocalShards):
    """Loses its shards (raises ShardsLost, as a pool does after moving them) at the given call numbers."""

    def __init__(self, shards, fail_at: set[int]):
        super().__init__(shards)
        self.fail_at, self.n = fail_at, 0

    def call(self, op, *args, **kwargs):
        self.n += 1
        if self.n in self.fail_at:
            for s in self.shards:  # a new holder starts with fresh state
                s.labels[:] = 0
                s.upper[:] = False
                s.proj[:] = 0
            raise ShardsLost(f"lost at call {self.n}")
        return super().call(op, *args, **kwargs)


def test_a_phase_redone_after_lost_shards_gives_the_uninterrupted_result(sample):
    ref, ref_stats = _fit(LocalShards.from_array(sample, 1000))
    for fail_at in ({3}, {8, 30}, {60}):  # in Lloyd, twice (Lloyd and refinement), deep in refinement
        c, stats = _fit(FlakyShards(LocalShards.from_array(sample, 1000).shards, fail_at))
        np.testing.assert_array_equal(c, ref)
        assert stats.restarts == len(fail_at) and stats.sse_final == ref_stats.sse_final


def test_sharded_fit_is_as_good_as_faiss_and_stable_in_the_shard_size(sample):
    def sse(c):
        return float(nearest_centroid(sample, c)[1].sum(dtype=np.float64))

    ref = faiss.Kmeans(sample.shape[1], 30, niter=20, seed=1)
    ref.train(sample)
    fits = {rows: sse(_fit(LocalShards.from_array(sample, rows))[0]) for rows in (64, 777, 6000)}
    assert max(fits.values()) <= sse(ref.centroids) * 1.001
    assert max(fits.values()) <= min(fits.values()) * 1.001  # shard size changes only float rounding


def test_gather_returns_rows_in_sample_order(sample):
    shards = LocalShards.from_array(sample, 333)
    idx = np.sort(np.random.default_rng(0).choice(sample.shape[0], 500, replace=False))
    np.testing.assert_array_equal(shards.gather(idx), sample[idx])
