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


def test_bottom_k_with_ties_and_any_row_order_equals_a_full_sort():
    rng = np.random.default_rng(2)
    rows = rng.permutation(5000)  # rows arrive in any order, keys with many ties
    keys = np.round(row_priority(rows, seed=1), 2)
    want = rows[np.lexsort((rows, keys))[:300]]
    cuts = np.sort(rng.choice(np.arange(1, 5000), 40, replace=False))
    for as_callable in (False, True):
        k = BottomK(300)
        for block in np.split(np.arange(5000), cuts):
            pay = rows[block][:, None] * np.ones((1, 3), np.float32)
            k.add(keys[block], rows[block], (lambda idx, pay=pay: pay[idx]) if as_callable else pay)
        got_keys, got_rows, payload = k.result()
        assert got_rows.tolist() == want.tolist()
        assert np.array_equal(payload, want[:, None] * np.ones((1, 3), np.float32))
        assert np.all(np.diff(got_keys) >= 0)


def test_bottom_k_builds_the_payload_of_entering_rows_only():
    """Once full, a block's rows at or above the k-th (key, row) are dropped before their payload is built."""
    k = BottomK(3)
    k.add(np.array([0.1, 0.2, 0.3]), np.array([10, 11, 12]), np.arange(3.0)[:, None])
    asked = []

    def payload(idx):
        asked.append(idx.tolist())
        return np.full((len(idx), 1), 9.0)

    # 0.5 is above the k-th key; 0.3 at row 13 ties with (0.3, row 12) and loses, at row 4 it wins the tie
    k.add(np.array([0.5, 0.3, 0.3]), np.array([1, 13, 4]), payload)
    assert asked == [[2]]
    keys, rows, pay = k.result()
    assert rows.tolist() == [10, 11, 4] and keys.tolist() == [0.1, 0.2, 0.3] and pay[:, 0].tolist() == [0, 1, 9]
    # 0.05 enters; 0.25 at row 0 passes the k-th (0.3, row 4) but not the new k-th: its payload is never built
    k.add(np.array([0.9, 0.25, 0.05]), np.array([20, 0, 21]), payload)
    assert asked == [[2], [2]]
    assert k.result()[1].tolist() == [21, 10, 11]
    k.add(np.array([0.9, 0.3]), np.array([22, 23]), payload)
    assert asked == [[2], [2]]  # nothing can enter: no payload built


def test_herding_and_kcenter_in_float32_equal_float64_and_copy_nothing():
    import tracemalloc

    rng = np.random.default_rng(3)
    x = pair_features(_unit(rng.normal(size=(3000, 32))), _unit(rng.normal(size=(3000, 32))))
    # the same greedy rules in float64, vectorised
    x64, mu = x.astype(np.float64), x.astype(np.float64).mean(0)
    chosen, total = [], np.zeros(64)
    for t in range(40):
        score = np.linalg.norm((total + x64) / (t + 1) - mu, axis=1)
        score[chosen] = np.inf
        chosen.append(int(np.argmin(score)))
        total += x64[chosen[-1]]
    assert herding(x, 40).tolist() == chosen
    first = int(np.random.default_rng(7).integers(3000))
    centers, dist = [first], np.linalg.norm(x64 - x64[first], axis=1)
    for _ in range(39):
        dist[centers] = -1.0
        centers.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(x64 - x64[centers[-1]], axis=1))
    assert kcenter(x, 40, seed=7).tolist() == centers
    big = np.ascontiguousarray(np.tile(x, (1, 8)))  # 3000 x 512 float32, 6 MB
    for run in (lambda: herding(big, 3), lambda: kcenter(big, 3), lambda: BottomK(len(big)).result()):
        tracemalloc.start()
        run()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < big.nbytes / 4, peak  # a float64 copy would be 2x big.nbytes
    k = BottomK(len(big))
    k.add(row_priority(np.arange(len(big)), 0), np.arange(len(big)), big)
    tracemalloc.start()
    _, _, pay = k.result()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < big.nbytes / 4 and np.array_equal(pay, big[np.argsort(row_priority(np.arange(len(big)), 0))])
