"""k-means for one modality on a sharded training sample: greedy k-means++ seeding, data-parallel Lloyd iterations,
then split-merge refinement.

PDS clusters image and text embeddings separately with M clusters (paper section 3.2, appendix C.1: mini-batch
k-means). On web data the concept frequencies are heavy-tailed: with plain seeding, frequent concepts soak up several
centroids while rare ones share one, and Lloyd iterations never undo that. Two things fix it here:

* greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with ``2 + log k`` candidates per step as in scikit-learn),
  run on a gathered subsample of the training sample so its cost stays ``O(k^2 d)``;
* split-merge refinement: the cheapest merge of two clusters (Ward's increase of the sum of squared errors,
  ``n_a n_b / (n_a + n_b) |c_a - c_b|^2``) is traded for the most profitable split of another cluster (SSE decrease of
  a bisection along its principal direction, found by power iteration) whenever the split gains more than the merge
  costs. Empty clusters merge at zero cost, so they are re-seeded where they help most.

Every accepted move lowers the sample's SSE, so refinement only improves the k-means objective.

The sample never sits in one place. It is cut into shards of ``shard_rows`` consecutive rows (fixed by the config, not
by the number of workers), each a :class:`KMeansShard` that keeps its rows, labels and projections; the fit
(:func:`fit_sharded`) only broadcasts centroids, directions and cuts and reads back per-cluster sums, counts and
SSE. Every float partial is rounded per shard to a fixed-point integer grid (:class:`FixedPoint`) before shards are
added, so the sums are exact and their order does not matter: the same shards give the same centroids bit for bit
whether they sit in one process (:class:`LocalShards`) or are spread over any number of Ray actors
(:mod:`rdistill.engine.pool`), provided each shard is computed alike.

A shard set may lose shards mid-call (a node died); it then raises :class:`ShardsLost` after moving them to the
survivors, and the fit redoes the phase it was in from that phase's start (a Lloyd step, or the refinement from the
Lloyd centroids). Phases depend only on the centroids they start from, so the result is that of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

_CHUNK = 65536


@dataclass(frozen=True)
class KMeansStats:
    """What :func:`fit_sharded` did: SSE on the training sample after Lloyd and after refinement, moves accepted,
    and the floating-point work of its distance computations (for benchmarks against a GEMM floor)."""

    sample_size: int
    init: str
    sse_lloyd: float
    sse_final: float
    refine_moves: int
    refine_rounds: int
    empty_clusters: int
    gemm_gflop: float  # distance computations done (seeding, Lloyd, searches): 2 n k d per full pass
    shards: int = 1
    restarts: int = 0  # phases redone after shards were lost


_GPU_RESOURCES: list = []


def gpu_resources():
    """This process's one ``faiss.StandardGpuResources`` (its scratch memory and streams), made on first use."""
    if not _GPU_RESOURCES:
        check_faiss_gpu()
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def flat_index(centroids: np.ndarray, gpu: bool, resources=None) -> faiss.Index:
    """A FAISS exact L2 index holding ``centroids`` (k, d) float32, on GPU 0 when ``gpu`` (``resources``: a
    ``faiss.StandardGpuResources`` to use; default: the process's own)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if gpu:
        index = faiss.index_cpu_to_gpu(resources or gpu_resources(), 0, index)
    return index


def check_faiss_gpu() -> int:
    """The number of GPUs this process's faiss sees; raises RuntimeError naming the problem when it has no GPU
    support or sees none (faiss-cpu installed, no CUDA device)."""
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError("this faiss has no GPU support (faiss-cpu is installed: install faiss-gpu instead)")
    n = faiss.get_num_gpus()
    if n < 1:
        raise RuntimeError("faiss has GPU support but sees no GPU (CUDA_VISIBLE_DEVICES, driver)")
    return n


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


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None,
                 idx: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """sum_i w_i x_i per cluster, (k, d) float64, without copying x (float32 weights keep scipy from upcasting x);
    ``idx`` (increasing): the rows of x that ``labels`` label (default: all), summed in place, not gathered."""
    w = np.ones(labels.shape[0], dtype=np.float32) if weights is None else weights.astype(np.float32)
    cols = np.arange(labels.shape[0]) if idx is None else idx
    s = sp.csr_matrix((w, (labels, cols)), shape=(k, x.shape[0]))
    return np.asarray(s @ x, dtype=np.float64)


def _rowwise_dot(x: np.ndarray, idx: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(x[idx[i]] . y[rows[i]]) for all i, chunked so the gathered copies stay small; ``idx`` (increasing) naming
    every row of x reads x in place."""
    out = np.empty(idx.shape[0], dtype=np.float64)
    every = idx.shape[0] == x.shape[0]
    for s in range(0, idx.shape[0], _CHUNK):
        e = min(s + _CHUNK, idx.shape[0])
        out[s:e] = np.einsum("ij,ij->i", x[s:e] if every else x[idx[s:e]], y[rows[s:e]])
    return out


