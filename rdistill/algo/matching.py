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
        total = np.bincount(inv, weights=counts, minlength=uniq.size)
        # int32 counts on the non-zero cells (int64 codes): 12 bytes a cell, unless a cell outgrows int32
        self._counts = [total.astype(np.int32 if total.max(initial=0) < 2**31 else np.int64)]
        self._pending = self._compacted = uniq.size

    def nbytes(self) -> int:
        """Bytes the table holds now (codes and counts, or the dense table)."""
        if self._dense is not None:
            return int(self._dense.nbytes)
        return int(sum(a.nbytes for a in self._codes) + sum(a.nbytes for a in self._counts))

    def to_sparse(self) -> sp.csr_matrix:
        """(k, k) int64 CSR matrix of counts."""
        if self._dense is not None:
            return sp.csr_matrix(self._dense.reshape(self.k, self.k))
        if not self._codes:
            return sp.csr_matrix((self.k, self.k), dtype=np.int64)
        self._compact()
        codes, counts = self._codes[0], self._counts[0].astype(np.int64)
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


def _largest_first(csc: sp.csc_matrix) -> None:
    """In place: swap each column's largest entry (the first one if tied) to the front of its slice."""
    seg = np.diff(csc.indptr)
    nonempty = np.flatnonzero(seg)
    if nonempty.size == 0:
        return
    starts = csc.indptr[:-1][nonempty]
    top = np.maximum.reduceat(csc.data, starts)
    owner = np.repeat(np.arange(nonempty.size), seg[nonempty])
    hits = np.flatnonzero(csc.data == top[owner])
    best = hits[np.searchsorted(owner[hits], np.arange(nonempty.size))]
    for arr in (csc.indices, csc.data):
        arr[starts], arr[best] = arr[best], arr[starts].copy()


def _solve_sparse(counts: sp.csr_matrix) -> np.ndarray:
    """Maximum-count matching on the non-zero cells only (sparse LAPJV in scipy).

    counts: (k, k) sparse int without explicit zeros. Returns (k,) int64 text cluster of each image cluster, -1 for
    the clusters the optimum leaves unmatched.

    scipy needs a *full* matching to exist and non-zero weights. Dummy nodes give every partial matching of real
    cells a completion: image cluster i may take dummy text node i, text cluster j dummy image node j, and dummy
    image node j pairs with dummy text node i exactly when (i, j) is a real cell. Dummy edges weigh ``eps`` with
    ``2 k eps < 1``, so they never outweigh one shared pair. The real cells of the optimum form a maximum-count
    partial matching; its unmatched clusters are returned as -1.

    ``eps`` is a power of two, so the sums of weights the solver forms are exact in float64 (while counts stay far
    below ``2^53 eps``, ~10^10 at k=100k). scipy's LAPJVsp tests reduced costs for equality and loops forever on
    some inputs when they carry rounding errors: with ``eps = 1/(4k)`` it did on 5 of 1500 small random tables (one
    is a test in ``tests/unit/test_matching.py``).

    Node order matters for speed, not for the result: the dummy text nodes come *before* the real ones. LAPJVsp's
    column reduction gives each column its best row, resolving conflicts in favour of the highest-numbered column;
    with the dummies first the real text clusters get their best image cluster and the all-``eps`` dummy columns
    take what is left. The other way round every image cluster starts on its dummy column and the whole optimum is
    found by augmenting paths that each cost O(k): 65 s instead of 5 s at k=50k with 10M cells
    (``python -m rdistill.dev.bench_matching``). For the same reason each dummy image node lists first the dummy
    text node of the image cluster with the most pairs in its text cluster: the dummy side then starts as the mirror
    of the real one instead of every dummy node bidding for the lowest-numbered ones (17.6 s -> 3.4 s at k=100k with
    20M cells). The graph is built directly in CSR without COO copies.
    """
    k = counts.shape[0]
    counts = sp.csr_matrix(counts)
    counts.sort_indices()
    by_txt = counts.tocsc()
    by_txt.sort_indices()
    _largest_first(by_txt)
    eps = 2.0 ** -int(np.ceil(np.log2(4 * k)))  # <= 1/(4k), exact sums (see above)
    idx = np.int32 if 2 * k + 2 * counts.nnz < 2**31 else np.int64
    # rows: image clusters 0..k-1, then dummy image nodes k+j; columns: dummy text nodes i, then text clusters k+j
    real_len = np.diff(counts.indptr) + 1  # dummy column i, then the row's cells
    dummy_len = np.diff(by_txt.indptr) + 1  # the column's cells (mirrored), then text cluster j
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([real_len, dummy_len]))]).astype(idx)
    nnz = int(indptr[-1])
    indices = np.empty(nnz, dtype=idx)
    data = np.full(nnz, eps)
    head = indptr[:k]  # each image cluster's first slot: its dummy column
    indices[head] = np.arange(k)
    real_slots = np.ones(indptr[k], dtype=bool)
    real_slots[head] = False
    indices[: indptr[k]][real_slots] = k + counts.indices
    data[: indptr[k]][real_slots] = counts.data
    tail = indptr[k + 1 :] - 1  # each dummy image node's last slot: its text cluster
    indices[tail] = k + np.arange(k)
    mirror = np.ones(nnz - indptr[k], dtype=bool)
    mirror[tail - indptr[k]] = False
    indices[indptr[k] :][mirror] = by_txt.indices
    del by_txt, real_slots, mirror
    graph = sp.csr_matrix((data, indices, indptr), shape=(2 * k, 2 * k))
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    row_ind, col_ind = min_weight_full_bipartite_matching(graph, maximize=True)
    txt_of_img = np.full(k, -1, dtype=np.int64)
    real = (row_ind < k) & (col_ind >= k)
    txt_of_img[row_ind[real]] = col_ind[real] - k
    return txt_of_img


