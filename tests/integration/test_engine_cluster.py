"""The prototype engine's passes as Ray tasks on a local multi-node cluster (``ray.cluster_utils.Cluster``):
the tasks and the k-means actors run on both worker nodes, the prototypes equal the local executor's, and a worker
node removed in the middle of the assignment pass, or of k-means, changes nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_vectors

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    from rdistill.dev.planted import make_concepts, write_store

    tmp = tmp_path_factory.mktemp("cluster")
    store = tmp / "store"
    write_store(store, make_concepts(20, 64, noise=0.6, seed=11), 12_000, rows_per_part=1_500, seed=12)  # 8 parts
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "tests.integration.engine_on_cluster", str(store), str(tmp / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "out", json.loads((tmp / "out" / "results.json").read_text())


def _table(path):
    return pq.read_table(path / "prototypes.parquet")


def assert_same_prototypes(a, b):
    """Bit-identical but for the retrieved captions' cosines: those come from a GEMM whose rounding depends on the
    BLAS thread count, which differs between the driver and a one-CPU Ray worker (at most an ulp or two)."""
    assert a.drop_columns(["caption_similarity"]).equals(b.drop_columns(["caption_similarity"]))
    np.testing.assert_allclose(a["caption_similarity"].to_numpy(), b["caption_similarity"].to_numpy(), atol=1e-6)


def test_tasks_run_on_both_workers_and_equal_the_local_executor(cluster_run):
    out, res = cluster_run
    workers = set(res["worker_ids"][:2])  # the third joined later, for the k-means loss
    assert res["local"]["executor"] == "local" and res["ray"]["executor"] == "ray"
    used = set()
    for step in ("scan", "assign", "prototypes", "captions"):
        nodes = res["ray"]["steps"][step]["nodes"]
        assert set(nodes) <= workers and sum(nodes.values()) == 8, (step, nodes)  # 8 parts, on the workers only
        assert res["ray"]["steps"][step]["bytes_read"] > 0
        used |= set(nodes)
    # SPREAD is best effort per step (under load a node slow to start a worker may miss one), not over the run
    assert used == workers
    assert sum(res["ray"]["steps"]["prune"]["nodes"].values()) == 24  # 2 histogram levels and the cut, 8 parts each
    assert set(res["ray"]["steps"]["cluster"]["nodes"]) == workers  # a k-means actor on each worker
    assert res["ray"]["kmeans"]["image"]["shards"] == 5 and res["ray"]["kmeans"]["image"]["restarts"] == 0
    # faiss's BLAS kernel, chosen in each worker from its own CPU, as the driver's
    kernels = res["ray"]["blas"]["faiss_kernel_by_node"]
    assert set(kernels) == workers and set(kernels.values()) == {_kernel(res["local"]["blas"]["driver"])}
    local, ray = _table(out / "local"), _table(out / "ray")
    assert_same_prototypes(local, ray)  # the same partials reduced in the same order
    assert res["local"]["counts"] == res["ray"]["counts"] and res["local"]["match"] == res["ray"]["match"]


def _kernel(blas):
    f = blas["faiss"][0]
    return f"{f['internal_api']} {f['version']} {f['architecture']}"


def test_a_worker_node_lost_mid_assignment_changes_nothing(cluster_run):
    out, res = cluster_run
    assert 1 <= res["removed_at_labels"] < 8  # removed while the assignment pass was running
    survivor = res["worker_ids"][0]
    for step in ("prototypes", "captions"):  # after the loss, everything ran on the surviving node
        assert res["lost"]["steps"][step]["nodes"] == {survivor: 8}
    local, lost = _table(out / "local"), _table(out / "lost")
    assert_same_prototypes(local, lost)
    np.testing.assert_array_equal(read_vectors(local, "image_embedding"), read_vectors(lost, "image_embedding"))


def test_a_worker_node_lost_mid_kmeans_moves_its_shards_and_changes_nothing(cluster_run):
    out, res = cluster_run
    lost = res["kmeans_lost"]
    assert res["kmeans_lost_at"] == ["prune.pkl", "scan.pkl"]  # removed while k-means was running
    restarts = lost["kmeans"]["image"]["restarts"] + lost["kmeans"]["text"]["restarts"]
    assert restarts == 1  # one phase redone after the survivor loaded the lost actor's shards
    survivor = res["worker_ids"][0]
    assert lost["steps"]["captions"]["nodes"] == {survivor: 8}
    assert_same_prototypes(_table(out / "local"), _table(out / "kmeans_lost"))