class FixedPoint:
    """Exact, order-free sums of float partials: each shard's float64 partial is rounded to multiples of
    ``2**-bits`` and held as int64, and int64 sums are associative. ``bits`` comes from a bound on any partial's
    magnitude (:meth:`for_sample`), so no sum can overflow."""

    def __init__(self, bits: int):
        self.bits = int(bits)
        self.scale = float(2.0**self.bits)

    @classmethod
    def for_sample(cls, rows: int, max_sqnorm: float) -> FixedPoint:
        """The grid for a sample of ``rows`` rows whose largest squared norm is ``max_sqnorm``: every partial of a
        shard op (sums of x, of x^2, of projections times x, of squared distances) is at most ``4 rows max(|x|^2,
        1)`` in magnitude; 62 bits hold that with a bit to spare."""
        bound = 4.0 * max(rows, 1) * max(float(max_sqnorm), 1.0)
        return cls(int(np.clip(61 - math.ceil(math.log2(bound)), 0, 52)))

    def encode(self, a: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(a, dtype=np.float64) * self.scale).astype(np.int64)

    def decode(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float64) / self.scale


def add_partials(total: dict | None, part: dict) -> dict:
    """Add two op results (dicts of int64 arrays, floats already fixed-point encoded), key by key."""
    if total is None:
        return {k: np.array(v, copy=True) for k, v in part.items()}
    for k, v in part.items():
        total[k] += v
    return total


