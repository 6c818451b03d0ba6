"""Run by test_engine_cluster.py in a subprocess of its own (a Ray cluster per process): the prototype engine
on a local multi-node cluster (a head with no CPUs, two one-CPU workers) against the local executor, again with
one worker node removed in the middle of the assignment pass, and (with a fresh second worker) once more with a
worker node removed in the middle of k-means.

    python -m tests.integration.engine_on_cluster STORE OUT
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# the workers inherit it: time to remove a node mid-pass (assignment tasks) and mid-k-means (each actor call)
os.environ["RDISTILL_TASK_DELAY"] = "assign:0.6,cluster:0.03"


def main(store: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rdistill.config import load_config
    from rdistill.engine import run_prototypes

    out = Path(out)
    # shards of 256 rows: the 1,280-row k-means sample spreads over both workers' actors
    base = ["progress=false", "cluster.num_pairs=20", "embeddings.block_rows=1024", "cluster.shard_rows=256"]
    local = run_prototypes(store, out / "local", load_config(None, [*base, "executor=local"]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    results = {"local": local, "worker_ids": [w.node_id for w in workers]}
    results["ray"] = run_prototypes(store, out / "ray", load_config(None, [*base, "executor=ray"]))

    def remove_when_assigning():
        while not any((out / "lost" / "_work").glob("labels_*.npy")):
            time.sleep(0.05)
        results["removed_at_labels"] = len(list((out / "lost" / "_work").glob("labels_*.npy")))
        cluster.remove_node(workers[1])

    remover = threading.Thread(target=remove_when_assigning, daemon=True)
    remover.start()
    results["lost"] = run_prototypes(store, out / "lost", load_config(None, [*base, "executor=ray"]))
    remover.join(timeout=60)

    workers.append(cluster.add_node(num_cpus=1))  # two workers again
    cluster.wait_for_nodes()
    results["worker_ids"].append(workers[2].node_id)

    marks = out / "phases"
    marks.mkdir(parents=True)
    os.environ["RDISTILL_PHASE_MARKS"] = str(marks)  # the driver marks each k-means phase as it starts

    def remove_during_kmeans():
        while not (marks / "kmeans.img.lloyd_3-10").exists():  # the image fit has both actors and is under way
            time.sleep(0.02)
        results["kmeans_lost_at"] = sorted(p.name for p in (out / "kmeans_lost" / "_work").glob("*.pkl"))
        cluster.remove_node(workers[2])

    remover = threading.Thread(target=remove_during_kmeans, daemon=True)
    remover.start()
    results["kmeans_lost"] = run_prototypes(store, out / "kmeans_lost", load_config(None, [*base, "executor=ray"]))
    remover.join(timeout=60)
    (out / "results.json").write_text(json.dumps(results, default=str))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
