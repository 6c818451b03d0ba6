import os

# Every Ray instance the tests start (ray.init, ray.cluster_utils.Cluster, the job subprocesses) binds loopback,
# never the machine's network address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Under pytest-xdist (make test: two workers) each worker's Ray instances live in a temp root of their own: a
# cluster a test starts (ray.cluster_utils.Cluster, ray start) records its address in RAY_TMPDIR/ray, and a bare
# ray.init() (a stage run in a subprocess) joins the cluster recorded there, which must not be the other worker's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"/tmp/rdistill-tests-{os.environ['PYTEST_XDIST_WORKER']}"
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

import numpy as np
import pytest

from rdistill.dev.planted import make_concepts, write_store


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory):
    """A small planted store: 20 concepts, 64-d, 12k rows in 3 float16 parts. Returns (root, concepts)."""
    root = tmp_path_factory.mktemp("planted") / "store"
    concepts = make_concepts(20, 64, noise=0.6, seed=11)
    write_store(root, concepts, 12_000, rows_per_part=4_000, seed=12)
    return root, concepts


def copy_store(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def store_copy(planted_store, tmp_path):
    root, concepts = planted_store
    return copy_store(root, tmp_path / "store"), concepts


def read_vectors(table, column):
    return np.stack(table[column].to_numpy(zero_copy_only=False))
