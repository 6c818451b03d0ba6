"""The passes of the PDS prototype engine (paper section 3.2, Algorithm 1 lines 1-6), each a map over the store's
parts (:mod:`rdistill.engine.tasks`, run by an executor: this process or Ray tasks on the cluster's workers) and a
reduction of their small partials in part order, with explicit inputs and outputs (:mod:`rdistill.engine.state`).
The driver holds the k-means sample, the M x d state and a few partials, whatever N is; per-row data is spilled by
the tasks into the work directory:

1. :func:`scan`: L2-normalise, flag invalid rows (NaN/inf/zero), pair cosine per row (spilled, 4 bytes a row),
   and draw the k-means training sample; :func:`prune`: the exact prune cut (a histogram pass and one bin);
2. :func:`cluster`: k-means per modality on the sample; :func:`assign`: nearest image and text centroid of every
   kept pair (labels spilled, 8 bytes a row) and the sparse contingency table; :func:`match`: linear assignment;
3. :func:`prototypes`: means of the shared pairs of each planned cell;
4. :func:`captions`: the nearest real caption to each text prototype.

Each pass also counts the bytes its tasks read from the store (``PassLog``).
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from pathlib import Path

import numpy as np

from rdistill.algo.cells import CellMeans, cosine, plan_cells
from rdistill.algo.kmeans import fit_sharded
from rdistill.algo.matching import Contingency, match_clusters
from rdistill.algo.prune import PruneCut, cut_bin, cut_in_bin, drop_count
from rdistill.algo.sample import bernoulli_rows
from rdistill.config import Config
from rdistill.engine import tasks
from rdistill.engine.state import Assigned, Captions, Clusters, Matched, Prototypes, Pruned, Scanned
from rdistill.errors import RunError
from rdistill.io.outputs import atomic_write_bytes, fault_point
from rdistill.io.store import EmbeddingStore
from rdistill.metrics import phase_mark, progress

log = logging.getLogger(__name__)

NUM_BINS = 1 << 20
LOW_BITS = 10  # the prune histogram's levels: 1024 coarse bins of 1024 fine ones


class Context:
    """What every pass needs: the store, the config, the executor, the work directory, the local part cache,
    and the bytes each pass read."""

    def __init__(self, store: EmbeddingStore, cfg: Config, executor, work: str):
        self.store, self.cfg, self.ex, self.work = store, cfg, executor, work
        local = executor.name == "local"
        self.cache = tasks.PartCache(cfg.embeddings.cache_gb * 2**30) if local else None
        self.bytes_read: dict[str, int] = {}
        self.resumed_parts: dict[str, int] = {}

    def run(self, step: str, fn, items, *, rows: bool = True, search: bool = False, **shared):
        """``fn`` over ``items`` (tuples starting with a part) on the executor, results in part order, under a
        progress bar of rows (or of parts); ``search``: the tasks search (on a GPU each with ``cluster.gpu``)."""
        items = list(items)
        total = self.store.num_rows if rows else len(items)
        with progress(total, step, self.cfg.progress, unit="rows" if rows else "parts") as bar:
            for item, result in zip(items, self.ex.map(step, fn, items, search=search, **shared)):
                bar.update(item[0].rows if rows else 1)
                yield result

    def read(self, step: str, n: int) -> None:
        self.bytes_read[step] = self.bytes_read.get(step, 0) + int(n)

    def reduce(self, step: str, fn, items, acc, add, **kwargs):
        """``fn`` over ``items`` as :meth:`run`, each result folded into ``acc`` in part order by
        ``add(acc, item, result)``; returns ``acc``. Every ``checkpoint_seconds`` the fold so far (how many items,
        and ``acc``) goes to ``_work/{step}.partial.pkl``, so a killed driver resumes the pass after the parts it had
        reduced (``resumed_parts``) instead of from its start."""
        items = list(items)
        path = Path(self.work) / f"{step.replace(' ', '_')}.partial.pkl"
        done = 0
        if path.exists():
            with open(path, "rb") as f:
                done, acc = pickle.load(f)
            log.info("%s: resuming after %d of %d parts reduced by an earlier run", step, done, len(items))
            self.resumed_parts[step] = done
        last = time.monotonic()
        for i, result in enumerate(self.run(step, fn, items[done:], **kwargs), start=done + 1):
            acc = add(acc, items[i - 1], result)
            if time.monotonic() - last >= self.cfg.checkpoint_seconds and i < len(items):
                atomic_write_bytes(path, pickle.dumps((i, acc), protocol=pickle.HIGHEST_PROTOCOL))
                last = time.monotonic()
                fault_point(f"prototypes.{step}.part", i)
        path.unlink(missing_ok=True)  # the pass's own checkpoint, written next, supersedes it
        return acc


def scan(ctx: Context, rng: np.random.Generator) -> Scanned:
    """Pass 1: validity, pair cosine (spilled), and an over-drawn k-means sample (float16 until pruned)."""
    store, cfg, k = ctx.store, ctx.cfg, ctx.cfg.cluster.num_pairs
    n = store.num_rows
    sample_target = min(cfg.cluster.max_sample, cfg.cluster.points_per_centroid * k)
    draw = math.ceil(sample_target / max(1.0 - cfg.prune.ratio, 0.01) * 1.1) + k
    # Each row is drawn with probability draw / n by a hash of its global row id: the same rows whatever the parts
    # (a store re-partitioned gives the same sample), and the driver's memory follows the part size, not N (one
    # draw over all N rows would hold an arange(N)); the count is binomial, within a few sqrt(draw) of draw.
    share, key = min(1.0, draw / max(n, 1)), int(rng.integers(2**63))
    items = [(p, bernoulli_rows(p.start, p.rows, share, key)) for p in store.parts]

    def add(acc, item, r):
        invalid_per_part, sims, rows, owner = acc
        p = item[0]
        ctx.read("scan", r.bytes_read)
        if r.invalid:
            invalid_per_part[p.img.path] = r.invalid
            log.warning("%s: skipped %d invalid rows (NaN, infinite or zero vectors)", p.img.path, r.invalid)
        sims.append(r.sample_sims)
        rows.append(r.sample_rows)
        owner.append(np.full(r.sample_rows.size, p.index, dtype=np.int32))
        return acc

    invalid_per_part, sims, rows, owner = ctx.reduce("scan", tasks.scan_part, items, ({}, [], [], []), add,
                                                     store=store, cfg=cfg, work=ctx.work, cache=ctx.cache)  # fmt: skip
    n_invalid = sum(invalid_per_part.values())
    return Scanned(invalid_per_part, n_invalid, n - n_invalid, sample_target, np.concatenate(sims),
                   np.concatenate(rows), np.concatenate(owner))  # fmt: skip


def prune_cut(ctx: Context, n_valid: int) -> PruneCut:
    """The exact prune cut: a histogram pass over the spilled cosines, then the rows of the one bin that holds
    the cut (:mod:`rdistill.algo.prune`)."""
    n_drop = drop_count(n_valid, ctx.cfg.prune.ratio)
    if n_drop == 0:
        return PruneCut(n_valid, 0, float("-inf"), -1)
    # Two levels of the 2**20-bin histogram, each part's partial a few KB (Ray returns those inline: a partial of
    # 2**20 counts, 8 MB, went through the object store, and the driver's resident memory grew with the parts it
    # mapped, 0.7 GB at 100 parts): the coarse bin of the cut, then the fine bin inside it.
    kw = dict(rows=False, work=ctx.work, num_bins=NUM_BINS, low_bits=LOW_BITS)
    coarse = np.zeros(NUM_BINS >> LOW_BITS, dtype=np.int64)
    for h in ctx.run("prune histogram", tasks.histogram_part, [(p,) for p in ctx.store.parts], **kw):
        coarse += h
    cb, below = cut_bin(coarse, n_valid, n_drop)
    fine = np.zeros(1 << LOW_BITS, dtype=np.int64)
    for h in ctx.run("prune histogram", tasks.histogram_part, [(p, cb) for p in ctx.store.parts], **kw):
        fine += h
    sub, below_in = cut_bin(fine, int(fine.sum()), n_drop - below)
    b, below = (cb << LOW_BITS) + sub, below + below_in
    items = [(p, b) for p in ctx.store.parts]
    picked = list(ctx.run("prune cut", tasks.cut_bin_part, items, rows=False, work=ctx.work, num_bins=NUM_BINS))
    s, r = np.concatenate([x[0] for x in picked]), np.concatenate([x[1] for x in picked])
    return cut_in_bin(s, r, n_valid, n_drop, below)


def prune(ctx: Context, scanned: Scanned, rng: np.random.Generator) -> Pruned:
    """The exact prune cut, then the k-means sample restricted to kept pairs."""
    cfg, store, k = ctx.cfg, ctx.store, ctx.cfg.cluster.num_pairs
    cut = prune_cut(ctx, scanned.n_valid)
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
    return Pruned(cut, n_kept, sel.astype(np.int64))


def shard_specs(scanned: Scanned, pruned: Pruned, work: str, shard_rows: int, modality: str) -> list[dict]:
    """The k-means sample cut into shards of ``shard_rows`` consecutive rows (the last one shorter), each a spec
    for :func:`rdistill.engine.tasks.sample_shard`: which rows of which part's spill it takes."""
    parts, first = np.unique(scanned.sample_parts, return_index=True)
    specs = []
    for s0 in range(0, pruned.sample.size, shard_rows):
        sel = pruned.sample[s0 : s0 + shard_rows]
        owner = scanned.sample_parts[sel]
        pieces = []
        for part in np.unique(owner):
            start = first[np.searchsorted(parts, part)]
            pieces.append((int(part), sel[owner == part] - start))
        specs.append({"work": work, "modality": modality, "pieces": pieces, "offset": s0})
    return specs


