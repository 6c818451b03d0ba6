"""Benchmarks that print ratios against a baseline measured in the same run.

    python -m rdistill.dev.bench prototypes [--rows 100000] [--dim 768] [--num-pairs 100] [--skip-recipe] [--floor]
    python -m rdistill.dev.bench embed | synthesize | embed-funnel | synthesize-funnel ...
                                                          (see :mod:`rdistill.dev.bench_stages`)

``prototypes`` writes a planted store (:mod:`rdistill.dev.planted`) to a scratch directory, then runs, each in a fresh
process so that peak RSS is its own:

* ``recipe``: the authors' recipe on the same embeddings held in RAM: scikit-learn ``MiniBatchKMeans(batch_size=10000,
  n_init=20)`` per modality, a pandas crosstab, dense Hungarian (``scipy.optimize.linear_sum_assignment``), a boolean
  mask per cluster for the prototypes, and a full similarity matrix for caption retrieval;
* ``ours``: :func:`rdistill.engine.run_prototypes` streaming from the store on disk;
* ``floor`` (with ``--floor``): bare BLAS GEMMs of the shapes of the nearest-centroid searches that ours makes over
  all rows (image and text assignment of the kept rows, caption search over all rows), on the same block size; the
  distance work of ours' k-means on its sample (counted by :class:`rdistill.algo.kmeans.KMeansStats`) is added at
  the GEMM rate just measured. The ratio ours / floor is printed against both.

It prints time, the time ratio, planted recovery (:func:`rdistill.dev.planted.score_recovery`), mispaired prototypes,
LAP objective (shared pairs on the matched diagonal) and peak RSS of each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mb() -> float:
    # VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts from its parent's peak (inherited through exec)
    from rdistill.metrics import peak_rss_mb

    return peak_rss_mb()


def _load_store(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from rdistill.io.store import EmbeddingStore

    store = EmbeddingStore(str(root))
    img, txt = [], []
    for b in store.iter_blocks(1 << 20):
        img.append(b.img)
        txt.append(b.txt)
    return np.concatenate(img), np.concatenate(txt)


def run_recipe(root: Path, num_pairs: int, prune_ratio: float, seed: int) -> dict:
    """The authors' recipe (everything in RAM). Returns prototypes and timing."""
    import pandas as pd
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import MiniBatchKMeans

    img, txt = _load_store(root)
    t0 = time.perf_counter()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    sims = (img * txt).sum(1)
    keep = sims >= np.quantile(sims, prune_ratio)
    img_k, txt_k = img[keep], txt[keep]
    km_img = MiniBatchKMeans(n_clusters=num_pairs, batch_size=10000, n_init=20, random_state=seed).fit(img_k)
    km_txt = MiniBatchKMeans(n_clusters=num_pairs, batch_size=10000, n_init=20, random_state=seed + 1).fit(txt_k)
    li, lt = km_img.labels_, km_txt.labels_
    table = pd.crosstab(li, lt).reindex(index=range(num_pairs), columns=range(num_pairs), fill_value=0)
    counts = table.to_numpy()
    rows, cols = linear_sum_assignment(-counts)
    img_protos = np.zeros((num_pairs, img.shape[1]), dtype=np.float32)
    txt_protos = np.zeros_like(img_protos)
    for i, j in zip(rows, cols):
        mask = (li == i) & (lt == j)
        if mask.any():
            img_protos[i], txt_protos[i] = img_k[mask].mean(0), txt_k[mask].mean(0)
        else:
            img_protos[i], txt_protos[i] = km_img.cluster_centers_[i], km_txt.cluster_centers_[j]
    q = txt_protos / np.linalg.norm(txt_protos, axis=1, keepdims=True)
    caption_rows = (q @ txt.T).argmax(1)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "img_protos": img_protos,
        "txt_protos": txt_protos,
        "lap_objective": int(counts[rows, cols].sum()),
        "pairless": int((counts[rows, cols] == 0).sum()),
        "caption_rows": caption_rows,
    }


def run_ours(root: Path, out: Path, num_pairs: int, prune_ratio: float, seed: int, overrides: list[str]) -> dict:
    import pyarrow.parquet as pq

    from rdistill.config import load_config
    from rdistill.engine.driver import run_prototypes

    cfg = load_config(
        None,
        [f"cluster.num_pairs={num_pairs}", f"prune.ratio={prune_ratio}", f"seed={seed}", "progress=false", *overrides],
    )
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a finished output of the same store and config would be resumed
    t0 = time.perf_counter()
    summary = run_prototypes(str(root), out, cfg)
    seconds = time.perf_counter() - t0
    t = pq.read_table(out / "prototypes.parquet")
    return {
        "seconds": seconds,
        "img_protos": np.stack(t["image_embedding"].to_numpy(zero_copy_only=False)),
        "txt_protos": np.stack(t["text_embedding"].to_numpy(zero_copy_only=False)),
        "lap_objective": summary["match"]["lap_objective"],
        "pairless": summary["match"]["pairless_matches"],
        "steps": summary["steps"],
        "kept": summary["counts"]["kept"],
        "valid": summary["counts"]["valid"],
        "kmeans_gflop": summary["kmeans"]["image"]["gemm_gflop"] + summary["kmeans"]["text"]["gemm_gflop"],
    }


