import numpy as np
import scipy.sparse as sp

from rdistill.algo.cells import CellMeans, cosine, plan_cells
from rdistill.algo.matching import match_clusters


def table():
    # 4 clusters; the optimum matches (0,0) (1,1) (2,3) and leaves (3,2) pairless.
    counts = np.array([[9, 2, 0, 0], [0, 8, 0, 0], [0, 4, 0, 6], [0, 0, 0, 0]])
    return sp.csr_matrix(counts), match_clusters(sp.csr_matrix(counts))


def test_policies():
    counts, m = table()
    assert m.objective == 23 and (m.shared == 0).sum() == 1
    keep = plan_cells(counts, m, "keep")
    assert len(keep.cells) == 4 and keep.pairless.sum() == 1
    drop = plan_cells(counts, m, "drop")
    assert len(drop.cells) == 3 and not drop.pairless.any()
    refill = plan_cells(counts, m, "refill")
    assert len(refill.cells) == 4 and not refill.pairless.any()
    assert (refill.shared > 0).all()
    codes = {tuple(c) for c in refill.cells.tolist()}
    assert len(codes) == 4, "a cell may feed only one prototype"
    # pairless match (3, 2): row 3 is empty, column 2 too, so the best unused cell anywhere is (2, 1) with 4
    assert tuple(refill.cells[refill.refilled][0]) == (2, 1)
    assert refill.shared[refill.refilled][0] == 4


def test_refill_prefers_the_row_or_column_of_the_empty_match():
    counts = np.array([[5, 0, 0], [0, 5, 0], [1, 3, 0]])
    m = match_clusters(sp.csr_matrix(counts))
    plan = plan_cells(sp.csr_matrix(counts), m, "refill")
    assert tuple(plan.cells[plan.refilled][0]) == (2, 1)


def test_cell_means_equal_masked_means():
    counts, m = table()
    plan = plan_cells(counts, m, "refill")
    rng = np.random.default_rng(0)
    n, d = 500, 6
    img, txt = rng.standard_normal((2, n, d)).astype(np.float32)
    li, lt = rng.integers(0, 4, n), rng.integers(0, 4, n)
    acc = CellMeans(plan, 4, d)
    for s in range(0, n, 64):
        acc.add(img[s : s + 64], txt[s : s + 64], li[s : s + 64], lt[s : s + 64], np.ones(64), None)
    im, tm, inorm, _ = acc.means()
    for p, (a, b) in enumerate(plan.cells):
        mask = (li == a) & (lt == b)
        assert acc.count[p] == mask.sum()
        np.testing.assert_allclose(im[p], img[mask].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tm[p], txt[mask].mean(0), rtol=1e-5, atol=1e-6)
        assert inorm[p] == 1.0


def test_cosine():
    a = np.array([[1, 0], [0, 0], [1, 1]], dtype=np.float32)
    b = np.array([[2, 0], [1, 0], [-1, -1]], dtype=np.float32)
    np.testing.assert_allclose(cosine(a, b), [1, 0, -1], atol=1e-6)
