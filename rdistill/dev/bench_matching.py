"""Benchmarks of the large-M steps: cluster matching on a synthetic contingency table with a planted optimum, the
re-pairing of pairless matches, and caption retrieval.

    python -m rdistill.dev.bench_matching --m 100000 --nnz 20000000 [--seed 0] [--planted-mean 200] [--noise-mean 3]
    python -m rdistill.dev.bench_matching leftovers --m 50000 [--dim 768] [--leftover-k 32]
    python -m rdistill.dev.bench_matching captions --m 100000 --rows 65536 [--dim 768] [--old-chunks 8]

``counts`` (the default): an (m, m) int32 scipy CSR table whose cells are a random permutation ``perm`` with
counts ``1 + Poisson(planted_mean)`` (the planted matching) plus about ``nnz - m`` random cells off it with counts
``1 + Poisson(noise_mean)``. When every planted count exceeds every other cell, ``perm`` is the unique optimum (any
other permutation trades planted cells for smaller ones); the table reports whether that holds. Runs
:func:`rdistill.algo.matching.match_clusters` on the sparse path (``dense_max=0``, no centroids) and prints its
seconds, the process's peak RSS (``VmHWM``), the objective against the planted one and the fraction of planted
cells recovered.

``leftovers``: ``m`` pairless matches with random centroids (``dim``), re-paired by centroid cosine on the sparse
path (top-k neighbour graph + sparse LAPJV) and, when ``m`` is small enough, by the dense LAP on the full cosine
matrix for comparison.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp


def peak_rss_gb() -> float:
    """Peak resident set size of this process (VmHWM), GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def planted_table(m: int, nnz: int, seed: int, planted_mean: float, noise_mean: float):
    """(m, m) int32 CSR counts, (m,) int64 planted permutation ``perm`` (txt cluster of each img cluster)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(m).astype(np.int64)
    n_noise = max(0, nnz - m)
    rows = rng.integers(0, m, n_noise, dtype=np.int64)
    cols = rng.integers(0, m, n_noise, dtype=np.int64)
    off = cols != perm[rows]  # noise stays off the planted cells
    rows, cols = rows[off], cols[off]
    noise = (1 + rng.poisson(noise_mean, rows.size)).astype(np.int32)
    planted = (1 + rng.poisson(planted_mean, m)).astype(np.int32)
    data = np.concatenate([planted, noise])
    r = np.concatenate([np.arange(m, dtype=np.int64), rows])
    c = np.concatenate([perm, cols])
    del rows, cols, noise
    counts = sp.csr_matrix((data, (r, c)), shape=(m, m), dtype=np.int32)  # duplicate noise cells add up
    counts.sum_duplicates()
    return counts, perm


def bench_counts(args) -> None:
    from rdistill.algo.matching import match_clusters

    t0 = time.perf_counter()
    counts, perm = planted_table(args.m, args.nnz, args.seed, args.planted_mean, args.noise_mean)
    t_build = time.perf_counter() - t0
    planted_vals = np.asarray(counts[np.arange(args.m), perm]).ravel().astype(np.int64)
    planted_obj = int(planted_vals.sum())
    off_max = 0
    if counts.nnz > args.m:  # largest cell off the planted permutation
        coo = counts.tocoo()
        off_max = int(coo.data[coo.col != perm[coo.row]].max())
        del coo
    provable = int(planted_vals.min()) > off_max
    mib = (counts.data.nbytes + counts.indices.nbytes) >> 20
    print(f"table: m={args.m} nnz={counts.nnz} ({mib} MiB CSR data+indices)"
          f" built in {t_build:.1f}s; planted min {planted_vals.min()} vs largest other cell {off_max}:"
          f" planted is {'provably' if provable else 'not provably'} optimal")  # fmt: skip
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    m = match_clusters(counts, dense_max=0)
    secs = time.perf_counter() - t0
    recovered = float((m.txt_of_img == perm).mean())
    verdict = "optimum found" if m.objective == planted_obj else ("better" if m.objective > planted_obj else "WORSE")
    print(f"match_clusters ({m.solver}): {secs:.1f}s, peak RSS {peak_rss_gb():.2f} GB (before matching"
          f" {rss_before:.2f} GB); objective {m.objective} vs planted {planted_obj}: {verdict};"
          f" planted cells recovered {recovered:.4f}")  # fmt: skip


def bench_leftovers(args) -> None:
    from rdistill.algo.matching import LEFTOVER_DENSE_MAX, _pair_leftovers

    rng = np.random.default_rng(args.seed)
    img_c = rng.standard_normal((args.m, args.dim)).astype(np.float32)
    # text centroids near a hidden permutation of the image centroids, so good pairings exist
    hidden = rng.permutation(args.m)  # text centroid hidden[i] is near image centroid i
    txt_c = img_c[np.argsort(hidden)] + args.noise * rng.standard_normal((args.m, args.dim)).astype(np.float32)
    unit_i = img_c / np.linalg.norm(img_c, axis=1, keepdims=True)
    unit_t = txt_c / np.linalg.norm(txt_c, axis=1, keepdims=True)

    def cos_sum(t):
        return float(np.einsum("ij,ij->", unit_i, unit_t[t], dtype=np.float64))

    free = np.full(args.m, -1, dtype=np.int64)
    t0 = time.perf_counter()
    sparse = _pair_leftovers(free.copy(), img_c, txt_c, dense_max=0, k=args.leftover_k)
    secs = time.perf_counter() - t0
    print(f"leftovers sparse (k={args.leftover_k}): m={args.m} {secs:.1f}s, peak RSS {peak_rss_gb():.2f} GB,"
          f" cosine sum {cos_sum(sparse):.3f}, index order {cos_sum(np.arange(args.m)):.3f},"
          f" hidden pairs recovered {(sparse == hidden).mean():.4f}")  # fmt: skip
    if args.m <= max(LEFTOVER_DENSE_MAX, args.dense_check):
        t0 = time.perf_counter()
        dense = _pair_leftovers(free.copy(), img_c, txt_c, dense_max=args.m)
        print(f"leftovers dense: {time.perf_counter() - t0:.1f}s, cosine sum {cos_sum(dense):.3f}")


def bench_captions(args) -> None:
    """Top-1 caption retrieval of ``m`` unit queries over one ``rows``-row block: :class:`NearestRows` against the
    earlier row-only chunking (at most 2^24 scores per GEMM, so ``2^24 // m`` rows per chunk), timed on its first
    ``old_chunks`` chunks and extrapolated."""
    from rdistill.algo.retrieval import NearestRows

    rng = np.random.default_rng(args.seed)
    queries = rng.standard_normal((args.m, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    block = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    rows = np.arange(args.rows, dtype=np.int64)
    flop = 2.0 * args.m * args.rows * args.dim
    t0 = time.perf_counter()
    nearest = NearestRows(queries)
    nearest.add(block, rows)
    secs = time.perf_counter() - t0
    print(f"NearestRows: q={args.m} rows={args.rows} d={args.dim}: {secs:.1f}s, {flop / secs / 1e9:.0f} GFLOP/s,"
          f" peak RSS {peak_rss_gb():.2f} GB")  # fmt: skip
    step = max(1, (1 << 24) // args.m)
    n_chunks = -(-args.rows // step)
    best_score, best_row = np.full(args.m, -np.inf, dtype=np.float32), np.full(args.m, -1, dtype=np.int64)
    t0 = time.perf_counter()
    done = 0
    for s in range(0, min(args.rows, args.old_chunks * step), step):  # the earlier NearestRows.add, verbatim
        scores = queries @ block[s : s + step].T
        idx = scores.argmax(1)
        score, row = scores[np.arange(idx.size), idx], rows[s + idx]
        better = score > best_score
        best_score[better] = score[better]
        best_row[better] = row[better]
        done += 1
    old = (time.perf_counter() - t0) / done * n_chunks
    print(f"row-only chunks of {step} rows: {done} of {n_chunks} chunks timed, {old:.1f}s extrapolated,"
          f" {flop / old / 1e9:.0f} GFLOP/s; old / new time {old / secs:.2f}")  # fmt: skip
    if done == n_chunks:  # GEMMs of other shapes may round differently: near-ties can flip
        print(f"same top-1 row as the old code for {(best_row == nearest.best_row).mean():.6f} of the queries")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rdistill.dev.bench_matching", description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", default="counts", choices=("counts", "leftovers", "captions"))
    p.add_argument("--m", type=int, default=100_000)
    p.add_argument("--nnz", type=int, default=20_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--planted-mean", type=float, default=200.0)
    p.add_argument("--noise-mean", type=float, default=3.0)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--noise", type=float, default=1.0, help="leftovers: text centroid = image centroid + noise")
    p.add_argument("--leftover-k", type=int, default=32)
    p.add_argument("--dense-check", type=int, default=0, help="leftovers: also run the dense LAP up to this m")
    p.add_argument("--rows", type=int, default=65536, help="captions: database rows in the block")
    p.add_argument("--old-chunks", type=int, default=8, help="captions: chunks of the old code to time")
    args = p.parse_args(argv)
    {"counts": bench_counts, "leftovers": bench_leftovers, "captions": bench_captions}[args.what](args)


if __name__ == "__main__":
    main()
