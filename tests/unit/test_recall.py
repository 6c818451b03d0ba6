"""Recall@K against a plain loop and against the authors' i2t/t2i logic (junhyeok9712/PDS src/epoch.py)."""

import numpy as np
import pytest

from rdistill.algo.recall import recall_at_k, recall_from_features


def _brute_force(scores, img2txt):
    """For every query, walk the candidates one by one and count those that score at least as high."""
    n_img, n_txt = scores.shape
    txt2img = {t: i for i, ts in enumerate(img2txt) for t in ts}
    tr = []
    for i in range(n_img):
        best = None
        for t in img2txt[i]:
            before = sum(1 for u in range(n_txt) if u != t and scores[i, u] >= scores[i, t])
            best = before if best is None else min(best, before)
        tr.append(best)
    ir = []
    for t in range(n_txt):
        g = txt2img[t]
        ir.append(sum(1 for i in range(n_img) if i != g and scores[i, t] >= scores[g, t]))
    out = {}
    for k in (1, 5, 10):
        out[f"IR@{k}"] = 100.0 * sum(r < k for r in ir) / n_txt
        out[f"TR@{k}"] = 100.0 * sum(r < k for r in tr) / n_img
    out["r_mean"] = sum(out.values()) / 6
    return out


def _reference_itm_eval(sims, txt2img, img2txt, topk=128):
    """The authors' evaluation: top-128 score matrices (-100 elsewhere), then ``itm_eval``'s argsort loops."""
    n_img, n_txt = sims.shape
    i2t = np.full((n_img, n_txt), -100.0)
    for i in range(n_img):
        idx = np.argsort(-sims[i])[:topk]
        i2t[i, idx] = sims[i, idx]
    t2i = np.full((n_txt, n_img), -100.0)
    for t in range(n_txt):
        idx = np.argsort(-sims[:, t])[:topk]
        t2i[t, idx] = sims[idx, t]
    ranks = np.zeros(n_img)
    for index, score in enumerate(i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    ranks = np.zeros(n_txt)
    for index, score in enumerate(t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    r_mean = ((tr1 + tr5 + tr10) / 3 + (ir1 + ir5 + ir10) / 3) / 2
    return {"IR@1": ir1, "IR@5": ir5, "IR@10": ir10, "TR@1": tr1, "TR@5": tr5, "TR@10": tr10, "r_mean": r_mean}


def _layout(n_img, per_image, rng, shuffle=True):
    txt2img = np.repeat(np.arange(n_img), per_image)
    if shuffle:
        txt2img = rng.permutation(txt2img)
    img2txt = [np.flatnonzero(txt2img == i).tolist() for i in range(n_img)]
    return txt2img, img2txt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_brute_force_and_reference(seed):
    rng = np.random.default_rng(seed)
    n_img = 40
    txt2img, img2txt = _layout(n_img, 5, rng)
    # planted signal so recalls are neither 0 nor 100: ground-truth pairs score higher on average
    scores = rng.normal(size=(n_img, 5 * n_img))
    scores[txt2img, np.arange(5 * n_img)] += 1.5
    got = recall_at_k(scores, txt2img)
    want = _brute_force(scores, img2txt)
    ref = _reference_itm_eval(scores, txt2img, img2txt)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    assert 0 < got["IR@1"] < 100 and 0 < got["TR@10"] < 100


def test_recall_large_split_uses_reference_top128():
    """200 images x 1000 captions: beyond the reference's top-128 window, R@10 is still the same."""
    rng = np.random.default_rng(5)
    txt2img, img2txt = _layout(200, 5, rng)
    scores = rng.normal(size=(200, 1000)).astype(np.float32)
    scores[txt2img, np.arange(1000)] += 2.0
    got = recall_at_k(scores, txt2img)
    ref = _reference_itm_eval(scores.astype(np.float64), txt2img, img2txt)
    assert got == pytest.approx(ref, abs=1e-9)


def test_recall_from_features_blocks_match_full_matrix():
    rng = np.random.default_rng(7)
    txt2img, _ = _layout(90, 5, rng)
    img = rng.normal(size=(90, 16)).astype(np.float32)
    txt = img[txt2img] + rng.normal(scale=1.2, size=(450, 16)).astype(np.float32)
    full = recall_at_k(img @ txt.T, txt2img)
    assert recall_from_features(img, txt, txt2img, block=17) == pytest.approx(full, abs=1e-9)


def test_ties_and_nan_count_against_the_query():
    txt2img = np.repeat(np.arange(20), 5)
    zero = recall_at_k(np.zeros((20, 100)), txt2img)
    assert all(v == 0.0 for v in zero.values())
    scores = np.full((20, 100), np.nan)
    assert recall_at_k(scores, txt2img)["TR@10"] == 0.0
    # a perfect model: each image's captions score highest
    perfect = np.where(txt2img[None, :] == np.arange(20)[:, None], 1.0, 0.0) + 1e-3 * np.arange(100)[None, :]
    assert recall_at_k(perfect, txt2img)["TR@1"] == 100.0 and recall_at_k(perfect, txt2img)["IR@1"] == 100.0
