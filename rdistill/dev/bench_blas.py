"""Benchmark of faiss's BLAS kernel with and without :func:`rdistill.blas.configure_faiss_blas`.

    python -m rdistill.dev.bench_blas [--queries 65536] [--centroids 1000] [--dim 768] [--rounds 2] [--coretype X]

Each variant runs in fresh Python processes (OpenBLAS reads ``OPENBLAS_CORETYPE`` only when it loads), every
``OPENBLAS_*`` variable removed from their environment: ``default`` leaves faiss's OpenBLAS to detect the CPU itself;
``configured`` calls ``configure_faiss_blas()`` before importing faiss; each ``--coretype X`` sets X after numpy is
loaded (numpy's own OpenBLAS keeps its detection and stays the reference) and before faiss is. Each process times
``faiss.knn`` (k=1) of ``queries`` x ``dim`` float32 queries against ``centroids`` x ``dim`` centroids and numpy's
GEMM of the same shape (``xq @ xb.T``), best of ``repeat`` after one warm-up; variants run interleaved ``rounds``
times and keep their best. Prints GFLOP/s (``2 * queries * centroids * dim`` flops per search), faiss/numpy, the
speed-up over ``default`` and each library's kernel (threadpoolctl's ``architecture``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run_child(args) -> dict:
    """In a fresh process: configure (or not), import faiss, time the two searches."""
    import numpy as np

    from rdistill import blas

    configured = blas.configure_faiss_blas() if args.child == "configured" else None
    if args.child.startswith("force:"):
        os.environ[blas.CORETYPE_ENV] = args.child.removeprefix("force:")
    import faiss

    rng = np.random.default_rng(args.seed)
    xq = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    xb = rng.standard_normal((args.centroids, args.dim), dtype=np.float32)
    gflop = 2 * args.queries * args.centroids * args.dim / 1e9

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_faiss = best(lambda: faiss.knn(xq, xb, 1))
    t_numpy = best(lambda: xq @ xb.T)
    libs = {row["package"]: row for row in blas.blas_report()}
    arch = {pkg: f"{row['internal_api']} {row['version']} {row['architecture']}" for pkg, row in libs.items()}
    return {
        "configured": configured,
        "env": os.environ.get(blas.CORETYPE_ENV),
        "faiss_gflops": gflop / t_faiss,
        "numpy_gflops": gflop / t_numpy,
        "faiss_seconds": t_faiss,
        "numpy_seconds": t_numpy,
        "kernels": arch,
    }


def run_variant(mode: str, args) -> dict:
    """One fresh process: ``mode`` is ``default``, ``configured`` or ``force:<core type>``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_") and k != "RDISTILL_OPENBLAS_CORETYPE"}
    cmd = [sys.executable, "-m", "rdistill.dev.bench_blas", "--child", mode, "--queries", str(args.queries)]
    cmd += ["--centroids", str(args.centroids), "--dim", str(args.dim), "--repeat", str(args.repeat)]
    cmd += ["--seed", str(args.seed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = "SIGILL: this CPU lacks the kernel's instructions" if proc.returncode == -4 else proc.stderr[-1000:]
        return {"error": f"exit {proc.returncode}: {reason}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """The round with the fastest faiss search, with numpy's best rate over all rounds."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    return {**max(ok, key=lambda r: r["faiss_gflops"]), "numpy_gflops": max(r["numpy_gflops"] for r in ok)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=65536)
    p.add_argument("--centroids", type=int, default=1000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeat", type=int, default=3, help="timed searches per process (best is kept)")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant, interleaved (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coretype", action="append", default=[], help="also run with OPENBLAS_CORETYPE set to this")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return

    from rdistill.blas import choose_coretype, read_cpuinfo

    cpu = read_cpuinfo()
    print(
        f"faiss.knn {args.queries} x {args.dim} by {args.centroids} x {args.dim} (k=1) vs numpy xq @ xb.T, "
        f"best of {args.repeat} x {args.rounds} processes; CPU {cpu[1] if cpu else '?'}, "
        f"{os.cpu_count()} logical cores, chosen core type: {choose_coretype(*cpu) if cpu else None}"
    )
    variants = {"default": "default", "configured": "configured"}
    variants.update({f"forced {c}": f"force:{c}" for c in args.coretype})
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved, so that a noisy neighbour does not favour one variant
        for name, mode in variants.items():
            runs[name].append(run_variant(mode, args))
    results = {name: best_of(r) for name, r in runs.items()}
    base = results["default"].get("faiss_gflops")
    print(f"{'variant':<18} {'OPENBLAS_CORETYPE':<18} {'faiss GFLOP/s':>13} {'numpy GFLOP/s':>13} {'faiss/numpy':>11} "
          f"{'vs default':>10}  kernels")  # fmt: skip
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} {variants[name].removeprefix('force:'):<18} {r['error']}")
            continue
        kernels = "; ".join(f"{pkg}: {k}" for pkg, k in sorted(r["kernels"].items()))
        speedup = f"{r['faiss_gflops'] / base:.2f}x" if base else "-"
        print(
            f"{name:<18} {r['env'] or '(unset)':<18} {r['faiss_gflops']:>13.1f} {r['numpy_gflops']:>13.1f} "
            f"{r['faiss_gflops'] / r['numpy_gflops']:>11.2f} {speedup:>10}  {kernels}"
        )
    if results["configured"].get("configured"):
        print("configure_faiss_blas():", json.dumps(results["configured"]["configured"]))


if __name__ == "__main__":
    main()
