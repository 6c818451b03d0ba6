"""Scaling of the prototype engine over worker nodes, on a local multi-node Ray cluster.

    python -m rdistill.dev.bench_cluster [--rows 2000000] [--num-pairs 1000] [--workers 1,2] [--scratch DIR]

Writes a planted store (:mod:`rdistill.dev.planted`) once, then for each worker count W, in a fresh process:
a ``ray.cluster_utils.Cluster`` whose head has no CPUs and W worker nodes of one CPU each, and the engine on it
(``executor=ray``). Prints each step's seconds, the streaming passes' total (scan, prune, assign, prototypes,
captions: the work spread as tasks) and k-means' (the actor pool), the ratio of each against the first W, and the
CPU seconds the driver, the raylets and the GCS used (read from ``/proc``), since every node shares this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STREAMING = ("scan", "prune", "assign", "prototypes", "captions")


def _cpu_seconds(match: str) -> float:
    """User + system CPU seconds of the live processes whose command line contains ``match``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if match not in cmd:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_one(store: str, out: str, workers: int, num_pairs: int, overrides: list[str]) -> dict:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from rdistill.config import load_config
    from rdistill.engine import run_prototypes

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    cfg = load_config(None, ["progress=false", f"cluster.num_pairs={num_pairs}", "executor=ray", *overrides])
    before = {"raylet": _cpu_seconds("raylet/raylet"), "gcs": _cpu_seconds("gcs_server")}
    t0 = time.perf_counter()
    summary = run_prototypes(store, out, cfg)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "workers": workers,
        "seconds": seconds,
        "steps": {k: v["seconds"] for k, v in summary["steps"].items()},
        "nodes": {k: len(v.get("nodes", {})) for k, v in summary["steps"].items()},
        "driver_cpu_s": usage.ru_utime + usage.ru_stime,
        "driver_peak_rss_mb": max(v["peak_rss_mb"] for v in summary["steps"].values()),
        "raylet_cpu_s": _cpu_seconds("raylet/raylet") - before["raylet"],
        "gcs_cpu_s": _cpu_seconds("gcs_server") - before["gcs"],
        "lap_objective": summary["match"]["lap_objective"],
    }
    ray.shutdown()
    cluster.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.dev.bench_cluster")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--num-pairs", type=int, default=1000)
    p.add_argument("--rows-per-part", type=int, default=100_000)
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--scratch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.child:
        store, out, workers = args.child
        print(json.dumps(run_one(store, out, int(workers), args.num_pairs, args.set)))
        return 0
    from rdistill.dev.planted import make_concepts, write_store

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="rdistill-bench-cluster-"))
    root = scratch / "store"
    if not (root / "_SUCCESS").exists():
        write_store(root, make_concepts(args.num_pairs, args.dim, seed=0), args.rows, rows_per_part=args.rows_per_part,
                    seed=0)  # fmt: skip
        (root / "_SUCCESS").write_text("")
    results = []
    for w in args.workers:
        out = scratch / f"out_{w}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "rdistill.dev.bench_cluster", "--num-pairs", str(args.num_pairs),
               *sum((["--set", s] for s in args.set), []), "--child", str(root), str(out), str(w)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(f"\nengine on a local cluster (head 0 CPUs, W one-CPU workers), N={args.rows}, M={args.num_pairs}")
    print(f"{'W':>2} {'total s':>8} {'streaming s':>11} {'k-means s':>9} {'vs W=' + str(base['workers']):>8} "
          f"{'driver CPU s':>12} {'raylets CPU s':>13} {'GCS CPU s':>9} {'driver RSS':>10}")  # fmt: skip
    for r in results:
        r["streaming_s"] = sum(r["steps"].get(s, 0.0) for s in STREAMING)
    base_streaming = base["streaming_s"]
    for r in results:
        r["speedup_streaming"] = base_streaming / r["streaming_s"]
        print(f"{r['workers']:>2} {r['seconds']:8.1f} {r['streaming_s']:11.1f} {r['steps']['cluster']:9.1f} "
              f"{r['speedup_streaming']:7.2f}x {r['driver_cpu_s']:12.1f} {r['raylet_cpu_s']:13.1f} "
              f"{r['gcs_cpu_s']:9.1f} {r['driver_peak_rss_mb']:8.0f} MB")  # fmt: skip
    print("steps: " + "; ".join(f"W={r['workers']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["steps"].items())
                                for r in results))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
