import numpy as np
import pytest

from rdistill.algo import retrieval
from rdistill.algo.retrieval import NearestRows


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _stream(q, db, block, offset):
    nr = NearestRows(q)
    for s in range(0, db.shape[0], block):
        nr.add(db[s : s + block], np.arange(s, min(s + block, db.shape[0])) + offset)
    return nr


# (_CHUNK_ELEMS, _TILE_ROWS): one tile per block; several row tiles; several query tiles and row tiles
TILINGS = [(1 << 24, 4096), (25 * 50, 1), (10 * 16, 16)]


@pytest.mark.parametrize("chunk, tile_rows", TILINGS)
def test_streamed_top1_equals_full_argmax(monkeypatch, chunk, tile_rows):
    rng = np.random.default_rng(0)
    db = _unit(rng.standard_normal((1000, 16)))
    q = _unit(rng.standard_normal((25, 16)))
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMS", chunk)
    monkeypatch.setattr(retrieval, "_TILE_ROWS", tile_rows)
    nr = _stream(q, db, 137, 10_000)
    full = q @ db.T
    np.testing.assert_array_equal(nr.best_row, full.argmax(1) + 10_000)
    np.testing.assert_allclose(nr.best_score, full.max(1), rtol=1e-5)


@pytest.mark.parametrize("chunk, tile_rows", TILINGS)
def test_ties_keep_the_earliest_row(monkeypatch, chunk, tile_rows):
    # Small-integer vectors: every score is exact whatever the GEMM's blocking, so ties are real ties. Rows repeat
    # within a tile, across tiles and across blocks.
    rng = np.random.default_rng(1)
    base = rng.integers(-2, 3, size=(12, 6)).astype(np.float32)
    db = base[rng.integers(0, 12, size=400)]
    q = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMS", chunk)
    monkeypatch.setattr(retrieval, "_TILE_ROWS", tile_rows)
    nr = _stream(q, db, 53, 7)
    full = q @ db.T
    ties = (full == full.max(1, keepdims=True)).sum(1)
    assert (ties > 1).all()  # the test is about ties
    np.testing.assert_array_equal(nr.best_row, full.argmax(1) + 7)  # argmax: the first maximum
    np.testing.assert_array_equal(nr.best_score, full.max(1))


def test_no_rows_and_empty_blocks():
    q = _unit(np.random.default_rng(2).standard_normal((5, 4)))
    nr = NearestRows(q)
    nr.add(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert nr.best_row.tolist() == [-1] * 5 and np.isneginf(nr.best_score).all()
    nr.add(q[:1], np.array([42]))
    assert nr.best_row.tolist() == [42] * 5
    empty = NearestRows(np.zeros((0, 4), np.float32))
    empty.add(q, np.arange(5))
    assert empty.best_row.shape == (0,)
