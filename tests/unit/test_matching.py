import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from rdistill.algo.matching import Contingency, match_clusters


def brute_force_best(counts: np.ndarray) -> int:
    k = counts.shape[0]
    return max(int(counts[np.arange(k), list(p)].sum()) for p in itertools.permutations(range(k)))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("dense_max", [0, 4096], ids=["sparse", "dense"])
def test_assignment_matches_brute_force(k, dense_max):
    rng = np.random.default_rng(k)
    for trial in range(20):
        counts = rng.poisson(2.0, size=(k, k)) * (rng.random((k, k)) < 0.4)
        m = match_clusters(sp.csr_matrix(counts), dense_max=dense_max)
        assert sorted(m.txt_of_img.tolist()) == list(range(k)), "not a permutation"
        assert m.objective == brute_force_best(counts), (trial, counts)
        assert m.objective == counts[np.arange(k), m.txt_of_img].sum()
        np.testing.assert_array_equal(m.shared, counts[np.arange(k), m.txt_of_img])


def test_sparse_and_dense_agree_on_larger_tables():
    rng = np.random.default_rng(0)
    k = 300
    counts = rng.poisson(0.5, size=(k, k)) * (rng.random((k, k)) < 0.02)
    counts[np.arange(k), rng.permutation(k)] += rng.integers(0, 3, size=k)
    dense = match_clusters(sp.csr_matrix(counts), dense_max=4096)
    sparse = match_clusters(sp.csr_matrix(counts), dense_max=10)
    assert sparse.solver != dense.solver
    assert sparse.objective == dense.objective
    assert sorted(sparse.txt_of_img.tolist()) == list(range(k))


def test_pairless_leftovers_paired_by_centroid_cosine():
    # Clusters 0 and 1 share pairs; 2 and 3 have none: they must pair by centroid similarity.
    counts = np.zeros((4, 4), dtype=np.int64)
    counts[0, 1] = 5
    counts[1, 0] = 7
    img_c = np.eye(4, dtype=np.float32)
    txt_c = np.eye(4, dtype=np.float32)[[0, 1, 3, 2]]  # text centroid 2 looks like image centroid 3
    for dense_max in (0, 4096):
        m = match_clusters(sp.csr_matrix(counts), img_c, txt_c, dense_max=dense_max)
        assert m.txt_of_img.tolist() == [1, 0, 3, 2]
        assert m.shared.tolist() == [5, 7, 0, 0]


def test_contingency_sparse_equals_dense():
    rng = np.random.default_rng(1)
    k = 50
    dense, sparse = Contingency(k), Contingency(k, dense_max_cells=0)
    ref = np.zeros((k, k), dtype=np.int64)
    for _ in range(5):
        a, b = rng.integers(0, k, 1000), rng.integers(0, k, 1000)
        dense.add(a, b)
        sparse.add(a, b)
        np.add.at(ref, (a, b), 1)
    np.testing.assert_array_equal(dense.to_sparse().toarray(), ref)
    np.testing.assert_array_equal(sparse.to_sparse().toarray(), ref)


def test_explicit_zeros_and_empty_tables():
    counts = sp.csr_matrix((np.array([0, 3]), (np.array([0, 1]), np.array([1, 0]))), shape=(3, 3))
    m = match_clusters(counts, dense_max=0)
    assert m.objective == 3 and sorted(m.txt_of_img.tolist()) == [0, 1, 2]
    empty = match_clusters(sp.csr_matrix((4, 4), dtype=np.int64), dense_max=0)
    assert empty.objective == 0 and sorted(empty.txt_of_img.tolist()) == [0, 1, 2, 3]
