"""k-means for one modality: greedy k-means++ seeding, FAISS Lloyd iterations, then split-merge refinement.

PDS clusters image and text embeddings separately with M clusters (paper section 3.2, appendix C.1: mini-batch
k-means). On web data the concept frequencies are heavy-tailed: with plain seeding, frequent concepts soak up several
centroids while rare ones share one, and Lloyd iterations never undo that. Two things fix it here:

* greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with ``2 + log k`` candidates per step as in scikit-learn),
  run on a subsample of the training sample so its cost stays ``O(k^2 d)``;
* split-merge refinement: the cheapest merge of two clusters (Ward's increase of the sum of squared errors,
  ``n_a n_b / (n_a + n_b) |c_a - c_b|^2``) is traded for the most profitable split of another cluster (SSE decrease of
  a bisection along its principal direction) whenever the split gains more than the merge costs; Lloyd iterations
  follow each round. Empty clusters merge at zero cost, so they are re-seeded where they help most.

Every accepted move lowers the sample's SSE, so refinement only improves the k-means objective.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

_CHUNK = 65536


@dataclass(frozen=True)
class KMeansStats:
    """What :func:`fit_kmeans` did: SSE on the training sample after Lloyd and after refinement, moves accepted,
    and the floating-point work of its distance computations (for benchmarks against a GEMM floor)."""

    sample_size: int
    init: str
    sse_lloyd: float
    sse_final: float
    refine_moves: int
    refine_rounds: int
    empty_clusters: int
    gemm_gflop: float  # distance computations done (seeding, Lloyd, searches): 2 n k d per full pass


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, index: faiss.Index | None = None):
    """Nearest centroid (squared L2) of each row.

    x: (n, d) float32; centroids: (k, d) float32. Returns labels (n,) int64 and squared distances (n,) float32.
    ``index``, when given, is a FAISS flat L2 index that already holds ``centroids`` (e.g. on GPU).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if index is None:
        dist, labels = faiss.knn(x, np.ascontiguousarray(centroids, dtype=np.float32), 1)
    else:
        dist, labels = index.search(x, 1)
    return labels[:, 0], np.maximum(dist[:, 0], 0)


def _sqnorms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator, n_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding: returns the (k,) int64 indices of the rows of ``x`` (n, d) float32 chosen as seeds.

    At each step ``n_trials`` candidates are drawn with probability proportional to the squared distance to the
    nearest seed so far, and the one that lowers the potential most is kept. Cost ``O(n k n_trials d)``.
    """
    n = x.shape[0]
    if k > n:
        raise ValueError(f"cannot seed {k} centroids from {n} points")
    n_trials = n_trials or 2 + int(math.log(k))
    x_sq = _sqnorms(x)
    first = int(rng.integers(n))
    chosen = [first]
    closest = np.maximum(x_sq - 2 * (x @ x[first]) + x_sq[first], 0)
    for _ in range(1, k):
        cum = np.cumsum(closest, dtype=np.float64)
        if cum[-1] <= 0:  # fewer distinct points than k: take unused rows
            rest = np.setdiff1d(np.arange(n), chosen)[: k - len(chosen)]
            chosen.extend(int(i) for i in rest)
            break
        cand = np.minimum(np.searchsorted(cum, rng.random(n_trials) * cum[-1]), n - 1)
        dist = x_sq[cand, None] - 2 * (x[cand] @ x.T) + x_sq[None, :]
        np.maximum(dist, 0, out=dist)
        np.minimum(dist, closest[None, :], out=dist)
        best = int(dist.sum(1).argmin())
        chosen.append(int(cand[best]))
        closest = dist[best]
    return np.asarray(chosen[:k], dtype=np.int64)


def pca_project(x: np.ndarray, dims: int) -> np.ndarray:
    """x (n, d) float32 projected on its top ``dims`` principal components, (n, min(d, dims)) float32.

    Seeding is memory-bound (one pass over the seeding rows per seed); in fewer dimensions that pass stays in cache.
    Squared distances along the top components keep most of the cluster structure, and Lloyd iterations in the
    full space follow anyway."""
    if x.shape[1] <= dims:
        return x
    centred = x - x.mean(0, dtype=np.float64).astype(np.float32)
    _, vecs = np.linalg.eigh(centred.T.astype(np.float64) @ centred)
    return np.ascontiguousarray(centred @ vecs[:, -dims:].astype(np.float32))


def _lloyd(x: np.ndarray, centroids: np.ndarray, niter: int, seed: int, gpu: bool) -> np.ndarray:
    if niter <= 0:
        return centroids
    k, d = centroids.shape
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        gpu=gpu,
        verbose=False,
        max_points_per_centroid=1 << 30,
        min_points_per_centroid=1,
    )
    km.train(x, init_centroids=np.ascontiguousarray(centroids, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).copy()


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i x_i per cluster, (k, d) float64, without copying x (float32 weights keep scipy from upcasting x)."""
    w = np.ones(labels.shape[0], dtype=np.float32) if weights is None else weights.astype(np.float32)
    s = sp.csr_matrix((w, (labels, np.arange(labels.shape[0]))), shape=(k, labels.shape[0]))
    return np.asarray(s @ x, dtype=np.float64)


