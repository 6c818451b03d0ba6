"""The PDS prototype engine over an embedding store, and its command line.

    python -m rdistill.prototypes --embeddings DIR --output DIR --num-pairs M [--config FILE] [--set key=value ...]

Four streaming passes over the store (paper section 3.2, Algorithm 1 lines 1-6), memory bounded by the k-means
sample, the M x d state and a few blocks, whatever N is:

1. scan: L2-normalise, flag invalid rows (NaN/inf/zero), pair cosine per row (spilled to disk, 4 bytes a row), and
   gather the k-means training sample; then the exact prune cut (:mod:`rdistill.core.prune`);
2. assign: nearest image and text centroid of every kept pair (labels spilled, 8 bytes a row) and the sparse
   contingency table; then the linear assignment;
3. prototypes: means of the shared pairs of each planned cell;
4. captions: the nearest real caption to each text prototype.

Outputs in the output directory: ``prototypes.parquet``, ``summary.json``, ``config.yaml`` and the ``_SUCCESS``
marker, each written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rdistill.algo.cells import CellMeans, cosine, plan_cells
from rdistill.algo.kmeans import fit_kmeans, nearest_centroid
from rdistill.algo.matching import Contingency, match_clusters
from rdistill.algo.prune import find_prune_cut, pair_similarity
from rdistill.algo.retrieval import NearestRows
from rdistill.config import Config, ConfigError, config_to_dict, dump_config, load_config
from rdistill.io.outputs import RunError, StepRecorder, atomic_path, atomic_write_json, atomic_write_text, progress
from rdistill.io.store import Block, EmbeddingStore, StoreError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"


def _unit_rows(x: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw row norms of ``x`` (n, d) float32, and ``x`` L2-normalised *in place* when ``enabled`` (the caller owns
    ``x``: a block fresh from the store or a masked copy). NaN/inf/zero rows are left to the caller's mask."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if enabled:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            x /= np.where(norms > 0, norms, 1)[:, None]
    return x, norms


def _flat_index(centroids: np.ndarray, gpu: bool) -> faiss.Index:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if gpu:
        if not hasattr(faiss, "StandardGpuResources"):
            raise ConfigError("cluster.gpu is true but this faiss has no GPU support (install faiss-gpu)")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


class _Spill:
    """Per-part arrays written to the work directory (row-aligned with the store's parts)."""

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


class _Run:
    """One run of the engine: each method is one step, results kept as attributes for the next."""

    def __init__(self, embeddings: str, out: Path, cfg: Config):
        self.embeddings, self.out, self.cfg = str(embeddings), out, cfg
        self.store = EmbeddingStore(embeddings, cfg.embeddings.key_column, cfg.embeddings.caption_column)
        self.work = out / "_work"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.rec = StepRecorder()
        self.rng = np.random.default_rng(cfg.seed)
        self.k = cfg.cluster.num_pairs
        self.sims = _Spill(self.work, "sims")
        self.labels = _Spill(self.work, "labels")
        self.part_by_index = {p.index: p for p in self.store.parts}
        prepared_bytes = self.store.num_rows * self.store.dim * 8
        self._cache: list[Block] | None = [] if prepared_bytes <= cfg.embeddings.cache_gb * 2**30 else None

    def blocks(self, step: str, *, img: bool = True):
        """Prepared blocks under a progress bar named after the step: rows normalised in place (when
        ``embeddings.normalize``) with their raw norms in ``img_norm``/``txt_norm``. When the prepared store fits in
        ``embeddings.cache_gb`` the first pass keeps it and later passes read RAM instead of the store."""
        normalize = self.cfg.embeddings.normalize
        with progress(self.store.num_rows, step, self.cfg.progress) as bar:
            if self._cache and step != "scan":
                for b in self._cache:
                    yield b
                    bar.update(b.rows.size)
                return
            for b in self.store.iter_blocks(self.cfg.embeddings.block_rows, img=img):
                if b.img is not None:
                    b.img, b.img_norm = _unit_rows(b.img, normalize)
                b.txt, b.txt_norm = _unit_rows(b.txt, normalize)
                if step == "scan" and self._cache is not None:
                    self._cache.append(b)
                yield b
                bar.update(b.rows.size)

    def scan(self) -> None:
        """Pass 1: validity, pair cosine (spilled), and an over-drawn k-means sample (float16 until pruned)."""
        cfg, n = self.cfg, self.store.num_rows
        self.sample_target = min(cfg.cluster.max_sample, cfg.cluster.points_per_centroid * self.k)
        draw = math.ceil(self.sample_target / max(1.0 - cfg.prune.ratio, 0.01) * 1.1) + self.k
        positions = np.sort(self.rng.choice(n, size=min(n, draw), replace=False)).astype(np.int64)
        self.invalid_per_part: dict[str, int] = {}
        smp_img, smp_txt, smp_sim = [], [], []
        for b in self.blocks("scan"):
            img, txt = b.img, b.txt
            valid = np.isfinite(b.img_norm) & np.isfinite(b.txt_norm) & (b.img_norm > 0) & (b.txt_norm > 0)
            if not valid.all():
                self._count_invalid(b, valid)
            sims = pair_similarity(img, txt)
            sims[~valid] = np.nan
            self.sims.append(b.part, sims)
            lo, hi = np.searchsorted(positions, [b.start, b.start + b.rows.size])
            local = positions[lo:hi] - b.start
            smp_img.append(img[local].astype(np.float16))
            smp_txt.append(txt[local].astype(np.float16))
            smp_sim.append(sims[local])
        self.sims.flush()
        for path, count in self.invalid_per_part.items():
            log.warning("%s: skipped %d invalid rows (NaN, infinite or zero vectors)", path, count)
        self.n_invalid = sum(self.invalid_per_part.values())
        self.n_valid = n - self.n_invalid
        self._sample = (np.concatenate(smp_img), np.concatenate(smp_txt), np.concatenate(smp_sim), positions)

    def _count_invalid(self, b, valid: np.ndarray) -> None:
        part = self.part_by_index[b.part]
        if self.cfg.embeddings.on_invalid == "error":
            row = int(np.flatnonzero(~valid)[0]) + b.offset
            raise StoreError(
                f"{part.img.path} / {part.txt.path}: row {row} is NaN, infinite or zero "
                "(embeddings.on_invalid=error; set it to skip to drop such rows)"
            )
        self.invalid_per_part[part.img.path] = self.invalid_per_part.get(part.img.path, 0) + int((~valid).sum())

    def prune(self) -> None:
        """The exact prune cut, then the k-means sample restricted to kept pairs."""

        def sim_blocks():
            for p in self.store.parts:
                s = np.load(self.sims.path(p.index))
                ok = ~np.isnan(s)
                yield s[ok], (np.arange(p.rows, dtype=np.int64) + p.start)[ok]

        cfg, k = self.cfg, self.k
        self.cut = find_prune_cut(sim_blocks, self.n_valid, cfg.prune.ratio)
        self.n_kept = self.n_valid - self.cut.n_drop
        if k > self.n_kept:
            raise RunError(
                f"cluster.num_pairs={k} is larger than the {self.n_kept} pairs kept after pruning "
                f"({self.store.num_rows} rows, {self.n_invalid} invalid, {self.cut.n_drop} pruned at "
                f"prune.ratio={cfg.prune.ratio})"
            )
        img, txt, sims, rows = self._sample
        ok = ~np.isnan(sims)
        ok[ok] = self.cut.keep(sims[ok], rows[ok])
        sel = np.flatnonzero(ok)
        if sel.size > self.sample_target:
            sel = np.sort(self.rng.choice(sel, size=self.sample_target, replace=False))
        if sel.size < k:
            raise RunError(
                f"the k-means sample holds {sel.size} kept pairs, fewer than cluster.num_pairs={k}; raise "
                "cluster.max_sample or cluster.points_per_centroid"
            )
        self._sample = (img[sel], txt[sel])
        log.info(
            "pruned %d of %d valid pairs (cut at cosine %.4f); k-means sample %d",
            self.cut.n_drop,
            self.n_valid,
            self.cut.sim_cut,
            sel.size,
        )

    def cluster(self) -> None:
        cc = self.cfg.cluster
        args = dict(
            niter=cc.niter,
            init=cc.init,
            seed_points_per_centroid=cc.seed_points_per_centroid,
            refine_rounds=cc.refine_rounds,
            refine_niter=cc.refine_niter,
            final_niter=cc.final_niter,
            gpu=cc.gpu,
        )
        img, txt = self._sample
        self.sample_size = img.shape[0]
        self.img_centroids, self.img_km = fit_kmeans(img.astype(np.float32), self.k, seed=self.cfg.seed, **args)
        self.txt_centroids, self.txt_km = fit_kmeans(txt.astype(np.float32), self.k, seed=self.cfg.seed + 1, **args)
        del self._sample

    def assign(self) -> None:
        """Pass 2: nearest centroids of every kept pair (labels spilled, -1 when not kept), contingency table."""
        k = self.k
        img_index = _flat_index(self.img_centroids, self.cfg.cluster.gpu)
        txt_index = _flat_index(self.txt_centroids, self.cfg.cluster.gpu)
        self.contingency = Contingency(k)
        self.img_sizes, self.txt_sizes = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
        for b in self.blocks("assign"):
            sims = self.sims.read(b.part, b.offset, b.offset + b.rows.size)
            keep = ~np.isnan(sims)
            keep[keep] = self.cut.keep(sims[keep], b.rows[keep])
            labels = np.full((b.rows.size, 2), -1, dtype=np.int32)
            if keep.any():
                li, _ = nearest_centroid(b.img[keep], self.img_centroids, img_index)
                lt, _ = nearest_centroid(b.txt[keep], self.txt_centroids, txt_index)
                labels[keep, 0], labels[keep, 1] = li, lt
                self.contingency.add(li, lt)
                self.img_sizes += np.bincount(li, minlength=k)
                self.txt_sizes += np.bincount(lt, minlength=k)
            self.labels.append(b.part, labels)
        self.labels.flush()

    def match(self) -> None:
        counts = self.contingency.to_sparse()
        self.matching = match_clusters(
            counts, self.img_centroids, self.txt_centroids, dense_max=self.cfg.match.dense_max
        )
        self.plan = plan_cells(counts, self.matching, self.cfg.prototypes.pairless)
        log.info(
            "matching (%s): %d shared pairs on the diagonal, %d pairless matches",
            self.matching.solver,
            self.matching.objective,
            int((self.matching.shared == 0).sum()),
        )

    def prototypes(self) -> None:
        """Pass 3: means of the shared pairs of each planned cell; pairless cells (policy keep) take the centres."""
        plan = self.plan
        means = CellMeans(plan, self.k, self.store.dim)
        for b in self.blocks("prototypes"):
            labels = self.labels.read(b.part, b.offset, b.offset + b.rows.size)
            m = labels[:, 0] >= 0
            if m.any():
                means.add(b.img[m], b.txt[m], labels[m, 0], labels[m, 1], b.img_norm[m], b.txt_norm[m])
        self.img_protos, self.txt_protos, self.img_norms, self.txt_norms = means.means()
        self.shared = means.count
        empty = self.shared == 0
        if (empty & ~plan.pairless).any():
            raise RunError("internal error: a planned cell with shared pairs received none in the prototype pass")
        self.img_protos[empty] = self.img_centroids[plan.cells[empty, 0]]
        self.txt_protos[empty] = self.txt_centroids[plan.cells[empty, 1]]
        self.alignment = cosine(self.img_protos, self.txt_protos)

    def captions(self) -> None:
        """Pass 4: the nearest valid caption (cosine) of each text prototype, then its key and text."""
        p = self.txt_protos.shape[0]
        self.caption_rows = np.full(p, -1, dtype=np.int64)
        self.caption_sim = np.full(p, np.nan, dtype=np.float32)
        self.keys, self.caption_texts = [""] * p, [""] * p
        if not self.cfg.captions.retrieve:
            return
        nearest = NearestRows(_unit_rows(self.txt_protos.copy())[0])
        for b in self.blocks("captions", img=False):
            ok = ~np.isnan(self.sims.read(b.part, b.offset, b.offset + b.rows.size))
            txt = b.txt[ok] if self.cfg.embeddings.normalize else b.txt[ok] / b.txt_norm[ok, None]
            nearest.add(txt, b.rows[ok])
        self.caption_rows, self.caption_sim = nearest.best_row, nearest.best_score
        self.keys, self.caption_texts = self.store.lookup(self.caption_rows)

    def write(self) -> None:
        """prototypes.parquet, sorted by alignment (best first); ids follow that order."""
        order = np.argsort(-self.alignment, kind="stable")
        cells = self.plan.cells[order]
        table = pa.table(
            {
                "id": np.arange(order.size, dtype=np.int64),
                "image_embedding": _vectors(self.img_protos[order]),
                "text_embedding": _vectors(self.txt_protos[order]),
                "caption": [self.caption_texts[i] for i in order],
                "caption_key": [self.keys[i] for i in order],
                "caption_row": self.caption_rows[order],
                "caption_similarity": self.caption_sim[order],
                "image_cluster": cells[:, 0],
                "text_cluster": cells[:, 1],
                "image_cluster_size": self.img_sizes[cells[:, 0]],
                "text_cluster_size": self.txt_sizes[cells[:, 1]],
                "shared_pairs": self.shared[order],
                "alignment": self.alignment[order],
                "pairless": self.plan.pairless[order],
                "refilled": self.plan.refilled[order],
                "image_norm": self.img_norms[order].astype(np.float32),
                "text_norm": self.txt_norms[order].astype(np.float32),
            }
        )
        with atomic_path(self.out / "prototypes.parquet") as tmp:
            pq.write_table(table, tmp)

    def summary(self, seconds: float) -> dict:
        store, matching, plan = self.store, self.matching, self.plan
        return {
            "stage": "prototypes",
            "input": {
                "url": self.embeddings,
                "parts": len(store.parts),
                "rows": store.num_rows,
                "dim": store.dim,
                "dtype": store.dtype,
            },
            "counts": {
                "rows": store.num_rows,
                "invalid": self.n_invalid,
                "invalid_per_part": self.invalid_per_part,
                "valid": self.n_valid,
                "pruned": self.cut.n_drop,
                "kept": self.n_kept,
                "kmeans_sample": self.sample_size,
            },
            "prune": {"ratio": self.cfg.prune.ratio, "cosine_cut": self.cut.sim_cut},
            "kmeans": {"image": asdict(self.img_km), "text": asdict(self.txt_km)},
            "clusters": {
                "empty_image_clusters": int((self.img_sizes == 0).sum()),
                "empty_text_clusters": int((self.txt_sizes == 0).sum()),
            },
            "match": {
                "solver": matching.solver,
                "lap_objective": matching.objective,
                "shared_pair_share": matching.objective / max(self.n_kept, 1),
                "pairless_matches": int((matching.shared == 0).sum()),
            },
            "prototypes": {
                "count": int(plan.cells.shape[0]),
                "pairless_policy": self.cfg.prototypes.pairless,
                "pairless_kept": int(plan.pairless.sum()),
                "refilled": int(plan.refilled.sum()),
                "mean_alignment": float(self.alignment.mean()),
            },
            "steps": self.rec.steps,
            "seconds": round(seconds, 3),
        }


STEPS = ("scan", "prune", "cluster", "assign", "match", "prototypes", "captions", "write")


def run_prototypes(embeddings: str, output: str | Path, cfg: Config, *, overwrite: bool = False) -> dict:
    """Run the engine from the store at ``embeddings`` into ``output``; returns the summary dict.

    A finished run (``_SUCCESS``) with the same resolved config and input is not redone; one with another config
    is refused unless ``overwrite``.
    """
    out = Path(output)
    resolved = dump_config(cfg, "prototypes")
    if (out / SUCCESS).exists() and not overwrite:
        previous = (out / "config.yaml").read_text() if (out / "config.yaml").exists() else None
        summary = json.loads((out / "summary.json").read_text())
        if previous == resolved and summary.get("input", {}).get("url") == str(embeddings):
            log.info("%s already holds a finished run with this config and input: nothing to do", out)
            return {**summary, "resumed": True}
        raise RunError(
            f"{out} holds a finished run with another config or input: pass --overwrite or choose another --output"
        )
    t_start = time.perf_counter()
    run = _Run(embeddings, out, cfg)
    (out / SUCCESS).unlink(missing_ok=True)
    store = run.store
    log.info("store %s: %d parts, %d rows, dim %d, %s", embeddings, len(store.parts), store.num_rows, store.dim,
             store.dtype)  # fmt: skip
    for step in STEPS:
        with run.rec.step(step):
            getattr(run, step)()
    summary = run.summary(time.perf_counter() - t_start)
    atomic_write_text(out / "config.yaml", resolved)
    atomic_write_json(out / "summary.json", summary)
    shutil.rmtree(run.work, ignore_errors=True)
    atomic_write_text(out / SUCCESS, "")
    return summary


def _vectors(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdistill.prototypes",
        description="PDS prototypes from CLIP embeddings in the clip-retrieval / LAION layout.",
    )
    p.add_argument("--embeddings", required=True, help="embedding store: local dir or fsspec URL")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--num-pairs", type=int, help="M, the number of prototypes (cluster.num_pairs)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set prune.ratio=0.3 (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def print_summary(summary: dict, output: str | Path) -> None:
    c, pr = summary["counts"], summary["prototypes"]
    print(f"prototypes: {pr['count']} written to {Path(output) / 'prototypes.parquet'}")
    print(f"  rows {c['rows']}, invalid {c['invalid']}, pruned {c['pruned']}, kept {c['kept']}")
    print(
        f"  matching {summary['match']['solver']}: {summary['match']['lap_objective']} shared pairs "
        f"({summary['match']['shared_pair_share']:.1%} of kept), {summary['match']['pairless_matches']} pairless "
        f"matches, policy {pr['pairless_policy']}"
    )
    print(f"  mean prototype alignment {pr['mean_alignment']:.3f}; {summary['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    overrides = list(args.overrides)
    if args.num_pairs is not None:
        overrides.append(f"cluster.num_pairs={args.num_pairs}")
    if args.quiet:
        overrides.append("progress=false")
    try:
        cfg = load_config(args.config, overrides)
        summary = run_prototypes(args.embeddings, args.output, cfg, overwrite=args.overwrite)
    except (ConfigError, StoreError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, args.output)
    return 0


__all__ = ["run_prototypes", "main", "RunError", "config_to_dict"]

if __name__ == "__main__":
    sys.exit(main())