def cluster(ctx: Context, scanned: Scanned, pruned: Pruned) -> Clusters:
    """k-means per modality on the kept sample (:func:`rdistill.algo.kmeans.fit_sharded`), its shards held by the
    executor's shard set: this process, or Ray actors on every worker node (one per GPU with ``cluster.gpu``)."""
    cfg = ctx.cfg
    cc, k = cfg.cluster, cfg.cluster.num_pairs
    args = dict(
        niter=cc.niter,
        init=cc.init,
        seed_points_per_centroid=cc.seed_points_per_centroid,
        refine_rounds=cc.refine_rounds,
        refine_niter=cc.refine_niter,
        final_niter=cc.final_niter,
        min_gain_ratio=cc.min_gain_ratio,
    )
    out = {}
    for modality, seed in (("img", cfg.seed), ("txt", cfg.seed + 1)):
        specs = shard_specs(scanned, pruned, ctx.work, cc.shard_rows, modality)
        phases = cc.niter + (cc.final_niter + 3 if cc.refine_rounds else 2)
        with progress(phases, f"k-means {modality}", cfg.progress, unit="phases") as bar:
            shards = ctx.ex.shard_set("cluster", specs, tasks.sample_shard, gpu=cc.gpu)
            try:

                def on_phase(name: str, modality: str = modality) -> None:
                    bar.update(1)
                    phase_mark(f"kmeans.{modality}.{name}")

                out[modality] = fit_sharded(shards, k, seed=seed, on_phase=on_phase, **args)
            finally:
                shards.close()
        stats = out[modality][1]
        log.info("k-means %s: %d rows in %d shards, SSE %.4g -> %.4g, %d refinement moves, %d restarts", modality,
                 stats.sample_size, stats.shards, stats.sse_lloyd, stats.sse_final, stats.refine_moves,
                 stats.restarts)  # fmt: skip
    (img_centroids, img_stats), (txt_centroids, txt_stats) = out["img"], out["txt"]
    return Clusters(img_centroids, txt_centroids, img_stats, txt_stats, int(pruned.sample.size))


