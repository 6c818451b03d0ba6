"""The engine's work on one part of the store: plain functions that an executor runs in this process or as Ray
tasks (:mod:`rdistill.engine.executor`). Each reads its part from the store (any fsspec URL the workers reach),
writes its per-row spills (``sims_{part}.npy``, ``labels_{part}.npy``) into the work directory atomically, and
returns a small partial: O(M·d) at most, never O(rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdistill.algo.cells import CellMeans, CellPlan, CellSums
from rdistill.algo.kmeans import flat_index, nearest_centroid
from rdistill.algo.prune import PruneCut, level_histogram, pair_similarity, rows_in_bin
from rdistill.algo.retrieval import NearestRows
from rdistill.config import Config
from rdistill.io.outputs import atomic_path
from rdistill.io.rowpool import for_row_ranges
from rdistill.io.store import Block, BlockBuffers, EmbeddingStore, Part, StoreError


def unit_rows(x: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw row norms of ``x`` (n, d) float32, and ``x`` L2-normalised *in place* when ``enabled`` (the caller owns
    ``x``: a block fresh from the store or a masked copy). NaN/inf/zero rows are left to the caller's mask. Row
    ranges run on this process's cores (:func:`rdistill.io.rowpool.for_row_ranges`)."""
    norms = np.empty(x.shape[0], dtype=x.dtype)

    def work(r0: int, r1: int) -> None:
        v = x[r0:r1]
        np.sqrt(np.einsum("ij,ij->i", v, v), out=norms[r0:r1])
        if enabled:
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                v /= np.where(norms[r0:r1] > 0, norms[r0:r1], 1)[:, None]

    for_row_ranges(work, x.shape[0])
    return x, norms


class PartCache:
    """Prepared parts kept in RAM between passes by the local executor, up to ``budget`` bytes (the prepared
    store costs 8 bytes per row and dimension)."""

    def __init__(self, budget: float):
        self.budget, self.used = budget, 0
        self.parts: dict[int, list[Block]] = {}


# Reused block memory of this process: a stream takes a set and gives it back when it ends; one set is kept between
# streams (12 bytes per row and dimension of a block: 0.6 GB at 65536 x 768, what each block allocated before), so
# a process's memory stays that of one block per live stream, whatever N is.
_free_buffers: list[BlockBuffers] = []


def prepared_blocks(store: EmbeddingStore, part: Part, cfg: Config, *, img: bool = True,
                    cache: PartCache | None = None) -> Iterator[Block]:  # fmt: skip
    """The blocks of ``part``, in order: rows normalised in place (when ``embeddings.normalize``) with their raw
    norms in ``img_norm``/``txt_norm``. A part that ``cache`` holds, or takes now, is in memory of its own; any
    other part streams through reused buffers, so a block is valid until the next one is drawn (consumers copy
    what they keep)."""
    if cache is not None and part.index in cache.parts:
        yield from cache.parts[part.index]
        return
    keep = cache is not None and img and cache.used + part.rows * store.dim * 8 <= cache.budget
    buffers = None if keep else (_free_buffers.pop() if _free_buffers else BlockBuffers())
    out = []
    try:
        for b in store.part_blocks(part, cfg.embeddings.block_rows, img=img, buffers=buffers):
            if b.img is not None:
                b.img, b.img_norm = unit_rows(b.img, cfg.embeddings.normalize)
            b.txt, b.txt_norm = unit_rows(b.txt, cfg.embeddings.normalize)
            if keep:
                out.append(b)
            yield b
    finally:
        if buffers is not None and not _free_buffers:
            _free_buffers.append(buffers)
    if keep:
        cache.parts[part.index] = out
        cache.used += part.rows * store.dim * 8


def _bytes(part: Part, img: bool = True) -> int:
    row = part.txt.dim * part.txt.dtype.itemsize + (part.img.dim * part.img.dtype.itemsize if img else 0)
    return part.rows * row


