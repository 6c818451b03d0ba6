import numpy as np
import pytest

from rdistill.algo.prune import find_prune_cut, pair_similarity


def blocks_of(sims, block):
    rows = np.arange(sims.size, dtype=np.int64)

    def gen():
        for s in range(0, sims.size, block):
            yield sims[s : s + block], rows[s : s + block]

    return gen


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("block", [7, 1000])
def test_cut_drops_exactly_the_lowest_pairs_with_ties(ratio, block):
    rng = np.random.default_rng(3)
    # many exact ties (duplicates are common in web data) and values spread over [-1, 1]
    sims = np.round(rng.uniform(-0.2, 0.6, 5000), 3).astype(np.float32)
    cut = find_prune_cut(blocks_of(sims, block), sims.size, ratio, num_bins=256)
    keep = cut.keep(sims, np.arange(sims.size, dtype=np.int64))
    n_drop = int(np.floor(ratio * sims.size))
    assert (~keep).sum() == n_drop
    order = np.lexsort((np.arange(sims.size), sims))  # by (sim, row)
    expected = np.ones(sims.size, dtype=bool)
    expected[order[:n_drop]] = False
    np.testing.assert_array_equal(keep, expected)


def test_cut_refuses_bad_ratio_and_wrong_counts():
    sims = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="prune_ratio"):
        find_prune_cut(blocks_of(sims, 4), 10, 1.0)
    with pytest.raises(ValueError, match="expected 11"):
        find_prune_cut(blocks_of(sims, 4), 11, 0.5)


def test_pair_similarity_is_rowwise_dot():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 30, 8)).astype(np.float32)
    np.testing.assert_allclose(pair_similarity(a, b), [x @ y for x, y in zip(a, b)], rtol=1e-5)


def test_two_histogram_levels_find_the_bin_of_the_full_histogram():
    """The engine's prune pass: coarse counts, then the fine counts inside the coarse bin of the cut, give the fine
    bin (and the count below it) that one histogram of all fine bins gives."""
    from rdistill.algo.prune import cut_bin, level_histogram, sims_histogram

    rng = np.random.default_rng(4)
    sims = np.concatenate([rng.normal(0.3, 0.02, 50_000), rng.normal(-0.2, 0.1, 5_000)]).astype(np.float32)
    parts = np.array_split(sims, 7)
    num_bins, low = 1 << 16, 6
    for ratio in (0.01, 0.2, 0.5, 0.9):
        n_drop = int(ratio * sims.size)
        full = cut_bin(sum(sims_histogram(p, num_bins) for p in parts), sims.size, n_drop)
        cb, below = cut_bin(sum(level_histogram(p, num_bins, low) for p in parts), sims.size, n_drop)
        fine = sum(level_histogram(p, num_bins, low, cb) for p in parts)
        sub, below_in = cut_bin(fine, int(fine.sum()), n_drop - below)
        assert ((cb << low) + sub, below + below_in) == full, ratio
        assert all(level_histogram(p, num_bins, low).size == num_bins >> low for p in parts)