# Up to this many pairless matches they are re-paired by a dense LAP on their (L, L) centroid cosines; above it on
# the top-LEFTOVER_K neighbour graph (memory O(L k): a dense 50k x 50k cosine matrix would be ~20 GB in float64).
LEFTOVER_DENSE_MAX = 4096
LEFTOVER_K = 32
_COS_SCALE = float(2**20)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cosine_lap_sparse(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Maximum-cosine perfect matching of the rows of ``a`` to the rows of ``b`` on a top-k neighbour graph.

    a, b: (L, d) float32 unit rows. Returns (L,) int64 ``order``: row i of ``a`` goes with row ``order[i]`` of
    ``b``, a permutation. The graph holds, for each row of ``a``, its ``k`` nearest rows of ``b`` (FAISS
    inner-product search) and, for each row of ``b``, its ``k`` nearest rows of ``a``, so no node is left out for
    being nobody's neighbour. A maximum-cardinality matching of that graph (Hopcroft-Karp) completed in index order
    adds the few edges needed for a perfect matching to exist; scipy's sparse LAPJV then finds the best one on the
    graph, with weights ``2 + cosine`` (non-zero; the same shift on every edge of a perfect matching) rounded to
    multiples of ``2^-20``, so the solver's sums are exact (see :func:`_solve_sparse`). The result equals the dense
    optimum (to ``L 2^-20`` in total cosine) whenever the optimum's edges are all in the graph, and is never worse
    than the completion. Memory O(L k).
    """
    import faiss
    from scipy.sparse.csgraph import maximum_bipartite_matching, min_weight_full_bipartite_matching

    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    n, d = a.shape
    k = max(1, min(k, n))
    index = faiss.IndexFlatIP(d)
    index.add(b)
    sim_ab, nn_ab = index.search(a, k)  # (L, k) each
    index.reset()
    index.add(a)
    sim_ba, nn_ba = index.search(b, k)
    del index
    own = np.repeat(np.arange(n, dtype=np.int64), k)
    codes = np.concatenate([own * n + nn_ab.ravel(), nn_ba.ravel().astype(np.int64) * n + own])
    sims = np.concatenate([sim_ab.ravel(), sim_ba.ravel()])
    del sim_ab, nn_ab, sim_ba, nn_ba, own
    codes, first = np.unique(codes, return_index=True)  # an edge found from both sides counts once
    sims = sims[first].astype(np.float64)
    graph = sp.csr_matrix((np.ones(codes.size, dtype=np.int8), (codes // n, codes % n)), shape=(n, n))
    col_of_row = maximum_bipartite_matching(graph, perm_type="column")
    lone = np.flatnonzero(col_of_row < 0)
    if lone.size:  # complete in index order; these edges weigh their true cosine
        free_cols = np.setdiff1d(np.arange(n), col_of_row[col_of_row >= 0])
        extra = lone.astype(np.int64) * n + free_cols
        codes = np.concatenate([codes, extra])
        sims = np.concatenate([sims, np.einsum("ij,ij->i", a[lone], b[free_cols], dtype=np.float64)])
        log.info("leftover re-pairing: %d of %d matches completed outside the top-%d graph", lone.size, n, k)
    weights = np.rint((2.0 + sims) * _COS_SCALE)  # integers in [2^20, 3 2^20]: exact sums, never zero
    weights = sp.csr_matrix((weights, (codes // n, codes % n)), shape=(n, n))
    _, order = min_weight_full_bipartite_matching(weights, maximize=True)
    return np.asarray(order, dtype=np.int64)


def _pair_leftovers(
    txt_of_img: np.ndarray,
    img_centroids: np.ndarray,
    txt_centroids: np.ndarray,
    *,
    dense_max: int = LEFTOVER_DENSE_MAX,
    k: int = LEFTOVER_K,
) -> np.ndarray:
    """Pair the clusters left without shared pairs by centroid cosine (any pairing of them has zero shared pairs,
    so the count objective is indifferent; the closest centroids make the least misaligned pairless prototypes).

    txt_of_img: (M,) int64 with -1 for the unmatched image clusters (filled in place and returned); centroids:
    (M, d) float. Up to ``dense_max`` leftovers: dense LAP on all their cosines (exact). Above: the top-``k``
    neighbour graph and the sparse solver (:func:`_cosine_lap_sparse`).
    """
    m = txt_of_img.shape[0]
    free_img = np.flatnonzero(txt_of_img < 0)
    free_txt = np.setdiff1d(np.arange(m), txt_of_img[txt_of_img >= 0])
    if free_img.size == 0:
        return txt_of_img
    a, b = _unit(img_centroids[free_img]), _unit(txt_centroids[free_txt])
    if free_img.size <= dense_max:
        from lapjv import lapjv

        order, _, _ = lapjv(-(a @ b.T).astype(np.float64), force_doubles=True)
    else:
        order = _cosine_lap_sparse(a, b, k)
    txt_of_img[free_img] = free_txt[order]
    return txt_of_img


def match_clusters(
    counts: sp.csr_matrix,
    img_centroids: np.ndarray | None = None,
    txt_centroids: np.ndarray | None = None,
    *,
    dense_max: int = 4096,
    leftover_dense_max: int = LEFTOVER_DENSE_MAX,
    leftover_k: int = LEFTOVER_K,
) -> Matching:
    """Linear assignment maximising total shared pairs (paper: min sum K_ij P_ij, K = -counts).

    counts: (k, k) sparse int; dense ``lapjv`` up to ``dense_max`` clusters, sparse LAPJV above. Clusters matched
    with zero shared pairs are re-paired among themselves by centroid cosine when centroids ((k, d) float) are
    given: a dense LAP up to ``leftover_dense_max`` of them, a sparse one on each's ``leftover_k`` nearest above.
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
        txt_of_img = _pair_leftovers(txt_of_img, img_centroids, txt_centroids, dense_max=leftover_dense_max,
                                     k=leftover_k)  # fmt: skip
    else:
        free_txt = np.setdiff1d(np.arange(k), txt_of_img[txt_of_img >= 0])
        txt_of_img[txt_of_img < 0] = free_txt
    shared = np.asarray(counts[np.arange(k), txt_of_img]).ravel().astype(np.int64)
    return Matching(txt_of_img, shared, int(shared.sum()), solver)