def _spill(work: str, name: str, part: int, values: np.ndarray) -> None:
    with atomic_path(Path(work) / f"{name}_{part}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, values)


def _load(work: str, name: str, part: int) -> np.ndarray:
    return np.load(Path(work) / f"{name}_{part}.npy")


@dataclass
class ScanPartial:
    """One part's scan: invalid rows, bytes read, and the cosines and global row ids of its rows in the k-means
    sample (their vectors are spilled to ``sample_img_{part}``/``sample_txt_{part}``, float16 unit rows)."""

    invalid: int
    bytes_read: int
    sample_sims: np.ndarray
    sample_rows: np.ndarray


def scan_part(part: Part, positions: np.ndarray, *, store: EmbeddingStore, cfg: Config, work: str,
              cache: PartCache | None = None) -> ScanPartial:  # fmt: skip
    """Validity and pair cosine of every row of ``part`` (spilled to ``sims_{part}``, NaN for invalid rows), and
    its rows at ``positions`` (global row ids, sorted) for the k-means sample (spilled, float16)."""
    sims, smp = [], ([], [], [], [])
    invalid = 0
    for b in prepared_blocks(store, part, cfg, cache=cache):
        valid = np.isfinite(b.img_norm) & np.isfinite(b.txt_norm) & (b.img_norm > 0) & (b.txt_norm > 0)
        if not valid.all():
            if cfg.embeddings.on_invalid == "error":
                row = int(np.flatnonzero(~valid)[0]) + b.offset
                raise StoreError(
                    f"{part.img.path} / {part.txt.path}: row {row} is NaN, infinite or zero "
                    "(embeddings.on_invalid=error; set it to skip to drop such rows)"
                )
            invalid += int((~valid).sum())
        s = pair_similarity(b.img, b.txt)
        s[~valid] = np.nan
        sims.append(s)
        lo, hi = np.searchsorted(positions, [b.start, b.start + b.rows.size])
        local = positions[lo:hi] - b.start
        for out, x in zip(smp, (b.img[local].astype(np.float16), b.txt[local].astype(np.float16), s[local],
                                positions[lo:hi])):  # fmt: skip
            out.append(x)
    img, txt, sample_sims, sample_rows = (np.concatenate(x) for x in smp)
    _spill(work, "sample_img", part.index, img)
    _spill(work, "sample_txt", part.index, txt)
    _spill(work, "sims", part.index, np.concatenate(sims))
    return ScanPartial(invalid, _bytes(part), sample_sims, sample_rows)


def sample_shard(spec: dict) -> tuple[np.ndarray, int]:
    """A k-means shard from the scan's sample spills: ``spec`` = ``{"work", "modality" ("img" or "txt"), "pieces":
    [(part index, (m,) int64 rows of that part's spill)], "offset": its first row in the sample}``; returns the
    rows (n, d) float32 and the offset. Runs where the shard is held (a k-means actor, or the driver)."""
    rows = []
    for part, local in spec["pieces"]:
        spill = np.load(Path(spec["work"]) / f"sample_{spec['modality']}_{part}.npy", mmap_mode="r")
        rows.append(np.asarray(spill[local], dtype=np.float32))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32), spec["offset"]


def histogram_part(part: Part, coarse_bin: int | None = None, *, work: str, num_bins: int,
                   low_bits: int) -> np.ndarray:  # fmt: skip
    """One level of the prune histogram of ``part``'s valid cosines (from its spill):
    :func:`rdistill.algo.prune.level_histogram`."""
    s = _load(work, "sims", part.index)
    return level_histogram(s[~np.isnan(s)], num_bins, low_bits, coarse_bin)