def assign(ctx: Context, clusters: Clusters, pruned: Pruned) -> Assigned:
    """Pass 2: nearest centroids of every kept pair (spilled as labels, -1 when not kept) and the contingency
    table, reduced from the parts' cell counts."""
    k = ctx.cfg.cluster.num_pairs

    def add(acc, item, r):
        ctx.read("assign", r.bytes_read)
        acc.contingency.add_counts(r.codes, r.counts)
        acc.img_sizes += r.img_sizes
        acc.txt_sizes += r.txt_sizes
        return acc

    parts = [(p,) for p in ctx.store.parts]
    start = Assigned(Contingency(k), np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64))
    return ctx.reduce("assign", tasks.assign_part, parts, start, add, search=True, store=ctx.store, cfg=ctx.cfg,
                      work=ctx.work, cut=pruned.cut, img_centroids=clusters.img_centroids,
                      txt_centroids=clusters.txt_centroids, cache=ctx.cache)  # fmt: skip


def match(assigned: Assigned, clusters: Clusters, cfg: Config) -> Matched:
    """Linear assignment on the contingency table, then the cells to make prototypes of (pairless policy)."""
    table_bytes = assigned.contingency.nbytes()
    counts = assigned.contingency.to_sparse()
    matching = match_clusters(counts, clusters.img_centroids, clusters.txt_centroids, dense_max=cfg.match.dense_max)
    plan = plan_cells(counts, matching, cfg.prototypes.pairless)
    log.info("matching (%s): %d shared pairs on the diagonal, %d pairless matches (contingency: %d non-zero cells)",
             matching.solver, matching.objective, int((matching.shared == 0).sum()), counts.nnz)  # fmt: skip
    return Matched(matching, plan, int(counts.nnz), table_bytes)


