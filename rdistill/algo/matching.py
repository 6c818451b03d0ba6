"""Cluster matching (paper section 3.2, eq. for K): count shared pairs per (image cluster, text cluster) and find
the one-to-one matching that maximises the total count."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


class Contingency:
    """Sparse M x M table of shared pairs, accumulated block by block.

    Memory is bounded by the number of distinct non-zero cells (at most min(N, M^2)), never by N. For small M a
    dense ``bincount`` table is used, which is faster.
    """

    def __init__(self, k: int, dense_max_cells: int = 1 << 24):
        self.k = k
        self._dense = np.zeros(k * k, dtype=np.int64) if k * k <= dense_max_cells else None
        self._codes: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0
        self._compacted = 0

    def add(self, img_labels: np.ndarray, txt_labels: np.ndarray) -> None:
        """Count pairs: img_labels, txt_labels (n,) int in [0, k)."""
        codes = img_labels.astype(np.int64) * self.k + txt_labels.astype(np.int64)
        if self._dense is not None:
            self._dense += np.bincount(codes, minlength=self.k * self.k)
            return
        uniq, cnt = np.unique(codes, return_counts=True)
        self._codes.append(uniq)
        self._counts.append(cnt)
        self._pending += uniq.size
        if self._pending > 2 * self._compacted + 4_000_000:
            self._compact()

    def add_counts(self, codes: np.ndarray, counts: np.ndarray) -> None:
        """Add a partial table: cells as codes ``img * k + txt`` (unique) with their int counts."""
        codes = np.asarray(codes, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if self._dense is not None:
            self._dense += np.bincount(codes, weights=counts, minlength=self.k * self.k).astype(np.int64)
            return
        self._codes.append(codes)
        self._counts.append(counts)
        self._pending += codes.size
        if self._pending > 2 * self._compacted + 4_000_000:
            self._compact()

    def _compact(self) -> None:
        codes = np.concatenate(self._codes)
        counts = np.concatenate(self._counts)
        uniq, inv = np.unique(codes, return_inverse=True)
        self._codes = [uniq]
        self._counts = [np.bincount(inv, weights=counts, minlength=uniq.size).astype(np.int64)]
        self._pending = self._compacted = uniq.size

    def to_sparse(self) -> sp.csr_matrix:
        """(k, k) int64 CSR matrix of counts."""
        if self._dense is not None:
            return sp.csr_matrix(self._dense.reshape(self.k, self.k))
        if not self._codes:
            return sp.csr_matrix((self.k, self.k), dtype=np.int64)
        self._compact()
        codes, counts = self._codes[0], self._counts[0]
        return sp.csr_matrix((counts, (codes // self.k, codes % self.k)), shape=(self.k, self.k))


@dataclass(frozen=True)
class Matching:
    """txt_of_img: (k,) int64, the text cluster matched to each image cluster; shared: (k,) int64, shared pairs of
    each match; objective: total shared pairs; solver: which solver ran."""

    txt_of_img: np.ndarray
    shared: np.ndarray
    objective: int
    solver: str


def _solve_dense(counts: np.ndarray) -> np.ndarray:
    from lapjv import lapjv

    # lapjv minimises; force_doubles keeps counts above 2^24 exact.
    txt_of_img, _, _ = lapjv(-counts.astype(np.float64), force_doubles=True)
    return np.asarray(txt_of_img, dtype=np.int64)


def _solve_sparse(counts: sp.csr_matrix) -> np.ndarray:
    """Maximum-count matching on the non-zero cells only (sparse LAPJV in scipy).

    scipy needs a *full* matching to exist and non-zero weights. Dummy nodes give every partial matching of real
    cells a completion: image cluster i may take dummy text node i, text cluster j dummy image node j, and dummy
    image node j pairs with dummy text node i exactly when (i, j) is a real cell. Dummy edges weigh ``eps`` with
    ``2 k eps < 1``, so they never outweigh one shared pair. The real cells of the optimum form a maximum-count
    partial matching; its unmatched clusters are returned as -1.
    """
    k = counts.shape[0]
    coo = counts.tocoo()
    eps = 1.0 / (4.0 * k)
    rows = np.concatenate([coo.row, np.arange(k), k + np.arange(k), k + coo.col])
    cols = np.concatenate([coo.col, k + np.arange(k), np.arange(k), k + coo.row])
    data = np.concatenate([coo.data.astype(np.float64), np.full(2 * k + coo.nnz, eps)])
    graph = sp.csr_matrix((data, (rows, cols)), shape=(2 * k, 2 * k))
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    row_ind, col_ind = min_weight_full_bipartite_matching(graph, maximize=True)
    txt_of_img = np.full(k, -1, dtype=np.int64)
    real = (row_ind < k) & (col_ind < k)
    txt_of_img[row_ind[real]] = col_ind[real]
    return txt_of_img


# Above this many pairless matches they are left in index order (a dense cosine LAP would need too much memory).
LEFTOVER_DENSE_MAX = 4096


def _pair_leftovers(txt_of_img: np.ndarray, img_centroids: np.ndarray, txt_centroids: np.ndarray):
    """Pair the clusters left without shared pairs by centroid cosine (any pairing of them has zero shared pairs,
    so the count objective is indifferent; the closest centroids make the least misaligned pairless prototypes)."""
    k = txt_of_img.shape[0]
    free_img = np.flatnonzero(txt_of_img < 0)
    free_txt = np.setdiff1d(np.arange(k), txt_of_img[txt_of_img >= 0])
    if free_img.size == 0:
        return txt_of_img
    if free_img.size <= LEFTOVER_DENSE_MAX:
        a = img_centroids[free_img] / np.maximum(np.linalg.norm(img_centroids[free_img], axis=1, keepdims=True), 1e-12)
        b = txt_centroids[free_txt] / np.maximum(np.linalg.norm(txt_centroids[free_txt], axis=1, keepdims=True), 1e-12)
        from lapjv import lapjv

        order, _, _ = lapjv(-(a @ b.T).astype(np.float64), force_doubles=True)
        txt_of_img[free_img] = free_txt[order]
    else:
        txt_of_img[free_img] = free_txt
    return txt_of_img


def match_clusters(
    counts: sp.csr_matrix,
    img_centroids: np.ndarray | None = None,
    txt_centroids: np.ndarray | None = None,
    *,
    dense_max: int = 4096,
) -> Matching:
    """Linear assignment maximising total shared pairs (paper: min sum K_ij P_ij, K = -counts).

    counts: (k, k) sparse int; dense ``lapjv`` up to ``dense_max`` clusters, sparse LAPJV above. Clusters matched
    with zero shared pairs are re-paired among themselves by centroid cosine when centroids are given.
    """
    k = counts.shape[0]
    counts = sp.csr_matrix(counts)
    counts.eliminate_zeros()  # scipy's sparse solver refuses zero-weight edges
    if k <= dense_max:
        txt_of_img = _solve_dense(counts.toarray())
        solver = "lapjv-dense"
        zero = np.asarray(counts[np.arange(k), txt_of_img]).ravel() == 0
        txt_of_img[zero] = -1
    else:
        txt_of_img = _solve_sparse(counts)
        solver = "scipy-sparse-lapjv"
    if img_centroids is not None and txt_centroids is not None:
        txt_of_img = _pair_leftovers(txt_of_img, img_centroids, txt_centroids)
    else:
        free_txt = np.setdiff1d(np.arange(k), txt_of_img[txt_of_img >= 0])
        txt_of_img[txt_of_img < 0] = free_txt
    shared = np.asarray(counts[np.arange(k), txt_of_img]).ravel().astype(np.int64)
    return Matching(txt_of_img, shared, int(shared.sum()), solver)
