"""Caption retrieval (paper section 3.2): the real caption nearest (cosine) to each text prototype, over a stream."""

from __future__ import annotations

import numpy as np

# One GEMM tile: at most _CHUNK_ELEMS scores (float32: 64 MiB), and at least _TILE_ROWS database rows whatever the
# number of queries, so the tile stays a large GEMM in both directions.
_CHUNK_ELEMS = 1 << 24
_TILE_ROWS = 4096


class NearestRows:
    """Running top-1 inner product of each query over database blocks that arrive one at a time.

    queries: (q, d) float32, unit rows. After all blocks, ``best_row`` (q,) int64 holds the global id of the best
    row (-1 if none) and ``best_score`` (q,) float32 its score; ties keep the earliest row (on GPU, ``gpu``: a
    FAISS inner-product search per block, where ties within a block may fall on either row).
    """

    def __init__(self, queries: np.ndarray, gpu: bool = False):
        self.gpu = gpu
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.best_score = np.full(self.queries.shape[0], -np.inf, dtype=np.float32)
        self.best_row = np.full(self.queries.shape[0], -1, dtype=np.int64)

    def add(self, block: np.ndarray, rows: np.ndarray) -> None:
        """block: (b, d) float32 unit rows; rows: (b,) int64 their global ids, increasing (across calls too)."""
        b, q = block.shape[0], self.queries.shape[0]
        if b == 0 or q == 0:
            return
        block = np.asarray(block, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        if self.gpu:
            self._add_gpu(block, rows)
            return
        # Exact (q, rows) GEMM tiles and an argmax along each tile's contiguous rows. Tiling over the queries as
        # well as the rows keeps every tile a large GEMM: with q = 100k prototypes a row-only chunking under the
        # same score budget gives 167-row GEMMs that re-read all queries for every chunk (1.24x slower on 2 cores,
        # `python -m rdistill.dev.bench_matching captions`). FAISS's k=1 search is no faster and the BLAS bundled
        # with faiss-cpu may not recognise the CPU; numpy's does.
        row_step = min(b, max(_TILE_ROWS, _CHUNK_ELEMS // q))
        q_step = max(1, _CHUNK_ELEMS // row_step)
        for r0 in range(0, b, row_step):  # row tiles in order: with a strict ">" ties keep the earliest row
            db_t = block[r0 : r0 + row_step].T
            for q0 in range(0, q, q_step):
                scores = self.queries[q0 : q0 + q_step] @ db_t  # (q_step, row_step)
                idx = scores.argmax(1)  # first maximum: the earliest row within the tile
                self._update(q0, scores[np.arange(idx.size), idx], rows[r0 + idx])

    def _add_gpu(self, block: np.ndarray, rows: np.ndarray) -> None:
        import faiss

        from rdistill.algo.kmeans import gpu_resources

        index = faiss.index_cpu_to_gpu(gpu_resources(), 0, faiss.IndexFlatIP(block.shape[1]))
        index.add(np.ascontiguousarray(block))
        score, idx = index.search(self.queries, 1)
        self._update(0, score[:, 0], rows[idx[:, 0]])

    def _update(self, q0: int, score: np.ndarray, row: np.ndarray) -> None:
        best_score = self.best_score[q0 : q0 + score.size]
        best_row = self.best_row[q0 : q0 + score.size]
        better = score > best_score
        best_score[better] = score[better]
        best_row[better] = row[better]