def prototypes(ctx: Context, matched: Matched, clusters: Clusters) -> Prototypes:
    """Pass 3: means of the shared pairs of each planned cell; pairless cells (policy keep) take the centres."""
    plan = matched.plan

    def add(means, item, r):
        sums, n = r
        ctx.read("prototypes", n)
        means.add_sums(sums)
        return means

    parts = [(p,) for p in ctx.store.parts]
    means = ctx.reduce("prototypes", tasks.prototypes_part, parts, CellMeans(plan, ctx.cfg.cluster.num_pairs,
                       ctx.store.dim), add, store=ctx.store, cfg=ctx.cfg, work=ctx.work, plan=plan,
                       cache=ctx.cache)  # fmt: skip
    img, txt, img_norms, txt_norms = means.means()
    shared = means.count
    empty = shared == 0
    if (empty & ~plan.pairless).any():
        raise RuntimeError("a planned cell with shared pairs received none in the prototype pass")
    img[empty] = clusters.img_centroids[plan.cells[empty, 0]]
    txt[empty] = clusters.txt_centroids[plan.cells[empty, 1]]
    return Prototypes(img, txt, img_norms, txt_norms, shared, cosine(img, txt))


def captions(ctx: Context, protos: Prototypes) -> Captions:
    """Pass 4: the nearest valid caption (cosine) of each text prototype, then its key and text."""
    p = protos.txt.shape[0]
    if not ctx.cfg.captions.retrieve:
        return Captions(np.full(p, -1, dtype=np.int64), np.full(p, np.nan, dtype=np.float32), [""] * p, [""] * p)
    queries = tasks.unit_rows(protos.txt.copy())[0]

    def add(acc, item, r):
        best_row, best_score = acc
        row, score, n = r
        ctx.read("captions", n)
        better = score > best_score  # parts in order: ties keep the earliest row
        best_row[better], best_score[better] = row[better], score[better]
        return acc

    parts = [(part,) for part in ctx.store.parts]
    start = (np.full(p, -1, dtype=np.int64), np.full(p, -np.inf, dtype=np.float32))
    best_row, best_score = ctx.reduce("captions", tasks.captions_part, parts, start, add, search=True,
                                      store=ctx.store, cfg=ctx.cfg, work=ctx.work, queries=queries,
                                      cache=ctx.cache)  # fmt: skip
    keys, texts = ctx.store.lookup(best_row)
    return Captions(best_row, best_score, keys, texts)
