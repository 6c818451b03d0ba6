"""The coreset baselines of PDS tables 2 and 5 as pure functions (numpy; no Ray, no I/O).

Features are L2-normalised CLIP embeddings. Herding and k-center work on the *pair* feature
``[img_n, txt_n] / sqrt(2)`` (image and text concatenated, a unit vector), so a pair is judged on both modalities;
CLIP-score filtering ranks pairs by ``cos(img, txt)``; the prototype retrievals take the nearest real caption
(text prototype) or image (image prototype) of each PDS prototype.

* :func:`herding` (Welling 2009; PDS appendix A): starting empty, add the candidate that brings the subset mean
  closest to the target mean (the mean over the whole store).
* :func:`kcenter` (greedy farthest point; PDS appendix A): add the candidate whose distance to the selected set
  is largest; the first is a seeded random candidate.
* :func:`row_priority`: a hash of (seed, global row id) in [0, 1): the ``m`` rows of least priority are a uniform
  random sample, whatever the block size, part layout or executor (a bottom-k sample). ``random`` keeps the ``M``
  least, and herding and k-center choose from the ``pool`` least (the candidate pool).

Ties go to the lower row id everywhere, so results do not depend on how the stream is blocked.
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def row_priority(rows: np.ndarray, seed: int) -> np.ndarray:
    """``rows (n,) int64`` global row ids -> ``(n,) float64`` priorities in [0, 1), a hash of (seed, row)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([seed], dtype=np.uint64))[0]
        h = _splitmix64(np.asarray(rows, dtype=np.int64).astype(np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def pair_features(img_n: np.ndarray, txt_n: np.ndarray) -> np.ndarray:
    """``(n, d)`` unit image and text rows -> ``(n, 2d) float32`` unit pair features ``[img, txt] / sqrt(2)``."""
    return (np.concatenate([img_n, txt_n], axis=1) / np.sqrt(2.0)).astype(np.float32)


class BottomK:
    """The ``k`` items of least key seen over a stream of blocks, with a payload per item (ties: lower row id).
    Memory: ``2k`` payload rows at most."""

    def __init__(self, k: int):
        self.k = k
        self.keys = np.zeros(0, np.float64)
        self.rows = np.zeros(0, np.int64)
        self.payload: np.ndarray | None = None

    def add(self, keys: np.ndarray, rows: np.ndarray, payload: np.ndarray | None = None) -> None:
        keys = np.concatenate([self.keys, np.asarray(keys, np.float64)])
        rows = np.concatenate([self.rows, np.asarray(rows, np.int64)])
        if payload is not None:
            payload = payload if self.payload is None else np.concatenate([self.payload, payload])
        if len(keys) > self.k:
            keep = np.lexsort((rows, keys))[: self.k]
            keys, rows = keys[keep], rows[keep]
            payload = None if payload is None else payload[keep]
        self.keys, self.rows, self.payload = keys, rows, payload

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(keys, rows, payload) sorted by key, then row."""
        order = np.lexsort((self.rows, self.keys))
        return self.keys[order], self.rows[order], None if self.payload is None else self.payload[order]


def herding(feats: np.ndarray, m: int, target: np.ndarray | None = None) -> np.ndarray:
    """Greedy herding on ``feats (n, d) float32``: ``m`` distinct indices, in selection order, each minimising
    ``|| mean(selected + [i]) - target ||``; ``target (d,)`` defaults to the mean of ``feats``. Cost ``O(m n d)``,
    memory ``O(n)`` besides ``feats``."""
    x = np.asarray(feats, dtype=np.float64)
    n = len(x)
    m = min(m, n)
    mu = x.mean(axis=0) if target is None else np.asarray(target, np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    total = np.zeros(x.shape[1])
    taken = np.zeros(n, bool)
    out = np.empty(m, np.int64)
    for t in range(m):
        # || total + x_i - (t + 1) mu ||^2 = |x_i|^2 + 2 x_i . (total - (t + 1) mu) + const
        score = sq + 2.0 * (x @ (total - (t + 1) * mu))
        score[taken] = np.inf
        i = int(np.argmin(score))
        out[t], taken[i] = i, True
        total += x[i]
    return out


def kcenter(feats: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """Greedy k-center on ``feats (n, d) float32`` (Euclidean): ``m`` distinct indices in selection order, the
    first a seeded random one, each next the farthest from those selected. Cost ``O(m n d)``, memory ``O(n)``."""
    x = np.asarray(feats, dtype=np.float64)
    n = len(x)
    m = min(m, n)
    sq = np.einsum("ij,ij->i", x, x)
    first = int(np.random.default_rng(seed).integers(n))
    out = np.empty(m, np.int64)
    out[0] = first
    dist = np.maximum(sq + sq[first] - 2.0 * (x @ x[first]), 0.0)
    dist[first] = -1.0
    for t in range(1, m):
        i = int(np.argmax(dist))
        out[t] = i
        dist = np.minimum(dist, np.maximum(sq + sq[i] - 2.0 * (x @ x[i]), 0.0))
        dist[out[: t + 1]] = -1.0
    return out
