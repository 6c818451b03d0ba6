"""Caption retrieval (paper section 3.2): the real caption nearest (cosine) to each text prototype, over a stream."""

from __future__ import annotations

import numpy as np

_CHUNK_ELEMS = 1 << 24


class NearestRows:
    """Running top-1 inner product of each query over database blocks that arrive one at a time.

    queries: (q, d) float32, unit rows. After all blocks, ``best_row`` (q,) int64 holds the global id of the best
    row (-1 if none) and ``best_score`` (q,) float32 its score; ties keep the earliest row.
    """

    def __init__(self, queries: np.ndarray):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.best_score = np.full(self.queries.shape[0], -np.inf, dtype=np.float32)
        self.best_row = np.full(self.queries.shape[0], -1, dtype=np.int64)

    def add(self, block: np.ndarray, rows: np.ndarray) -> None:
        """block: (b, d) float32 unit rows; rows: (b,) int64 their global ids, increasing."""
        if block.shape[0] == 0:
            return
        # (q, rows) GEMMs and a row argmax, in row chunks of at most _CHUNK_ELEMS scores: FAISS's k=1 search is
        # slow when the queries are few and the database block is large (small GEMM tiles, a heap per query)
        step = max(1, _CHUNK_ELEMS // self.queries.shape[0])
        for s in range(0, block.shape[0], step):
            scores = self.queries @ block[s : s + step].T  # (q, rows): argmax along contiguous rows
            idx = scores.argmax(1)
            self._update(scores[np.arange(idx.size), idx], rows[s + idx])

    def _update(self, score: np.ndarray, row: np.ndarray) -> None:
        better = score > self.best_score
        self.best_score[better] = score[better]
        self.best_row[better] = row[better]
