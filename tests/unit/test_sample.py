import numpy as np

from rdistill.algo.sample import bernoulli_rows, row_uniforms


def test_the_draw_depends_on_the_global_row_only():
    whole = bernoulli_rows(0, 100_000, 0.05, key=7)
    for cuts in ([0, 100_000], [0, 1, 33_333, 33_334, 99_999, 100_000], [0, 50_000, 100_000]):
        parts = [bernoulli_rows(a, b - a, 0.05, key=7) for a, b in zip(cuts[:-1], cuts[1:])]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(bernoulli_rows(0, 100_000, 0.05, key=8), whole)


def test_the_draw_is_a_fair_bernoulli_sample():
    n, share = 400_000, 0.02
    rows = bernoulli_rows(0, n, share, key=1)
    sd = np.sqrt(n * share * (1 - share))
    assert abs(rows.size - n * share) < 4 * sd
    assert np.all(np.diff(rows) > 0) and rows.dtype == np.int64
    u = row_uniforms(np.arange(n), key=1)
    assert 0.0 <= u.min() and u.max() < 1.0
    counts, _ = np.histogram(u, bins=20, range=(0, 1))
    assert np.all(np.abs(counts - n / 20) < 5 * np.sqrt(n / 20))  # uniform
    halves = np.histogram(rows, bins=2, range=(0, n))[0]
    assert abs(halves[0] - halves[1]) < 5 * np.sqrt(rows.size)  # no drift along the rows
    np.testing.assert_array_equal(bernoulli_rows(10, 5, 1.0, key=3), np.arange(10, 15))