class KMeansShard:
    """One shard of a k-means training sample and the per-row state of a fit on it.

    x: (n, d) float32 rows, the rows ``[offset, offset + n)`` of the sample. Each op broadcasts small arrays in and
    returns a dict of partials: per-cluster sums as float64 (``fixed`` names them) and counts as int64; the shard set
    encodes the floats (:class:`FixedPoint`) and adds shards. ``labels``, ``proj`` and ``upper`` carry from op to op
    within one phase of a fit, never across phases.
    """

    def __init__(self, x: np.ndarray, offset: int, gpu: bool = False, resources=None):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.offset = int(offset)
        self.n = self.x.shape[0]
        self.gpu, self.resources = gpu, resources
        self.labels = np.zeros(self.n, dtype=np.int64)
        self.upper = np.zeros(self.n, dtype=bool)
        self.proj = np.zeros(self.n, dtype=np.float64)
        self._xsq: np.ndarray | None = None

    @property
    def xsq(self) -> np.ndarray:
        if self._xsq is None:
            self._xsq = _sqnorms(self.x).astype(np.float64)
        return self._xsq

    def max_sqnorm(self) -> float:
        return float(self.xsq.max()) if self.n else 0.0

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The rows at sample indices ``idx`` (sorted, global) that fall in this shard, (m, d) float32."""
        lo, hi = np.searchsorted(idx, [self.offset, self.offset + self.n])
        return self.x[idx[lo:hi] - self.offset]

    # Lloyd ----------------------------------------------------------------------------------------------------------
    def assign(self, centroids: np.ndarray, sums: bool = True, xsq: bool = False, index=None) -> dict:
        """Label each row with its nearest centroid; counts (k,), SSE (1,), (``sums``) per-cluster sums (k, d) and
        (``xsq``) per-cluster sums of squared norms (k,). ``index``: a FAISS index holding ``centroids`` (on GPU),
        built once for all the shards of a call."""
        k = centroids.shape[0]
        if index is None and self.gpu:
            index = flat_index(centroids, True, self.resources)
        self.labels, dist = nearest_centroid(self.x, centroids, index)
        out = {
            "counts": np.bincount(self.labels, minlength=k).astype(np.int64),
            "sse": np.array([dist.sum(dtype=np.float64)]),
        }
        if sums:
            out["sums"] = cluster_sums(self.x, self.labels, k)
        if xsq:
            out["xsq"] = np.bincount(self.labels, weights=self.xsq, minlength=k)
        return out

    # split gains on the stale clusters ``sid`` (ks,) ----------------------------------------------------------------
    def _stale(self, sid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.full(k, -1, dtype=np.int64)
        pos[sid] = np.arange(sid.size)
        p = pos[self.labels]
        idx = np.flatnonzero(p >= 0)
        return idx, p[idx]

    def split_stats(self, sid: np.ndarray, k: int) -> dict:
        """Per stale cluster: counts (ks,), sums (ks, d), sums of squared norms (ks,)."""
        idx, p = self._stale(sid, k)
        return {
            "counts": np.bincount(p, minlength=sid.size).astype(np.int64),
            "sums": cluster_sums(self.x, p, sid.size, idx=idx),
            "xsq": np.bincount(p, weights=self.xsq[idx], minlength=sid.size),
        }

    def _project(self, sid: np.ndarray, k: int, means: np.ndarray, v: np.ndarray):
        idx, p = self._stale(sid, k)
        proj = _rowwise_dot(self.x, idx, v.astype(np.float32), p) - np.einsum("ij,ij->i", means, v)[p]
        return idx, p, proj

    def power(self, sid: np.ndarray, k: int, means: np.ndarray, v: np.ndarray) -> dict:
        """One power-iteration step of each stale cluster's covariance: sum_i p_i x_i (ks, d) and sum_i p_i (ks,),
        p_i = (x_i - m) . v (the covariance-vector product is ``sum_i p_i x_i - m sum_i p_i``)."""
        idx, p, proj = self._project(sid, k, means, v)
        return {"wsum": cluster_sums(self.x, p, sid.size, proj, idx),
                "psum": np.bincount(p, weights=proj, minlength=sid.size)}  # fmt: skip

    def project(self, sid: np.ndarray, k: int, means: np.ndarray, v: np.ndarray) -> dict:
        """Keep each stale row's projection on its cluster's direction; their per-cluster sums (ks,), and the
        first bisection (at 0, the mean) as :meth:`bisect` gives it."""
        idx, p, proj = self._project(sid, k, means, v)
        self.proj[idx] = proj
        return {"psum": np.bincount(p, weights=proj, minlength=sid.size), **self.bisect(sid, k, np.zeros(sid.size))}

    def bisect(self, sid: np.ndarray, k: int, cut: np.ndarray, halves: bool = False) -> dict:
        """Put each stale row on the upper side when its projection exceeds its cluster's ``cut`` (ks,); the
        upper sides' counts and projection sums (ks,), or with ``halves`` the two halves' counts (2 ks,), sums
        (2 ks, d) and sums of squared norms (2 ks,), halves ordered (lower, upper) per cluster."""
        idx, p = self._stale(sid, k)
        up = self.proj[idx] > cut[p]
        self.upper[idx] = up
        if not halves:
            return {"n_up": np.bincount(p, weights=up, minlength=sid.size).astype(np.int64),
                    "s_up": np.bincount(p, weights=self.proj[idx] * up, minlength=sid.size)}  # fmt: skip
        side = p * 2 + up
        return {
            "h_counts": np.bincount(side, minlength=2 * sid.size).astype(np.int64),
            "h_sums": cluster_sums(self.x, side, 2 * sid.size, idx=idx),
            "h_xsq": np.bincount(side, weights=self.xsq[idx], minlength=2 * sid.size),
        }

    def apply(self, relabel: np.ndarray, split_to: np.ndarray) -> dict:
        """Merge and split moves: label l becomes ``relabel[l]``; the upper rows of a split cluster s go to
        ``split_to[s]`` (>= 0). Counts (k,), sums (k, d) and sums of squared norms (k,) of the new clusters."""
        k = relabel.shape[0]
        new = relabel[self.labels]
        moved = (split_to[self.labels] >= 0) & self.upper
        new[moved] = split_to[self.labels[moved]]
        self.labels = new
        return {"counts": np.bincount(new, minlength=k).astype(np.int64), "sums": cluster_sums(self.x, new, k),
                "xsq": np.bincount(new, weights=self.xsq, minlength=k)}  # fmt: skip


FIXED = frozenset({"sums", "sse", "xsq", "wsum", "psum", "s_up", "h_sums", "h_xsq"})  # float partials


def run_on_shards(shards: list[KMeansShard], fp: FixedPoint, op: str, *args, **kwargs) -> dict:
    """``op`` on each shard in order, float partials encoded with ``fp``, added: exact, so any grouping of the
    shards (one process, any number of actors) gives the same int64 totals."""
    total = None
    if op == "assign" and shards and shards[0].gpu:  # one GPU copy of the centroids for all these shards
        kwargs = {**kwargs, "index": flat_index(args[0], True, shards[0].resources)}
    for s in shards:
        part = getattr(s, op)(*args, **kwargs)
        total = add_partials(total, {k: fp.encode(v) if k in FIXED else v for k, v in part.items()})
    return total or {}


class ShardsLost(Exception):  # noqa: N818 (a signal to redo a phase, not an error)
    """Raised by a shard set when shards were lost mid-call (and already moved to surviving holders)."""


class LocalShards:
    """All shards in this process: the local executor's shard set, and the reference for any other.

    ``shards``: the :class:`KMeansShard` list in sample order. ``call`` runs an op on every shard and returns the
    exact total, floats decoded to float64; ``gather`` returns the rows at given sample indices; ``knn`` searches
    a small base (merge costs) where the shards' compute is (GPU when ``gpu``)."""

    def __init__(self, shards: list[KMeansShard], gpu: bool = False):
        self.shards, self.gpu = shards, gpu
        self.rows = sum(s.n for s in shards)
        self.fp = FixedPoint.for_sample(self.rows, max((s.max_sqnorm() for s in shards), default=0.0))
        self.calls = 0

    @classmethod
    def from_array(cls, x: np.ndarray, shard_rows: int, gpu: bool = False) -> LocalShards:
        x = np.ascontiguousarray(x, dtype=np.float32)
        res = gpu_resources() if gpu else None
        return cls([KMeansShard(x[s : s + shard_rows], s, gpu, res) for s in range(0, x.shape[0], shard_rows)], gpu)

    def call(self, op: str, *args, **kwargs) -> dict:
        self.calls += 1
        return decode(run_on_shards(self.shards, self.fp, op, *args, **kwargs), self.fp)

    def gather(self, idx: np.ndarray) -> np.ndarray:
        return np.concatenate([s.rows(idx) for s in self.shards])

    def knn(self, queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return knn_search(queries, base, k, self.gpu)


def knn_search(queries: np.ndarray, base: np.ndarray, k: int, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 top-k of each query row in ``base``: (q, k) float32 distances, (q, k) int64 indices."""
    queries, base = np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(base, dtype=np.float32)
    if not gpu:
        return faiss.knn(queries, base, k)
    return flat_index(base, True).search(queries, k)


def decode(total: dict, fp: FixedPoint) -> dict:
    return {k: fp.decode(v) if k in FIXED else v for k, v in total.items()}


def merge_costs(centroids: np.ndarray, counts: np.ndarray, neighbours: int = 8, knn: Callable | None = None):
    """Cheapest Ward merge of each cluster with one of its nearest centroids.

    Returns cost (k,) float64 and partner (k,) int64; ``cost = n_a n_b / (n_a + n_b) |c_a - c_b|^2`` (0 for an empty
    cluster, which merges for free). ``knn(queries, base, k)``: the search to use (default: FAISS on this CPU).
    """
    k = centroids.shape[0]
    kn = min(k, neighbours + 1)
    dist, nbr = (knn or knn_search)(centroids, centroids, kn)
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


def _means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return sums / np.maximum(counts, 1)[:, None]


def split_gains(shards, sid: np.ndarray, k: int, d: int, seed: int, power_iters: int = 4, two_means_iters: int = 5,
                stats: dict | None = None) -> np.ndarray:  # fmt: skip
    """Best bisection of each cluster in ``sid`` (ks,) along its principal direction, over a shard set; returns
    the gains (ks,) float64 (SSE decrease if split; 0 for clusters that cannot be split) and leaves each stale row's
    side in its shard's ``upper``. The direction comes from ``power_iters`` distributed power iterations; the cut
    along it from 1-D 2-means on the projections, not the mean: a small concept merged into a large one sits far out
    on one side, and a cut at the mean would halve the large one instead of isolating it. ``stats``: the
    counts, sums and squared-norm sums of all k clusters as they stand (from the op that labelled them), which saves
    a round."""
    st = {key: stats[key][sid] for key in ("counts", "sums", "xsq")} if stats else shards.call("split_stats", sid, k)
    counts = st["counts"].astype(np.float64)
    means = _means(st["sums"], counts)
    sse = st["xsq"] - counts * _sqnorms(means)
    v = np.random.default_rng(seed).standard_normal((sid.size, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(power_iters):
        r = shards.call("power", sid, k, means, v)
        v = r["wsum"] - means * r["psum"][:, None]
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.where(norm > 0, v / np.where(norm > 0, norm, 1), v)
    r = shards.call("project", sid, k, means, v)  # and the first bisection, at the mean
    s_all, cut = r["psum"], np.zeros(sid.size)
    for it in range(two_means_iters):
        if it:
            r = shards.call("bisect", sid, k, cut)
        n_up, s_up = r["n_up"].astype(np.float64), r["s_up"]
        with np.errstate(invalid="ignore", divide="ignore"):
            cut = 0.5 * (s_up / n_up + (s_all - s_up) / (counts - n_up))
        cut = np.where(np.isfinite(cut), cut, 0.0)
    h = shards.call("bisect", sid, k, cut, halves=True)
    h_counts = h["h_counts"].astype(np.float64)
    h_sse = h["h_xsq"] - h_counts * _sqnorms(_means(h["h_sums"], h_counts))
    gain = sse - h_sse.reshape(-1, 2).sum(1)
    gain[(h_counts.reshape(-1, 2) == 0).any(1)] = 0.0
    return np.maximum(gain, 0.0)


def _moves_to_maps(k: int, moves: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    relabel = np.arange(k)
    split_to = np.full(k, -1)
    for a, b, s in moves:
        relabel[b] = a
        split_to[s] = b
    return relabel, split_to


def _centroids_from(r: dict, old: np.ndarray) -> np.ndarray:
    """Means of the clusters that have members; empty ones keep their old centroid (refinement re-seeds them)."""
    c = old.copy()
    filled = r["counts"] > 0
    c[filled] = (r["sums"][filled] / r["counts"][filled, None]).astype(np.float32)
    return c


def fit_sharded(
    shards,
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
    max_restarts: int = 8,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, KMeansStats]:
    """k-means on a sharded training sample (:class:`LocalShards`, or a pool of Ray actors holding the shards).

    ``init`` is ``"kmeans++"`` (greedy, on at most ``seed_points_per_centroid * k`` rows gathered from the shards and
    projected on their top ``seed_dims`` principal components), ``"random"`` (k distinct rows), or ``"auto"``
    (k-means++ up to ``kmeanspp_max_k`` clusters). Then ``niter`` Lloyd iterations (each: nearest centroids on every
    shard, per-cluster sums reduced, new centroids the means; an empty cluster keeps its centroid), then up to
    ``refine_rounds`` rounds of split-merge moves (members relabelled on the shards, plus ``refine_niter`` Lloyd
    iterations per round if > 0), and ``final_niter`` Lloyd iterations once refinement moved anything; a move is
    taken when its split gain exceeds ``min_gain_ratio`` times its merge cost. ``on_phase(name)`` is called as each
    phase starts (progress). Returns centroids (k, d) float32 and :class:`KMeansStats`.
    """
    n = shards.rows
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    rng = np.random.default_rng(seed)
    restarts = 0

    def phase(name: str, fn):
        nonlocal restarts
        while True:
            if on_phase is not None:
                on_phase(name)
            try:
                return fn()
            except ShardsLost as e:
                restarts += 1
                if restarts > max_restarts:
                    raise RuntimeError(f"k-means: shards lost {restarts} times, giving up") from e
                log.warning("k-means: %s; redoing %s from its start", e, name)

    method = ("kmeans++" if k <= kmeanspp_max_k else "random") if init == "auto" else init
    passes = 0.0  # full (n x k) distance passes
    if method == "kmeans++":
        m = min(n, max(k, seed_points_per_centroid * k))
        idx = np.arange(n) if m == n else np.sort(rng.choice(n, size=m, replace=False))
        sub = phase("seeding", lambda: shards.gather(idx))
        centroids = np.ascontiguousarray(sub[kmeanspp(pca_project(sub, seed_dims), k, rng)])
        passes += (2 + int(math.log(k))) * m / n
    elif method == "random":
        idx = np.sort(rng.choice(n, size=k, replace=False))
        centroids = np.ascontiguousarray(phase("seeding", lambda: shards.gather(idx)))
    else:
        raise ValueError(f"unknown k-means init {init!r}: use auto, kmeans++ or random")
    d = centroids.shape[1]

    def lloyd(c: np.ndarray, iters: int, name: str) -> np.ndarray:
        for it in range(iters):
            c = phase(f"{name} {it + 1}/{iters}", lambda c=c: _centroids_from(shards.call("assign", c), c))
        return c

    centroids = lloyd(centroids, niter, "lloyd")
    passes += niter

    def refine(c: np.ndarray):
        """From Lloyd's centroids: label the sample, then split-merge rounds. State lives on the shards, so a
        lost shard redoes all of this."""
        r = shards.call("assign", c, xsq=True)
        counts, sse_lloyd, p, stats = r["counts"], float(r["sse"][0]), 1.0, r
        moves_total = rounds = 0
        gain, stale = np.zeros(k), np.ones(k, dtype=bool)
        for rounds in range(1, refine_rounds + 1):
            sid = np.flatnonzero(stale)
            gain[sid] = split_gains(shards, sid, k, d, seed + rounds, stats=stats)
            cost, partner = merge_costs(c, counts, knn=shards.knn)
            moves = _plan_moves(gain, cost, partner, min_gain_ratio)
            if not moves:
                rounds -= 1
                break
            r = shards.call("apply", *_moves_to_maps(k, moves))
            c, counts, stats = _centroids_from(r, c), r["counts"], r
            moves_total += len(moves)
            stale[:] = False
            stale[np.asarray(moves).ravel()] = True
            if refine_niter > 0:
                c = _lloyd_inline(shards, c, refine_niter)
                stats = shards.call("assign", c, xsq=True)
                counts = stats["counts"]
                p += refine_niter + 1
                stale[:] = True
        return c, counts, sse_lloyd, moves_total, rounds, p

    centroids, counts, sse_lloyd, moves_total, rounds, p = phase("refine", lambda: refine(centroids))
    passes += p
    sse_final = sse_lloyd
    if moves_total:
        centroids = lloyd(centroids, final_niter, "final lloyd")
        r = phase("final assign", lambda: shards.call("assign", centroids, sums=False))
        counts, sse_final = r["counts"], float(r["sse"][0])
        passes += final_niter + 1
    stats = KMeansStats(
        sample_size=n,
        init=method,
        sse_lloyd=sse_lloyd,
        sse_final=sse_final,
        refine_moves=moves_total,
        refine_rounds=rounds,
        empty_clusters=int((counts == 0).sum()),
        gemm_gflop=2.0 * n * k * d * passes / 1e9,
        shards=len(getattr(shards, "shards", ())) or int(getattr(shards, "num_shards", 1)),
        restarts=restarts,
    )
    return centroids, stats


def _lloyd_inline(shards, c: np.ndarray, iters: int) -> np.ndarray:
    for _ in range(iters):
        c = _centroids_from(shards.call("assign", c), c)
    return c


def fit_kmeans(x: np.ndarray, k: int, *, shard_rows: int = 1 << 16, gpu: bool = False, **kwargs):
    """:func:`fit_sharded` on an in-memory sample ``x`` (n, d) float32, cut into shards of ``shard_rows`` rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    return fit_sharded(LocalShards.from_array(x, shard_rows, gpu), k, **kwargs)
