"""Coreset selection rules against brute-force references on small data."""

import numpy as np

from rdistill.baselines.select import BottomK, herding, kcenter, pair_features, row_priority


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _herding_brute(x, m, target):
    chosen = []
    for _ in range(m):
        best, best_d = None, np.inf
        for i in range(len(x)):
            if i in chosen:
                continue
            d = np.linalg.norm(x[chosen + [i]].mean(axis=0) - target)
            if d < best_d - 1e-12:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def _kcenter_brute(x, m, first):
    chosen = [first]
    for _ in range(m - 1):
        best, best_d = None, -1.0
        for i in range(len(x)):
            if i in chosen:
                continue
            d = min(np.linalg.norm(x[i] - x[j]) for j in chosen)
            if d > best_d + 1e-12:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_greedy_mean_matching_equals_brute_force():
    rng = np.random.default_rng(0)
    x = pair_features(_unit(rng.normal(size=(60, 5))), _unit(rng.normal(size=(60, 5))))
    target = x.mean(axis=0) + 0.01 * rng.normal(size=10)
    got = herding(x, 12, target=target)
    assert got.tolist() == _herding_brute(x.astype(np.float64), 12, target)
    assert len(set(got.tolist())) == 12
    # the herded subset's mean is closer to the target than random subsets of the same size
    rand = [np.linalg.norm(x[rng.choice(60, 12, replace=False)].mean(0) - target) for _ in range(50)]
    assert np.linalg.norm(x[got].mean(0) - target) < min(rand)


def test_kcenter_farthest_point_equals_brute_force():
    rng = np.random.default_rng(1)
    x = _unit(rng.normal(size=(50, 4))).astype(np.float32)
    got = kcenter(x, 10, seed=3)
    first = int(np.random.default_rng(3).integers(50))
    assert got[0] == first
    assert got.tolist() == _kcenter_brute(x.astype(np.float64), 10, first)


def test_bottom_k_over_blocks_equals_a_full_sort_whatever_the_blocking():
    rows = np.arange(10_000)
    pri = row_priority(rows, seed=4)
    assert 0.0 <= pri.min() and pri.max() < 1.0 and abs(pri.mean() - 0.5) < 0.02
    assert not np.array_equal(pri, row_priority(rows, seed=5))
    want = np.lexsort((rows, pri))[:37]
    for block in (1, 333, 10_000):
        k = BottomK(37)
        for b0 in range(0, 10_000, block):
            r = rows[b0 : b0 + block]
            k.add(row_priority(r, 4), r, r[:, None].astype(np.float32))
        keys, got, payload = k.result()
        assert got.tolist() == want.tolist() and payload[:, 0].tolist() == want.tolist()
    # ties go to the lower row id
    k = BottomK(2)
    k.add(np.zeros(3), np.array([7, 3, 5]))
    assert k.result()[1].tolist() == [3, 5]