def cut_bin_part(part: Part, b: int, *, work: str, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``part``'s (cosine, global row) pairs in the prune histogram's bin ``b``."""
    s = _load(work, "sims", part.index)
    ok = ~np.isnan(s)
    return rows_in_bin(s[ok], (np.arange(part.rows, dtype=np.int64) + part.start)[ok], b, num_bins)


@dataclass
class AssignPartial:
    """One part's assignment: the (image, text) cluster cells of its kept pairs as codes ``img * M + txt`` with
    counts, and the cluster sizes it adds."""

    codes: np.ndarray
    counts: np.ndarray
    img_sizes: np.ndarray
    txt_sizes: np.ndarray
    bytes_read: int


def assign_part(part: Part, *, store: EmbeddingStore, cfg: Config, work: str, cut: PruneCut,
                img_centroids: np.ndarray, txt_centroids: np.ndarray,
                cache: PartCache | None = None) -> AssignPartial:  # fmt: skip
    """Nearest image and text centroid of every kept pair of ``part`` (spilled to ``labels_{part}``, -1 when not
    kept)."""
    k = img_centroids.shape[0]
    img_index, txt_index = flat_index(img_centroids, cfg.cluster.gpu), flat_index(txt_centroids, cfg.cluster.gpu)
    sims = _load(work, "sims", part.index)
    labels, codes = [], []
    img_sizes, txt_sizes = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    for b in prepared_blocks(store, part, cfg, cache=cache):
        s = sims[b.offset : b.offset + b.rows.size]
        keep = ~np.isnan(s)
        keep[keep] = cut.keep(s[keep], b.rows[keep])
        lab = np.full((b.rows.size, 2), -1, dtype=np.int32)
        if keep.any():
            li, _ = nearest_centroid(b.img[keep], img_centroids, img_index)
            lt, _ = nearest_centroid(b.txt[keep], txt_centroids, txt_index)
            lab[keep, 0], lab[keep, 1] = li, lt
            codes.append(li.astype(np.int64) * k + lt.astype(np.int64))
            img_sizes += np.bincount(li, minlength=k)
            txt_sizes += np.bincount(lt, minlength=k)
        labels.append(lab)
    _spill(work, "labels", part.index, np.concatenate(labels))
    uniq, cnt = np.unique(np.concatenate(codes) if codes else np.zeros(0, np.int64), return_counts=True)
    return AssignPartial(uniq, cnt.astype(np.int64), img_sizes, txt_sizes, _bytes(part))


def prototypes_part(part: Part, *, store: EmbeddingStore, cfg: Config, work: str, plan: CellPlan,
                    cache: PartCache | None = None) -> tuple[CellSums, int]:  # fmt: skip
    """Sums of the shared pairs of ``part`` in each planned cell it touches, and the bytes it read."""
    means = CellMeans(plan, cfg.cluster.num_pairs, store.dim, state=False)
    labels = _load(work, "labels", part.index)
    sums = []
    for b in prepared_blocks(store, part, cfg, cache=cache):
        lab = labels[b.offset : b.offset + b.rows.size]
        if (lab[:, 0] >= 0).any():  # rows not kept (-1, -1) match no planned cell: the whole block goes in, uncopied
            sums.append(means.sums(b.img, b.txt, lab[:, 0], lab[:, 1], b.img_norm, b.txt_norm))
    return CellSums.combine(sums, store.dim), _bytes(part)


def captions_part(part: Part, *, store: EmbeddingStore, cfg: Config, work: str, queries: np.ndarray,
                  cache: PartCache | None = None) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """The best valid caption row of ``part`` for each (unit) text prototype in ``queries``: (q,) global rows
    (-1: none), (q,) float32 cosines, and the bytes read."""
    nearest = NearestRows(queries, gpu=cfg.cluster.gpu)
    sims = _load(work, "sims", part.index)
    for b in prepared_blocks(store, part, cfg, img=False, cache=cache):
        ok = ~np.isnan(sims[b.offset : b.offset + b.rows.size])
        txt, rows = (b.txt, b.rows) if ok.all() else (b.txt[ok], b.rows[ok])  # all valid: no copy
        nearest.add(txt if cfg.embeddings.normalize else txt / b.txt_norm[ok, None], rows)
    return nearest.best_row, nearest.best_score, _bytes(part, img=False)
