import numpy as np

from rdistill.algo import retrieval
from rdistill.algo.retrieval import NearestRows


def test_streamed_top1_equals_full_argmax(monkeypatch):
    rng = np.random.default_rng(0)
    db = rng.standard_normal((1000, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((25, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMS", 25 * 50)  # several chunks per block
    nr = NearestRows(q)
    for s in range(0, 1000, 137):
        nr.add(db[s : s + 137], np.arange(s, min(s + 137, 1000)) + 10_000)
    full = q @ db.T
    np.testing.assert_array_equal(nr.best_row, full.argmax(1) + 10_000)
    np.testing.assert_allclose(nr.best_score, full.max(1), rtol=1e-5)
