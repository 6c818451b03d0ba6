"""Prototypes from matched clusters (paper section 3.2 and appendix C.2, C.3).

A prototype is a *cell* of the contingency table: an (image cluster, text cluster) pair. Its image and text
prototypes are the means of the embeddings of the pairs that fall in that cell only (the shared pairs; appendix
C.2's filtering). Cells with no shared pair ("pairless") are handled by a policy:

* ``keep``: use the two cluster centres (the authors' choice for small M);
* ``drop``: discard them, so fewer than M prototypes come out (the paper's advice for large M, Table 10);
* ``refill`` (ours): replace each pairless match (i, j) by the unused cell with the most shared pairs in image row i
  or text column j, else the unused cell with the most shared pairs anywhere. Every prototype then has shared pairs,
  there are still M of them as long as the table has M non-zero cells, and no pair feeds two prototypes (distinct
  cells hold distinct pairs). Refilled cells are secondary modes of an image or text cluster next to the empty match,
  so the region of the embedding space it stood for stays covered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from rdistill.algo.matching import Matching

log = logging.getLogger(__name__)

PAIRLESS_POLICIES = ("keep", "drop", "refill")


@dataclass(frozen=True)
class CellPlan:
    """cells: (p, 2) int64 (image cluster, text cluster); shared: (p,) int64 shared pairs; pairless: (p,) bool;
    refilled: (p,) bool (cell chosen by the refill policy)."""

    cells: np.ndarray
    shared: np.ndarray
    pairless: np.ndarray
    refilled: np.ndarray


def _refill(counts: sp.csr_matrix, matching: Matching, pairless_rows: np.ndarray) -> list[tuple[int, int, int]]:
    k = counts.shape[0]
    used = {int(i) * k + int(j) for i, j in enumerate(matching.txt_of_img)}
    csc = counts.tocsc()
    coo = counts.tocoo()
    order = np.lexsort((coo.row * k + coo.col, -coo.data))
    global_cells = iter(zip(coo.row[order], coo.col[order], coo.data[order]))
    out = []
    for i in pairless_rows:
        j = int(matching.txt_of_img[i])
        row = (
            counts.indices[counts.indptr[i] : counts.indptr[i + 1]],
            counts.data[counts.indptr[i] : counts.indptr[i + 1]],
        )
        col = csc.indices[csc.indptr[j] : csc.indptr[j + 1]], csc.data[csc.indptr[j] : csc.indptr[j + 1]]
        cands = [(int(c), int(i), int(jj)) for jj, c in zip(*row)] + [(int(c), int(ii), j) for ii, c in zip(*col)]
        cands = [c for c in cands if c[0] > 0 and c[1] * k + c[2] not in used]
        if cands:
            best = max(cands, key=lambda c: (c[0], -(c[1] * k + c[2])))
        else:
            best = next(
                ((int(c), int(a), int(b)) for a, b, c in global_cells if int(a) * k + int(b) not in used), None
            )
            if best is None:
                log.warning("refill: the contingency table has no unused non-zero cell left; fewer prototypes")
                continue
        used.add(best[1] * k + best[2])
        out.append((best[1], best[2], best[0]))
    return out


def plan_cells(counts: sp.csr_matrix, matching: Matching, policy: str) -> CellPlan:
    """The cells that become prototypes under a pairless ``policy`` (see module docstring)."""
    if policy not in PAIRLESS_POLICIES:
        raise ValueError(f"unknown pairless policy {policy!r}: use one of {', '.join(PAIRLESS_POLICIES)}")
    k = counts.shape[0]
    img = np.arange(k, dtype=np.int64)
    cells = np.stack([img, matching.txt_of_img], axis=1)
    shared = matching.shared.copy()
    pairless = shared == 0
    refilled = np.zeros(k, dtype=bool)
    if policy == "keep" or not pairless.any():
        return CellPlan(cells, shared, pairless, refilled)
    keep = ~pairless
    cells, shared = cells[keep], shared[keep]
    if policy == "refill":
        extra = _refill(sp.csr_matrix(counts), matching, np.flatnonzero(pairless))
        if extra:
            extra_arr = np.asarray(extra, dtype=np.int64)
            cells = np.concatenate([cells, extra_arr[:, :2]])
            shared = np.concatenate([shared, extra_arr[:, 2]])
    n = cells.shape[0]
    refilled = np.arange(n) >= int(keep.sum())
    return CellPlan(cells, shared, np.zeros(n, dtype=bool), refilled)


@dataclass
class CellSums:
    """Sums over the pairs of some planned cells (a block's, a part's): ``ids`` (c,) int64 sorted cell ids,
    ``img_sum``/``txt_sum`` (c, d) float64, ``count`` (c,) int64, raw-norm sums (c,) float64. Partials of
    :class:`CellMeans`, summed in a fixed order so a result does not depend on where they were computed."""

    ids: np.ndarray
    img_sum: np.ndarray
    txt_sum: np.ndarray
    count: np.ndarray
    img_norm_sum: np.ndarray
    txt_norm_sum: np.ndarray

    @staticmethod
    def combine(parts: list[CellSums], dim: int) -> CellSums:
        """One :class:`CellSums` from several, added in list order."""
        parts = [q for q in parts if q.ids.size]
        if not parts:
            z = np.zeros(0)
            return CellSums(np.zeros(0, np.int64), np.zeros((0, dim)), np.zeros((0, dim)), np.zeros(0, np.int64), z, z)
        if len(parts) == 1:
            return parts[0]
        ids, inv = np.unique(np.concatenate([q.ids for q in parts]), return_inverse=True)
        out = CellSums(ids, np.zeros((ids.size, dim)), np.zeros((ids.size, dim)), np.zeros(ids.size, np.int64),
                       np.zeros(ids.size), np.zeros(ids.size))  # fmt: skip
        start = 0
        for q in parts:
            at = inv[start : start + q.ids.size]
            start += q.ids.size
            out.img_sum[at] += q.img_sum
            out.txt_sum[at] += q.txt_sum
            out.count[at] += q.count
            out.img_norm_sum[at] += q.img_norm_sum
            out.txt_norm_sum[at] += q.txt_norm_sum
        return out


class CellMeans:
    """Streaming means of the image and text embeddings of the pairs in each planned cell.

    State: two (p, d) float64 sums, counts, and sums of raw norms; memory never depends on N. :meth:`sums` computes
    a block's partial without touching the state (a worker can hold a part's partial, O(cells it touches));
    :meth:`add_sums` adds one.
    """

    def __init__(self, plan: CellPlan, k: int, dim: int, *, state: bool = True):
        self.k, self.dim = k, dim
        codes = plan.cells[:, 0] * k + plan.cells[:, 1]
        self._order = np.argsort(codes, kind="stable")
        self._codes = codes[self._order]
        p = codes.shape[0] if state else 0
        self.img_sum = np.zeros((p, dim), dtype=np.float64)
        self.txt_sum = np.zeros((p, dim), dtype=np.float64)
        self.count = np.zeros(p, dtype=np.int64)
        self.img_norm_sum = np.zeros(p, dtype=np.float64)
        self.txt_norm_sum = np.zeros(p, dtype=np.float64)

    def sums(self, img_emb, txt_emb, img_labels, txt_labels, img_norms=None, txt_norms=None) -> CellSums:
        """A block of kept pairs -> its :class:`CellSums`: embeddings (b, d) float32, labels (b,) int, raw norms (b,)
        float32 or None."""
        codes = img_labels.astype(np.int64) * self.k + txt_labels.astype(np.int64)
        pos = np.searchsorted(self._codes, codes)
        pos = np.minimum(pos, self._codes.size - 1)
        hit = self._codes[pos] == codes
        rows = np.flatnonzero(hit)
        ids, inv = np.unique(self._order[pos[hit]], return_inverse=True)
        # a (cells x rows) 0/1 matrix times the block sums each cell's rows in one sparse GEMM, without a gather
        members = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (inv, rows)), shape=(ids.size, codes.size))
        zero = np.zeros(ids.size)
        return CellSums(
            ids,
            np.asarray(members @ img_emb, dtype=np.float64),
            np.asarray(members @ txt_emb, dtype=np.float64),
            np.bincount(inv, minlength=ids.size).astype(np.int64),
            zero if img_norms is None else np.bincount(inv, weights=img_norms[rows], minlength=ids.size),
            zero if txt_norms is None else np.bincount(inv, weights=txt_norms[rows], minlength=ids.size),
        )

    def add_sums(self, q: CellSums) -> None:
        if not q.ids.size:
            return
        self.img_sum[q.ids] += q.img_sum
        self.txt_sum[q.ids] += q.txt_sum
        self.count[q.ids] += q.count
        self.img_norm_sum[q.ids] += q.img_norm_sum
        self.txt_norm_sum[q.ids] += q.txt_norm_sum

    def add(self, img_emb, txt_emb, img_labels, txt_labels, img_norms=None, txt_norms=None) -> None:
        """Add a block of kept pairs (see :meth:`sums`)."""
        self.add_sums(self.sums(img_emb, txt_emb, img_labels, txt_labels, img_norms, txt_norms))

    def means(self):
        """img (p, d) float32, txt (p, d) float32, img mean raw norm (p,), txt mean raw norm (p,); NaN rows where a
        cell received no pair."""
        with np.errstate(invalid="ignore", divide="ignore"):
            c = self.count.astype(np.float64)
            return (
                (self.img_sum / c[:, None]).astype(np.float32),
                (self.txt_sum / c[:, None]).astype(np.float32),
                self.img_norm_sum / c,
                self.txt_norm_sum / c,
            )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (n, d) arrays, (n,) float32 (0 for zero rows)."""
    num = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0).astype(np.float32)
