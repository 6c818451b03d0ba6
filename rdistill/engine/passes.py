"""The passes of the PDS prototype engine (paper section 3.2, Algorithm 1 lines 1-6) as functions with explicit
inputs and outputs (:mod:`rdistill.engine.state`). Memory is bounded by the k-means sample, the M x d state and a
few blocks, whatever N is; per-row data goes to :class:`Spill` files:

1. :func:`scan`: L2-normalise, flag invalid rows (NaN/inf/zero), pair cosine per row (spilled, 4 bytes a row),
   and draw the k-means training sample; :func:`prune`: the exact prune cut (:mod:`rdistill.algo.prune`);
2. :func:`cluster`: k-means per modality on the sample; :func:`assign`: nearest image and text centroid of every
   kept pair (labels spilled, 8 bytes a row) and the sparse contingency table; :func:`match`: linear assignment;
3. :func:`prototypes`: means of the shared pairs of each planned cell;
4. :func:`captions`: the nearest real caption to each text prototype.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np

from rdistill.algo.cells import CellMeans, cosine, plan_cells
from rdistill.algo.kmeans import fit_kmeans, nearest_centroid
from rdistill.algo.matching import Contingency, match_clusters
from rdistill.algo.prune import find_prune_cut, pair_similarity
from rdistill.algo.retrieval import NearestRows
from rdistill.config import Config
from rdistill.engine.state import Assigned, Captions, Clusters, Matched, Prototypes, Pruned, Scanned
from rdistill.errors import ConfigError, RunError
from rdistill.io.outputs import atomic_path
from rdistill.io.store import Block, EmbeddingStore, StoreError
from rdistill.metrics import progress

log = logging.getLogger(__name__)


def unit_rows(x: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw row norms of ``x`` (n, d) float32, and ``x`` L2-normalised *in place* when ``enabled`` (the caller owns
    ``x``: a block fresh from the store or a masked copy). NaN/inf/zero rows are left to the caller's mask."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if enabled:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            x /= np.where(norms > 0, norms, 1)[:, None]
    return x, norms


def flat_index(centroids: np.ndarray, gpu: bool) -> faiss.Index:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if gpu:
        if not hasattr(faiss, "StandardGpuResources"):
            raise ConfigError("cluster.gpu is true but this faiss has no GPU support (install faiss-gpu)")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


class Spill:
    """Per-part arrays in the work directory, row-aligned with the store's parts (``{name}_{part}.npy``)."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self._part: int | None = None
        self._chunks: list[np.ndarray] = []
        self._cache: tuple[int, np.ndarray] | None = None

    def path(self, part: int) -> Path:
        return self.root / f"{self.name}_{part}.npy"

    def append(self, part: int, values: np.ndarray) -> None:
        if self._part is not None and part != self._part:
            self.flush()
        self._part = part
        self._chunks.append(values)

    def flush(self) -> None:
        if self._part is None:
            return
        with atomic_path(self.path(self._part)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(self._chunks))
        self._part, self._chunks = None, []

    def read(self, part: int, r0: int, r1: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != part:
            self._cache = (part, np.load(self.path(part), mmap_mode="r"))
        return np.asarray(self._cache[1][r0:r1])


class BlockSource:
    """Prepared blocks of the store for the passes: rows normalised in place (when ``embeddings.normalize``) with
    their raw norms in ``img_norm``/``txt_norm``. When the prepared store fits in ``embeddings.cache_gb`` the
    first pass keeps it and later passes read RAM instead of the store."""

    def __init__(self, store: EmbeddingStore, cfg: Config):
        self.store, self.cfg = store, cfg
        prepared_bytes = store.num_rows * store.dim * 8
        self._cache: list[Block] | None = [] if prepared_bytes <= cfg.embeddings.cache_gb * 2**30 else None
        self._filled = False

    def blocks(self, step: str, *, img: bool = True):
        """Blocks in global row order under a progress bar named after ``step``."""
        normalize = self.cfg.embeddings.normalize
        with progress(self.store.num_rows, step, self.cfg.progress) as bar:
            if self._filled:
                for b in self._cache:
                    yield b
                    bar.update(b.rows.size)
                return
            fill = self._cache is not None and img
            for b in self.store.iter_blocks(self.cfg.embeddings.block_rows, img=img):
                if b.img is not None:
                    b.img, b.img_norm = unit_rows(b.img, normalize)
                b.txt, b.txt_norm = unit_rows(b.txt, normalize)
                if fill:
                    self._cache.append(b)
                yield b
                bar.update(b.rows.size)
            self._filled = fill


def scan(source: BlockSource, cfg: Config, rng: np.random.Generator, sims: Spill) -> Scanned:
    """Pass 1: validity, pair cosine (spilled to ``sims``), and an over-drawn k-means sample (float16 until
    pruned)."""
    store, k = source.store, cfg.cluster.num_pairs
    n = store.num_rows
    sample_target = min(cfg.cluster.max_sample, cfg.cluster.points_per_centroid * k)
    draw = math.ceil(sample_target / max(1.0 - cfg.prune.ratio, 0.01) * 1.1) + k
    positions = np.sort(rng.choice(n, size=min(n, draw), replace=False)).astype(np.int64)
    part_by_index = {p.index: p for p in store.parts}
    invalid_per_part: dict[str, int] = {}
    smp_img, smp_txt, smp_sim = [], [], []
    for b in source.blocks("scan"):
        img, txt = b.img, b.txt
        valid = np.isfinite(b.img_norm) & np.isfinite(b.txt_norm) & (b.img_norm > 0) & (b.txt_norm > 0)
        if not valid.all():
            part = part_by_index[b.part]
            if cfg.embeddings.on_invalid == "error":
                row = int(np.flatnonzero(~valid)[0]) + b.offset
                raise StoreError(
                    f"{part.img.path} / {part.txt.path}: row {row} is NaN, infinite or zero "
                    "(embeddings.on_invalid=error; set it to skip to drop such rows)"
                )
            invalid_per_part[part.img.path] = invalid_per_part.get(part.img.path, 0) + int((~valid).sum())
        s = pair_similarity(img, txt)
        s[~valid] = np.nan
        sims.append(b.part, s)
        lo, hi = np.searchsorted(positions, [b.start, b.start + b.rows.size])
        local = positions[lo:hi] - b.start
        smp_img.append(img[local].astype(np.float16))
        smp_txt.append(txt[local].astype(np.float16))
        smp_sim.append(s[local])
    sims.flush()
    for path, count in invalid_per_part.items():
        log.warning("%s: skipped %d invalid rows (NaN, infinite or zero vectors)", path, count)
    n_invalid = sum(invalid_per_part.values())
    return Scanned(invalid_per_part, n_invalid, n - n_invalid, sample_target, np.concatenate(smp_img),
                   np.concatenate(smp_txt), np.concatenate(smp_sim), positions)  # fmt: skip


def prune(scanned: Scanned, store: EmbeddingStore, cfg: Config, rng: np.random.Generator, sims: Spill) -> Pruned:
    """The exact prune cut over the spilled cosines, then the k-means sample restricted to kept pairs."""

    def sim_blocks():
        for p in store.parts:
            s = np.load(sims.path(p.index))
            ok = ~np.isnan(s)
            yield s[ok], (np.arange(p.rows, dtype=np.int64) + p.start)[ok]

    k = cfg.cluster.num_pairs
    cut = find_prune_cut(sim_blocks, scanned.n_valid, cfg.prune.ratio)
    n_kept = scanned.n_valid - cut.n_drop
    if k > n_kept:
        raise RunError(
            f"cluster.num_pairs={k} is larger than the {n_kept} pairs kept after pruning "
            f"({store.num_rows} rows, {scanned.n_invalid} invalid, {cut.n_drop} pruned at "
            f"prune.ratio={cfg.prune.ratio})"
        )
    rows, s = scanned.sample_rows, scanned.sample_sims
    ok = ~np.isnan(s)
    ok[ok] = cut.keep(s[ok], rows[ok])
    sel = np.flatnonzero(ok)
    if sel.size > scanned.sample_target:
        sel = np.sort(rng.choice(sel, size=scanned.sample_target, replace=False))
    if sel.size < k:
        raise RunError(
            f"the k-means sample holds {sel.size} kept pairs, fewer than cluster.num_pairs={k}; raise "
            "cluster.max_sample or cluster.points_per_centroid"
        )
    log.info("pruned %d of %d valid pairs (cut at cosine %.4f); k-means sample %d", cut.n_drop, scanned.n_valid,
             cut.sim_cut, sel.size)  # fmt: skip
    return Pruned(cut, n_kept, scanned.sample_img[sel], scanned.sample_txt[sel])


def cluster(pruned: Pruned, cfg: Config) -> Clusters:
    """k-means per modality on the kept sample (:func:`rdistill.algo.kmeans.fit_kmeans`)."""
    cc, k = cfg.cluster, cfg.cluster.num_pairs
    args = dict(
        niter=cc.niter,
        init=cc.init,
        seed_points_per_centroid=cc.seed_points_per_centroid,
        refine_rounds=cc.refine_rounds,
        refine_niter=cc.refine_niter,
        final_niter=cc.final_niter,
        gpu=cc.gpu,
    )
    img, txt = pruned.sample_img, pruned.sample_txt
    img_centroids, img_stats = fit_kmeans(img.astype(np.float32), k, seed=cfg.seed, **args)
    txt_centroids, txt_stats = fit_kmeans(txt.astype(np.float32), k, seed=cfg.seed + 1, **args)
    return Clusters(img_centroids, txt_centroids, img_stats, txt_stats, img.shape[0])


def assign(source: BlockSource, clusters: Clusters, pruned: Pruned, cfg: Config, sims: Spill,
           labels: Spill) -> Assigned:  # fmt: skip
    """Pass 2: nearest centroids of every kept pair (spilled to ``labels``, -1 when not kept) and the
    contingency table."""
    k = cfg.cluster.num_pairs
    img_index = flat_index(clusters.img_centroids, cfg.cluster.gpu)
    txt_index = flat_index(clusters.txt_centroids, cfg.cluster.gpu)
    contingency = Contingency(k)
    img_sizes, txt_sizes = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    for b in source.blocks("assign"):
        s = sims.read(b.part, b.offset, b.offset + b.rows.size)
        keep = ~np.isnan(s)
        keep[keep] = pruned.cut.keep(s[keep], b.rows[keep])
        lab = np.full((b.rows.size, 2), -1, dtype=np.int32)
        if keep.any():
            li, _ = nearest_centroid(b.img[keep], clusters.img_centroids, img_index)
            lt, _ = nearest_centroid(b.txt[keep], clusters.txt_centroids, txt_index)
            lab[keep, 0], lab[keep, 1] = li, lt
            contingency.add(li, lt)
            img_sizes += np.bincount(li, minlength=k)
            txt_sizes += np.bincount(lt, minlength=k)
        labels.append(b.part, lab)
    labels.flush()
    return Assigned(contingency, img_sizes, txt_sizes)


def match(assigned: Assigned, clusters: Clusters, cfg: Config) -> Matched:
    """Linear assignment on the contingency table, then the cells to make prototypes of (pairless policy)."""
    counts = assigned.contingency.to_sparse()
    matching = match_clusters(counts, clusters.img_centroids, clusters.txt_centroids, dense_max=cfg.match.dense_max)
    plan = plan_cells(counts, matching, cfg.prototypes.pairless)
    log.info("matching (%s): %d shared pairs on the diagonal, %d pairless matches", matching.solver,
             matching.objective, int((matching.shared == 0).sum()))  # fmt: skip
    return Matched(matching, plan)


def prototypes(source: BlockSource, matched: Matched, clusters: Clusters, cfg: Config, labels: Spill) -> Prototypes:
    """Pass 3: means of the shared pairs of each planned cell; pairless cells (policy keep) take the centres."""
    plan = matched.plan
    means = CellMeans(plan, cfg.cluster.num_pairs, source.store.dim)
    for b in source.blocks("prototypes"):
        lab = labels.read(b.part, b.offset, b.offset + b.rows.size)
        m = lab[:, 0] >= 0
        if m.any():
            means.add(b.img[m], b.txt[m], lab[m, 0], lab[m, 1], b.img_norm[m], b.txt_norm[m])
    img, txt, img_norms, txt_norms = means.means()
    shared = means.count
    empty = shared == 0
    if (empty & ~plan.pairless).any():
        raise RuntimeError("a planned cell with shared pairs received none in the prototype pass")
    img[empty] = clusters.img_centroids[plan.cells[empty, 0]]
    txt[empty] = clusters.txt_centroids[plan.cells[empty, 1]]
    return Prototypes(img, txt, img_norms, txt_norms, shared, cosine(img, txt))


def captions(source: BlockSource, protos: Prototypes, cfg: Config, sims: Spill) -> Captions:
    """Pass 4: the nearest valid caption (cosine) of each text prototype, then its key and text."""
    p = protos.txt.shape[0]
    if not cfg.captions.retrieve:
        return Captions(np.full(p, -1, dtype=np.int64), np.full(p, np.nan, dtype=np.float32), [""] * p, [""] * p)
    nearest = NearestRows(unit_rows(protos.txt.copy())[0])
    for b in source.blocks("captions", img=False):
        ok = ~np.isnan(sims.read(b.part, b.offset, b.offset + b.rows.size))
        txt = b.txt[ok] if cfg.embeddings.normalize else b.txt[ok] / b.txt_norm[ok, None]
        nearest.add(txt, b.rows[ok])
    keys, texts = source.store.lookup(nearest.best_row)
    return Captions(nearest.best_row, nearest.best_score, keys, texts)