def _rowwise_dot(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(x[i] . y[rows[i]]) for all i, chunked so the gathered copy of y stays small."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], _CHUNK):
        e = min(s + _CHUNK, x.shape[0])
        out[s:e] = np.einsum("ij,ij->i", x[s:e], y[rows[s:e]])
    return out


def split_gains(
    x: np.ndarray, labels: np.ndarray, k: int, power_iters: int = 4, two_means_iters: int = 5, seed: int = 0
):
    """Best bisection of every cluster along its principal direction.

    Returns gain (k,) float64 (SSE decrease if the cluster is split; 0 for clusters of fewer than 2 points) and
    upper (n,) bool (the point goes to the second half). Vectorised over clusters: ``O(n d)`` per power iteration.
    x: (n, d) float32; labels: (n,) int in [0, k).
    """
    d = x.shape[1]
    x_sq = _sqnorms(x).astype(np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = _cluster_sums(x, labels, k)
    means = sums / np.maximum(counts, 1)[:, None]
    sse = np.bincount(labels, weights=x_sq, minlength=k) - counts * _sqnorms(means)
    v = np.random.default_rng(seed).standard_normal((k, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(power_iters):
        # covariance-vector product per cluster: sum_i (x_i - m)(x_i - m).v = sum_i p_i x_i - m sum_i p_i
        proj = _rowwise_dot(x, v.astype(np.float32), labels) - np.einsum("ij,ij->i", means, v)[labels]
        v = _cluster_sums(x, labels, k, proj) - means * np.bincount(labels, weights=proj, minlength=k)[:, None]
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.where(norm > 0, v / np.where(norm > 0, norm, 1), v)
    proj = _rowwise_dot(x, v.astype(np.float32), labels) - np.einsum("ij,ij->i", means, v)[labels]
    # Bisect along v by 1-D 2-means on the projections, not at the mean: a small concept merged into a large one
    # sits far out on one side, and a cut at the mean would halve the large one instead of isolating it.
    upper = proj > 0
    for _ in range(two_means_iters):
        n_up = np.bincount(labels, weights=upper, minlength=k)
        s_up = np.bincount(labels, weights=proj * upper, minlength=k)
        s_all = np.bincount(labels, weights=proj, minlength=k)
        with np.errstate(invalid="ignore", divide="ignore"):
            cut = 0.5 * (s_up / n_up + (s_all - s_up) / (counts - n_up))
        cut = np.where(np.isfinite(cut), cut, 0.0)
        upper = proj > cut[labels]
    side = labels * 2 + upper
    h_counts = np.bincount(side, minlength=2 * k).astype(np.float64)
    h_sums = _cluster_sums(x, side, 2 * k)
    h_means = h_sums / np.maximum(h_counts, 1)[:, None]
    h_sse = np.bincount(side, weights=x_sq, minlength=2 * k) - h_counts * _sqnorms(h_means)
    gain = sse - h_sse.reshape(k, 2).sum(1)
    gain[(h_counts.reshape(k, 2) == 0).any(1)] = 0.0
    return np.maximum(gain, 0.0), upper


def merge_costs(centroids: np.ndarray, counts: np.ndarray, neighbours: int = 8):
    """Cheapest Ward merge of each cluster with one of its nearest centroids.

    Returns cost (k,) float64 and partner (k,) int64; ``cost = n_a n_b / (n_a + n_b) |c_a - c_b|^2`` (0 for an empty
    cluster, which merges for free).
    """
    k = centroids.shape[0]
    kn = min(k, neighbours + 1)
    dist, nbr = faiss.knn(np.ascontiguousarray(centroids), np.ascontiguousarray(centroids), kn)
    counts = counts.astype(np.float64)
    na, nb = counts[:, None], counts[nbr]
    with np.errstate(invalid="ignore", divide="ignore"):
        cost = np.where(na + nb > 0, na * nb / (na + nb), 0.0) * np.maximum(dist, 0)
    cost[nbr == np.arange(k)[:, None]] = np.inf
    best = cost.argmin(1)
    return cost[np.arange(k), best], nbr[np.arange(k), best].astype(np.int64)


def _plan_moves(gain: np.ndarray, cost: np.ndarray, partner: np.ndarray, min_gain_ratio: float):
    """Pair the cheapest merges with the most profitable splits, each cluster in at most one move."""
    used = np.zeros(gain.shape[0], dtype=bool)
    merges = iter(np.argsort(cost, kind="stable"))
    moves = []
    for s in np.argsort(-gain, kind="stable"):
        if used[s] or gain[s] <= 0:
            continue
        for a in merges:
            b = partner[a]
            if used[a] or used[b] or s in (a, b):
                continue
            if gain[s] <= cost[a] * min_gain_ratio:
                return moves
            moves.append((int(a), int(b), int(s)))
            used[[a, b, s]] = True
            break
        else:
            break
    return moves


def _apply_moves(x, labels, upper, centroids, moves):
    """Merge b into a and split s into (s, b) for every move (a, b, s): points of b join a, the upper half of s goes
    to the freed slot b; centroids become the means of their new members. The SSE drops by exactly
    sum(gain - cost) of the moves, with no search over all centroids."""
    k = centroids.shape[0]
    relabel = np.arange(k)
    split_to = np.full(k, -1)
    for a, b, s in moves:
        relabel[b] = a
        split_to[s] = b
    new = relabel[labels]
    moved = (split_to[labels] >= 0) & upper
    new[moved] = split_to[labels[moved]]
    counts = np.bincount(new, minlength=k)
    sums = _cluster_sums(x, new, k)
    filled = counts > 0
    centroids = centroids.copy()
    centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return new, centroids


def fit_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 10,
    init: str = "auto",
    seed_points_per_centroid: int = 8,
    seed_dims: int = 128,
    kmeanspp_max_k: int = 10_000,
    refine_rounds: int = 16,
    refine_niter: int = 0,
    final_niter: int = 3,
    min_gain_ratio: float = 1.0,
    seed: int = 0,
    gpu: bool = False,
) -> tuple[np.ndarray, KMeansStats]:
    """k-means on a training sample.

    x: (n, d) float32 sample (n >= k). ``init`` is ``"kmeans++"`` (greedy, on at most ``seed_points_per_centroid * k``
    rows projected on their top ``seed_dims`` principal components), ``"random"`` (k distinct rows), or ``"auto"``
    (k-means++ up to ``kmeanspp_max_k`` clusters). Then ``niter`` Lloyd iterations (FAISS, GPU when ``gpu``), then
    up to ``refine_rounds`` rounds of split-merge moves (members relabelled locally, plus ``refine_niter`` Lloyd
    iterations per round if > 0) and ``final_niter`` Lloyd iterations once refinement moved anything; a move is
    taken when its split gain exceeds ``min_gain_ratio`` times its merge
    cost. Returns centroids (k, d) float32 and :class:`KMeansStats`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    passes = 0.0  # full (n x k) distance passes
    method = ("kmeans++" if k <= kmeanspp_max_k else "random") if init == "auto" else init
    if method == "kmeans++":
        m = min(n, max(k, seed_points_per_centroid * k))
        sub = x if m == n else x[np.sort(rng.choice(n, size=m, replace=False))]
        centroids = sub[kmeanspp(pca_project(sub, seed_dims), k, rng)]
        passes += (2 + int(math.log(k))) * m / n
    elif method == "random":
        centroids = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    else:
        raise ValueError(f"unknown k-means init {init!r}: use auto, kmeans++ or random")
    centroids = _lloyd(x, centroids, niter, seed, gpu)
    labels, dist = nearest_centroid(x, centroids)
    passes += niter + 1
    sse_lloyd = float(dist.sum(dtype=np.float64))
    moves_total = rounds = 0
    # Moves leave the members of the clusters they do not touch as they were, so only touched ("stale") clusters
    # need their split re-evaluated: after the first round that is a small share of the sample.
    gain, upper, stale = np.zeros(k), np.zeros(n, dtype=bool), np.ones(k, dtype=bool)
    for rounds in range(1, refine_rounds + 1):
        counts = np.bincount(labels, minlength=k)
        idx = np.flatnonzero(stale[labels])
        if idx.size == n:
            new_gain, upper = split_gains(x, labels, k, seed=seed + rounds)
        else:
            new_gain, upper[idx] = split_gains(x[idx], labels[idx], k, seed=seed + rounds)
        gain[stale] = new_gain[stale]
        cost, partner = merge_costs(centroids, counts)
        moves = _plan_moves(gain, cost, partner, min_gain_ratio)
        if not moves:
            rounds -= 1
            break
        labels, centroids = _apply_moves(x, labels, upper, centroids, moves)
        moves_total += len(moves)
        stale[:] = False
        stale[np.asarray(moves).ravel()] = True
        if refine_niter > 0:
            centroids = _lloyd(x, centroids, refine_niter, seed + rounds, gpu)
            labels, _ = nearest_centroid(x, centroids)
            passes += refine_niter + 1
            stale[:] = True
    if moves_total:
        centroids = _lloyd(x, centroids, final_niter, seed, gpu)
        labels, dist = nearest_centroid(x, centroids)
        passes += final_niter + 1
    stats = KMeansStats(
        sample_size=n,
        init=method,
        sse_lloyd=sse_lloyd,
        sse_final=float(dist.sum(dtype=np.float64)),
        refine_moves=moves_total,
        refine_rounds=rounds,
        empty_clusters=int((np.bincount(labels, minlength=k) == 0).sum()),
        gemm_gflop=2.0 * n * k * d * passes / 1e9,
    )
    return centroids, stats
