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
    """``(n, d)`` unit image and text rows -> ``(n, 2d) float32`` unit pair features ``[img, txt] / sqrt(2)``
    (one allocation)."""
    n, d = img_n.shape
    out = np.empty((n, d + txt_n.shape[1]), np.float32)
    out[:, :d], out[:, d:] = img_n, txt_n
    return np.divide(out, np.sqrt(2.0), out=out)


def _permute_rows(a: np.ndarray, order: np.ndarray) -> None:
    """``a[:] = a[order]`` in place, one row of scratch memory (``order`` a permutation of ``len(a)``)."""
    seen = np.zeros(len(order), bool)
    for start in np.flatnonzero(order != np.arange(len(order))):
        if seen[start]:
            continue
        tmp, i = a[start].copy(), int(start)
        while True:  # follow the cycle through start
            seen[i] = True
            j = int(order[i])
            if j == start:
                a[i] = tmp
                break
            a[i] = a[j]
            i = j


class BottomK:
    """The ``k`` items of least key seen over a stream of blocks, with a payload per item (ties: lower row id;
    row ids are unique). Memory: a buffer of ``k`` payload rows, filled in place, plus the payload of the block
    rows that enter: once ``k`` items are held, a block's rows at or above the current k-th (key, row) are dropped
    before any merging, and the payload is taken (or built) for the entering rows only, so late blocks cost
    ``O(k)`` key work and almost no payload copying."""

    def __init__(self, k: int):
        self.k = k
        self.keys = np.zeros(0, np.float64)
        self.rows = np.zeros(0, np.int64)
        self._buf: np.ndarray | None = None  # slot i holds the payload of (keys[i], rows[i])

    @property
    def payload(self) -> np.ndarray | None:
        return None if self._buf is None else self._buf[: len(self.keys)]

    def add(self, keys: np.ndarray, rows: np.ndarray, payload=None) -> None:
        """Offer a block: ``keys (b,)``, ``rows (b,) int64`` and ``payload``, a ``(b, ...)`` array or a callable
        ``(idx (s,) int64) -> (s, ...)`` building the payload of the block items ``idx`` only: those that enter."""
        keys = np.asarray(keys, np.float64)
        rows = np.asarray(rows, np.int64)
        idx = np.arange(len(keys))
        n = len(self.keys)
        if n == self.k and len(keys):
            # the current k-th item: the greatest key, and of those the greatest row
            worst_key = self.keys.max()
            worst_row = self.rows[self.keys == worst_key].max()
            idx = np.flatnonzero((keys < worst_key) | ((keys == worst_key) & (rows < worst_row)))
        if len(idx) == 0:
            return
        keys, rows = keys[idx], rows[idx]
        all_keys, all_rows = np.concatenate([self.keys, keys]), np.concatenate([self.rows, rows])
        if len(all_keys) <= self.k:
            slots, enter = np.arange(n, len(all_keys)), idx
            self.keys, self.rows = all_keys, all_rows
        else:
            keep = np.lexsort((all_rows, all_keys))[: self.k]
            stay, new = np.sort(keep[keep < n]), np.sort(keep[keep >= n] - n)
            # the entering items take the slots of those that leave, then the free ones
            gone = np.setdiff1d(np.arange(n), stay, assume_unique=True)
            slots = np.concatenate([gone, np.arange(n, self.k)])[: len(new)]
            self.keys = np.concatenate([self.keys, np.zeros(self.k - n)])
            self.rows = np.concatenate([self.rows, np.zeros(self.k - n, np.int64)])
            self.keys[slots], self.rows[slots] = keys[new], rows[new]
            enter = idx[new]
        if payload is None:
            return
        block = payload(enter) if callable(payload) else np.asarray(payload)[enter]
        if self._buf is None:
            self._buf = np.empty((self.k, *block.shape[1:]), block.dtype)
        self._buf[slots] = block

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(keys, rows, payload) sorted by key, then row. The payload is the buffer itself, sorted in place (no
        second copy of it): call once, at the end."""
        order = np.lexsort((self.rows, self.keys))
        self.keys, self.rows = self.keys[order], self.rows[order]
        payload = self.payload
        if payload is not None:
            _permute_rows(payload, order)
        return self.keys, self.rows, payload


def herding(feats: np.ndarray, m: int, target: np.ndarray | None = None) -> np.ndarray:
    """Greedy herding on ``feats (n, d) float32``: ``m`` distinct indices, in selection order, each minimising
    ``|| mean(selected + [i]) - target ||``; ``target (d,)`` defaults to the mean of ``feats``. Cost ``O(m n d)``;
    the scores are computed in float32 on ``feats`` itself (no copy of it), the running sums in float64; memory
    ``O(n)`` besides ``feats``."""
    x = np.asarray(feats, dtype=np.float32)
    n = len(x)
    m = min(m, n)
    mu = x.mean(axis=0, dtype=np.float64) if target is None else np.asarray(target, np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    total = np.zeros(x.shape[1])
    taken = np.zeros(n, bool)
    out = np.empty(m, np.int64)
    for t in range(m):
        # || total + x_i - (t + 1) mu ||^2 = |x_i|^2 + 2 x_i . (total - (t + 1) mu) + const
        score = sq + 2.0 * (x @ (total - (t + 1) * mu).astype(np.float32))
        score[taken] = np.inf
        i = int(np.argmin(score))
        out[t], taken[i] = i, True
        total += x[i]
    return out


def kcenter(feats: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """Greedy k-center on ``feats (n, d) float32`` (Euclidean): ``m`` distinct indices in selection order, the
    first a seeded random one, each next the farthest from those selected. Cost ``O(m n d)``; distances in float32
    on ``feats`` itself (no copy of it), memory ``O(n)``."""
    x = np.asarray(feats, dtype=np.float32)
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
        np.minimum(dist, np.maximum(sq + sq[i] - 2.0 * (x @ x[i]), 0.0), out=dist)
        dist[out[: t + 1]] = -1.0
    return out
