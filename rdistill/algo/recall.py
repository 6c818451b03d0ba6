"""Cross-modal retrieval recall, IR@K and TR@K, with several captions per image (paper section 4.1).

* **TR@K** (image -> text): for each image, the rank of its best-ranked ground-truth caption among all captions;
  a hit when fewer than K captions come before it.
* **IR@K** (text -> image): for each caption, the rank of its image among all images.

Both in percent, as the papers report them, with ``r_mean`` the mean of the six numbers (the authors' ``r_mean``:
the mean of the IR and TR means). This is the logic of the authors' ``itm_eval`` (junhyeok9712/PDS
``src/epoch.py``, from BLIP's ``train_retrieval.py``) without its intermediate top-128 score matrices and Python
loops: ranks are counts of candidates scoring at least as high, computed on blocks of the score matrix so that
memory stays ``block x n`` whatever the split size (COCO: 5k x 25k).

Ties are counted against the query (a candidate that scores exactly as high as the ground truth is ranked before
it), so a collapsed model whose scores are all equal gets no hits instead of all of them. NaN scores count as the
lowest. With distinct scores this equals the authors' ranking exactly (tested on random score matrices).
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
KEYS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")


def _clean(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, dtype=np.float64)
    return np.where(np.isnan(block), -np.inf, block)


def image_to_text_ranks(scores: np.ndarray, txt2img: np.ndarray, block: int = 1024) -> np.ndarray:
    """``scores (n_img, n_txt)``, ``txt2img (n_txt,) int`` -> ``(n_img,) int64``: 0-based rank of each image's best
    ground-truth caption. An image without captions gets rank ``n_txt`` (never a hit)."""
    scores = np.asarray(scores)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    n_img, n_txt = scores.shape
    if txt2img.shape != (n_txt,):
        raise ValueError(f"txt2img has shape {txt2img.shape}, expected ({n_txt},)")
    ranks = np.full(n_img, n_txt, dtype=np.int64)
    cols = np.arange(n_txt)
    for i0 in range(0, n_img, block):
        s = _clean(scores[i0 : i0 + block])
        b = s.shape[0]
        mine = (txt2img >= i0) & (txt2img < i0 + b)
        best = np.full(b, -np.inf)
        np.maximum.at(best, txt2img[mine] - i0, s[txt2img[mine] - i0, cols[mine]])
        has = np.zeros(b, bool)
        has[txt2img[mine] - i0] = True
        r = (s >= best[:, None]).sum(axis=1) - 1
        ranks[i0 : i0 + b] = np.where(has, r, n_txt)
    return ranks


def text_to_image_ranks(scores: np.ndarray, txt2img: np.ndarray, block: int = 4096) -> np.ndarray:
    """``scores (n_img, n_txt)``, ``txt2img (n_txt,) int`` -> ``(n_txt,) int64``: 0-based rank of each caption's
    image among all images."""
    scores = np.asarray(scores)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    n_img, n_txt = scores.shape
    ranks = np.empty(n_txt, dtype=np.int64)
    for j0 in range(0, n_txt, block):
        s = _clean(scores[:, j0 : j0 + block])
        b = s.shape[1]
        pos = s[txt2img[j0 : j0 + b], np.arange(b)]
        ranks[j0 : j0 + b] = (s >= pos[None, :]).sum(axis=0) - 1
    return ranks


def recall_from_ranks(tr_ranks: np.ndarray, ir_ranks: np.ndarray, ks=KS) -> dict[str, float]:
    """Ranks (as from the two functions above) -> ``{"IR@k", "TR@k", "r_mean"}`` in percent."""
    out = {f"IR@{k}": 100.0 * float(np.mean(ir_ranks < k)) for k in ks}
    out.update({f"TR@{k}": 100.0 * float(np.mean(tr_ranks < k)) for k in ks})
    out["r_mean"] = float(np.mean([out[f"IR@{k}"] for k in ks] + [out[f"TR@{k}"] for k in ks]))
    return out


def recall_at_k(scores: np.ndarray, txt2img: np.ndarray, ks=KS) -> dict[str, float]:
    """``scores (n_img, n_txt)`` similarities (any float dtype; higher is closer), ``txt2img (n_txt,) int`` the
    image of each caption -> IR@k, TR@k for ``k`` in ``ks`` and ``r_mean``, in percent."""
    return recall_from_ranks(image_to_text_ranks(scores, txt2img), text_to_image_ranks(scores, txt2img), ks)


def recall_from_features(img_feat, txt_feat, txt2img, ks=KS, block: int = 1024) -> dict[str, float]:
    """``img_feat (n_img, d)``, ``txt_feat (n_txt, d)`` float (numpy or torch; normalised by the caller for
    cosine), ``txt2img (n_txt,) int`` -> the recalls of :func:`recall_at_k`, computing the score matrix in
    ``block``-row slices (memory ``block x max(n_img, n_txt)`` floats, plus one ``n_img x block`` slice)."""
    img = np.asarray(_numpy(img_feat), dtype=np.float32)
    txt = np.asarray(_numpy(txt_feat), dtype=np.float32)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    n_img, n_txt = img.shape[0], txt.shape[0]
    tr = np.empty(n_img, np.int64)
    for i0 in range(0, n_img, block):
        tr_block = image_to_text_ranks(img[i0 : i0 + block] @ txt.T, txt2img - i0, block=block)
        # captions of other images were shifted out of [0, b): they count as candidates, never as ground truth
        tr[i0 : i0 + block] = tr_block
    ir = np.empty(n_txt, np.int64)
    for j0 in range(0, n_txt, block):
        ir[j0 : j0 + block] = text_to_image_ranks(img @ txt[j0 : j0 + block].T, txt2img[j0 : j0 + block])
    return recall_from_ranks(tr, ir, ks)


def _numpy(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x
