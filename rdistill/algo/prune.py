"""Similarity pruning (paper section 3.2): drop the ``prune_ratio`` least-aligned pairs, by a global quantile.

The cut is exact and deterministic at any N with bounded memory: pairs are ordered by (cosine similarity, global row
index) and the first ``floor(prune_ratio * n)`` are dropped. A histogram pass finds the bin that holds the cut, and a
second pass over the similarities (4 bytes a row, spilled by the caller) sorts just that bin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from rdistill.io.rowpool import for_row_ranges

SimBlocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def pair_similarity(img_emb: np.ndarray, txt_emb: np.ndarray) -> np.ndarray:
    """Row-wise dot product of (n, d) arrays: the cosine similarity of each pair when rows are unit. (n,) float32.
    Row ranges run on this process's cores (each row's sum is the same whatever the ranges)."""
    out = np.empty(img_emb.shape[0], dtype=np.float32)

    def work(r0: int, r1: int) -> None:
        np.einsum("ij,ij->i", img_emb[r0:r1], txt_emb[r0:r1], dtype=np.float32, out=out[r0:r1])

    for_row_ranges(work, img_emb.shape[0])
    return out


def _bins(sims: np.ndarray, num_bins: int) -> np.ndarray:
    b = ((np.clip(sims.astype(np.float64), -1.0, 1.0) + 1.0) * (num_bins / 2.0)).astype(np.int64)
    return np.minimum(b, num_bins - 1)


@dataclass(frozen=True)
class PruneCut:
    """A row is kept iff ``(sim, row) > (sim_cut, row_cut)`` in lexicographic order; nothing is cut when
    ``n_drop == 0``."""

    n_valid: int
    n_drop: int
    sim_cut: float
    row_cut: int

    def keep(self, sims: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(n,) bool mask for float32 sims and int64 global row ids."""
        if self.n_drop == 0:
            return np.ones(sims.shape[0], dtype=bool)
        cut = np.float32(self.sim_cut)
        return (sims > cut) | ((sims == cut) & (rows > self.row_cut))


def level_histogram(sims: np.ndarray, num_bins: int, low_bits: int, coarse_bin: int | None = None) -> np.ndarray:
    """One level of the histogram over [-1, 1] in ``num_bins`` fine bins, counted ``2**low_bits`` fine bins at a time:
    with ``coarse_bin`` None, the ``(num_bins >> low_bits,)`` int64 counts of the coarse bins (fine bin >>
    ``low_bits``); else the ``(2**low_bits,)`` counts of the fine bins inside coarse bin ``coarse_bin``. Two small
    partials per part instead of one of ``num_bins`` counts; the fine bin they find is the one
    :func:`sims_histogram` would (the cut is the same)."""
    f = _bins(sims, num_bins)
    if coarse_bin is None:
        return np.bincount(f >> low_bits, minlength=num_bins >> low_bits).astype(np.int64)
    inside = f[(f >> low_bits) == coarse_bin]
    return np.bincount(inside & ((1 << low_bits) - 1), minlength=1 << low_bits).astype(np.int64)


def sims_histogram(sims: np.ndarray, num_bins: int = 1 << 20) -> np.ndarray:
    """(num_bins,) int64 counts of valid float32 cosines in equal-width bins over [-1, 1]: one partial of the
    histogram pass, summed over blocks or parts in any order."""
    return np.bincount(_bins(sims, num_bins), minlength=num_bins).astype(np.int64)


def cut_bin(hist: np.ndarray, n_valid: int, n_drop: int) -> tuple[int, int]:
    """The bin holding the ``n_drop``-th lowest cosine, and how many rows lie in the bins below it."""
    if int(hist.sum()) != n_valid:
        raise ValueError(f"similarity stream has {int(hist.sum())} rows, expected {n_valid}")
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, n_drop))  # first bin whose cumulative count reaches n_drop
    return b, int(cum[b - 1]) if b > 0 else 0


def rows_in_bin(sims: np.ndarray, rows: np.ndarray, b: int, num_bins: int = 1 << 20):
    """The (sims, rows) of one block or part that fall in bin ``b``."""
    sel = _bins(sims, num_bins) == b
    return sims[sel], rows[sel]


def cut_in_bin(s: np.ndarray, r: np.ndarray, n_valid: int, n_drop: int, below: int) -> PruneCut:
    """The exact cut from every (sim, row) of the cut bin, ``below`` rows lying under the bin."""
    order = np.lexsort((r, s))
    last = order[n_drop - below - 1]
    return PruneCut(n_valid, n_drop, float(s[last]), int(r[last]))


def drop_count(n_valid: int, prune_ratio: float) -> int:
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    return int(np.floor(prune_ratio * n_valid))


def find_prune_cut(sim_blocks: SimBlocks, n_valid: int, prune_ratio: float, num_bins: int = 1 << 20) -> PruneCut:
    """Exact cut for ``prune_ratio`` in [0, 1) over ``n_valid`` rows.

    sim_blocks: a callable returning a fresh iterable of (sims (b,) float32, rows (b,) int64) over all valid rows; it
    is called twice. Memory: the histogram plus the rows of one bin.
    """
    n_drop = drop_count(n_valid, prune_ratio)
    if n_drop == 0:
        return PruneCut(n_valid, 0, float("-inf"), -1)
    hist = np.zeros(num_bins, dtype=np.int64)
    for sims, _ in sim_blocks():
        hist += sims_histogram(sims, num_bins)
    b, below = cut_bin(hist, n_valid, n_drop)
    picked = [rows_in_bin(sims, rows, b, num_bins) for sims, rows in sim_blocks()]
    s, r = np.concatenate([x[0] for x in picked]), np.concatenate([x[1] for x in picked])
    return cut_in_bin(s, r, n_valid, n_drop, below)
