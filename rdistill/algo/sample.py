"""Row samples that depend on the global row id only: the same rows are drawn whatever the store's parts, block
sizes or workers, and a part's share is drawn from that part alone (memory follows the part, not N)."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def row_uniforms(rows: np.ndarray, key: int) -> np.ndarray:
    """A uniform in [0, 1) for each global row id in ``rows`` (int64), under the 64-bit ``key``: splitmix64 of
    ``row + key * golden``, its top 53 bits. (n,) float64."""
    with np.errstate(over="ignore"):
        z = np.asarray(rows, dtype=np.uint64) + np.uint64(key) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def bernoulli_rows(start: int, count: int, share: float, key: int) -> np.ndarray:
    """The global row ids in ``[start, start + count)`` drawn with probability ``share`` each (independently, by
    :func:`row_uniforms`), sorted, int64."""
    rows = np.arange(start, start + count, dtype=np.int64)
    if share >= 1.0:
        return rows
    return rows[row_uniforms(rows, key) < share]