def time_whole_processes(root: Path, scratch: Path, args) -> dict:
    """Wall seconds of two whole processes, start-up and imports included: the authors' recipe as a script, and
    ``python -m rdistill.prototypes`` on the same store."""
    import shutil
    import subprocess

    recipe = (f"from pathlib import Path; from rdistill.dev.bench import run_recipe; "
              f"run_recipe(Path({str(root)!r}), {args.num_pairs}, {args.prune_ratio}, {args.seed})")  # fmt: skip
    out = scratch / "out-cli"
    shutil.rmtree(out, ignore_errors=True)
    ours = [sys.executable, "-m", "rdistill.prototypes", "--embeddings", str(root), "--output", str(out),
            "--num-pairs", str(args.num_pairs), "--quiet", "--set", f"prune.ratio={args.prune_ratio}",
            "--set", f"seed={args.seed}", *sum((["--set", s] for s in args.set), [])]  # fmt: skip
    timings: dict = {}
    # ours is timed three times (the first process after others ran pays the VM's first touch of its memory, up to
    # a second here) and its median taken; the recipe (minutes) once
    for name, cmd, times in (("recipe_s", [sys.executable, "-c", recipe], 1), ("ours_s", ours, 3)):
        runs = []
        for _ in range(times):
            print(f"timing the whole process: {name[:-2]} ...", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs.append(time.perf_counter() - t0)
        timings[name] = float(np.median(runs))
        timings[name[:-2] + "_runs_s"] = runs
    return timings


def run_floor(rows_assign: int, rows_caption: int, dim: int, num_pairs: int, block: int, seed: int) -> dict:
    """Bare float32 GEMMs (numpy BLAS) of the streaming searches' shapes: 2 x (rows_assign, d) @ (d, M) and
    (rows_caption, d) @ (d, M), block by block, on random data."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((block, dim), dtype=np.float32)
    c = rng.standard_normal((dim, num_pairs), dtype=np.float32)
    out = np.empty((block, num_pairs), dtype=np.float32)
    t0 = time.perf_counter()
    for total in (rows_assign, rows_assign, rows_caption):
        for s in range(0, total, block):
            n = min(block, total - s)
            np.matmul(x[:n], c, out=out[:n])
    seconds = time.perf_counter() - t0
    flops = 2.0 * dim * num_pairs * (2 * rows_assign + rows_caption)
    return {"seconds": seconds, "gflops": flops / seconds / 1e9}


def _exit_with_parent(parent: int) -> None:
    import os
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _child(fn, args, conn, parent):
    _exit_with_parent(parent)
    try:
        result = fn(*args)
        # the engine resets the kernel's high-water mark per step, so the process peak is the largest step peak
        steps = [s["peak_rss_mb"] for s in result.get("steps", {}).values()]
        result["peak_rss_mb"] = max([_peak_mb(), *steps])
        conn.send(result)
    except BaseException as e:
        conn.send({"error": repr(e)})
    finally:
        conn.close()


def in_fresh_process(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    import os

    p = ctx.Process(target=_child, args=(fn, args, child, os.getpid()), daemon=True)
    p.start()
    child.close()
    result = parent.recv()
    p.join()
    if "error" in result:
        raise RuntimeError(f"{fn.__name__} failed: {result['error']}")
    return result


def bench_prototypes(args) -> dict:
    from rdistill.dev.planted import make_concepts, score_recovery, write_store

    concepts = make_concepts(args.concepts or args.num_pairs, args.dim, seed=args.seed)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="rdistill-bench-"))
    root = scratch / "store"
    if not (root / "_SUCCESS").exists():
        t0 = time.perf_counter()
        write_store(root, concepts, args.rows, rows_per_part=args.rows_per_part, seed=args.seed)
        (root / "_SUCCESS").write_text("")
        print(f"wrote planted store {root}: {args.rows} rows, d={args.dim} ({time.perf_counter() - t0:.1f} s)")
    results = {}
    runs = [("ours", run_ours, (root, scratch / "out", args.num_pairs, args.prune_ratio, args.seed, args.set))]
    if not args.skip_recipe:
        runs.insert(0, ("recipe", run_recipe, (root, args.num_pairs, args.prune_ratio, args.seed)))
    for name, fn, fargs in runs:
        print(f"running {name} ...", flush=True)
        r = in_fresh_process(fn, *fargs)
        r.update(score_recovery(r.pop("img_protos"), r.pop("txt_protos"), concepts))
        r.pop("caption_rows", None)
        results[name] = r
    if args.whole_process:
        results["processes"] = time_whole_processes(root, scratch, args)
    if args.floor:
        ours = results["ours"]
        results["floor"] = in_fresh_process(
            run_floor, ours["kept"], ours["valid"], args.dim, args.num_pairs, 65536, args.seed
        )
    print(
        f"\nprototypes benchmark: N={args.rows}, d={args.dim}, M={args.num_pairs}, planted concepts "
        f"{concepts.num_concepts}"
    )
    print(
        f"{'run':8} {'seconds':>9} {'recovered':>9} {'mispaired':>9} {'pairless':>8} {'LAP obj':>9} {'peak RSS':>10}"
    )
    for name, r in results.items():
        if name == "processes":
            continue
        if name == "floor":
            print(
                f"{name:8} {r['seconds']:9.2f} {'':>9} {'':>9} {'':>8} {'':>9} {r['peak_rss_mb']:8.0f} MB"
                f"   ({r['gflops']:.0f} GFLOP/s)"
            )
            continue
        print(
            f"{name:8} {r['seconds']:9.2f} {r['recovered']:9.2f} {r['mispaired']:9d} {r['pairless']:8d} "
            f"{r['lap_objective']:9d} {r['peak_rss_mb']:8.0f} MB"
        )
    if "recipe" in results:
        print(f"speed-up ours vs recipe: {results['recipe']['seconds'] / results['ours']['seconds']:.1f}x")
    if "floor" in results:
        ours, floor = results["ours"], results["floor"]
        kmeans_floor = ours["kmeans_gflop"] / floor["gflops"]
        floor["seconds_with_kmeans"] = floor["seconds"] + kmeans_floor
        print(
            f"GEMM floor: streaming searches {floor['seconds']:.1f} s + k-means distance work "
            f"{ours['kmeans_gflop']:.0f} GFLOP = {kmeans_floor:.1f} s at the measured rate"
        )
        print(
            f"ours / GEMM floor of all its assignment work: {ours['seconds'] / floor['seconds_with_kmeans']:.2f}x"
            f"   (vs the streaming searches alone: {ours['seconds'] / floor['seconds']:.2f}x)"
        )
    if "floor" in results:
        # per step: the GEMMs it has to make at the measured rate (assign: image and text search of the kept rows;
        # captions: one search of the valid rows; cluster: k-means' counted distance work)
        ours, rate = results["ours"], results["floor"]["gflops"] * 1e9
        flops = {
            "assign": 2 * 2.0 * ours["kept"] * args.num_pairs * args.dim,
            "captions": 2.0 * ours["valid"] * args.num_pairs * args.dim,
            "cluster": ours["kmeans_gflop"] * 1e9,
        }
        floor["by_step"] = {
            k: {
                "floor_s": f / rate,
                "ours_s": ours["steps"][k]["seconds"],
                "ratio": ours["steps"][k]["seconds"] / (f / rate),
            }
            for k, f in flops.items()
        }
        print(
            "ours / GEMM floor by step: "
            + ", ".join(
                f"{k} {v['ours_s']:.1f} s / {v['floor_s']:.1f} s = {v['ratio']:.2f}x"
                for k, v in floor["by_step"].items()
            )
        )
    if "processes" in results:
        pr = results["processes"]
        print(
            f"whole processes: recipe {pr['recipe_s']:.1f} s, `python -m rdistill.prototypes` {pr['ours_s']:.1f} s:"
            f" {pr['recipe_s'] / pr['ours_s']:.1f}x (ours: the median of "
            + ", ".join(f"{t:.2f}" for t in pr["ours_runs_s"])
            + " s)"
        )
    print(
        "ours by step: "
        + ", ".join(f"{k} {v['seconds']:.1f}s/{v['peak_rss_mb']:.0f}MB" for k, v in results["ours"]["steps"].items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.dev.bench")
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("prototypes", help="our engine vs the authors' recipe (and the GEMM floor)")
    b.add_argument("--rows", type=int, default=100_000)
    b.add_argument("--dim", type=int, default=768)
    b.add_argument("--num-pairs", type=int, default=100)
    b.add_argument("--concepts", type=int, help="planted concepts (default: num-pairs)")
    b.add_argument("--prune-ratio", type=float, default=0.2)
    b.add_argument("--rows-per-part", type=int, default=100_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--skip-recipe", action="store_true", help="do not run the authors' recipe (large N)")
    b.add_argument("--floor", action="store_true", help="measure the GEMM floor of the streaming searches")
    b.add_argument("--whole-process", action="store_true",
                   help="also time the recipe and `python -m rdistill.prototypes` as whole processes")  # fmt: skip
    b.add_argument("--scratch", help="scratch dir (kept; the store is reused when present)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for ours")
    b.add_argument("--json", help="write the results as JSON here")
    from rdistill.dev import bench_stages as st

    st.add_parsers(sub)
    args = p.parse_args(argv)
    benches = {"prototypes": bench_prototypes, "embed": st.bench_embed, "synthesize": st.bench_synthesize,
               "embed-funnel": st.bench_embed_funnel, "synthesize-funnel": st.bench_synthesize_funnel}  # fmt: skip
    benches[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
