"""The full job under `ray job submit`, as a user runs it: against a `ray start --head` cluster on loopback (with
its working directory uploaded, then killed mid-synthesis and resubmitted), and on a local multi-node cluster (a head
with no CPUs, two one-CPU worker nodes) where the engine's tasks and k-means actors run on the workers."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["job.toy_shards=4", "job.toy_per_shard=40", "cluster.num_pairs=12", "synthesize.shard_size=4",
         "synthesize.batch_size=4"]  # fmt: skip

pytestmark = pytest.mark.slow


def _ray_bin():
    path = Path(sys.executable).with_name("ray")
    if not path.exists():
        pytest.skip("the ray CLI is not installed (ray[default])")
    return str(path)


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it exited on its own
        pass


@pytest.fixture(scope="module")
def head():
    """A Ray head on loopback with its job server, in its own process group: stopping it with `ray stop` would
    also stop the test session's own Ray instance (and this process with it)."""
    ray = _ray_bin()
    # a short temp root: Ray's unix sockets live under it, and a socket path may not pass 107 bytes (pytest's temp
    # paths under xdist, .../popen-gw1/ray0/session_<date>_<pid>/sockets/..., come close)
    temp = Path(tempfile.mkdtemp(prefix="rdray-", dir="/tmp"))
    # the job's `python` must be this environment's, as after `source .venv/bin/activate` (jobs/README.md)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    # the session's own Ray instance holds Ray's default agent ports: a second one on this machine needs its own
    port, agent, grpc, env_agent, metrics, client = _free_ports(6)
    proc = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=0",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={port}", f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={env_agent}",
                             f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
                             f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([ray, "job", "list", "--address", address], env=env, capture_output=True).returncode:
        if time.time() > deadline or proc.poll() is not None:
            _kill_group(proc)
            pytest.fail(f"ray start --head did not come up (exit status {proc.poll()}; logs in {temp})")
        time.sleep(2)
    yield {"address": address, "env": env, "ray": ray}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """A local multi-node cluster on loopback (tests/integration/cluster_head.py: a head with no CPUs and the job
    server, two one-CPU worker nodes), in its own process group so that stopping it never touches the test
    session's own Ray instance."""
    ray = _ray_bin()
    ready = tmp_path_factory.mktemp("ray") / "ready.json"
    # the job's `python` must be this environment's, as after `source .venv/bin/activate` (jobs/README.md)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    # the session's own Ray instance holds Ray's default agent ports: this cluster's head gets its own
    port, agent, metrics, env_agent = _free_ports(4)
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.cluster_head", str(ready), str(port), str(agent),
                             str(metrics), str(env_agent)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while not ready.exists() or subprocess.run([ray, "job", "list", "--address", address], env=env,
                                               capture_output=True).returncode:  # fmt: skip
        if time.time() > deadline or proc.poll() is not None:
            _kill_group(proc)
            pytest.fail(f"the local cluster with a job server did not come up (exit status {proc.poll()})")
        time.sleep(2)
    yield {"address": address, "env": env, "ray": ray, "workers": json.loads(ready.read_text())["workers"]}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_group(proc)


def _submit(head, out, *extra, env_vars=None):
    cmd = [head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "demo-output", "*.tar"],
                                             "env_vars": env_vars or {}}),
           "--", "python", "-m", "rdistill.pds", "--config", "configs/demo.yaml", "--output", str(out), "--quiet",
           *sum((["--set", s] for s in SMALL + list(extra)), [])]  # fmt: skip
    deadline = time.time() + 90
    while True:  # the job server answers before its agent on the node is up: Ray says to try again
        r = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in r.stdout + r.stderr or time.time() > deadline:
            return r
        time.sleep(3)


def _images(out):
    from PIL import Image

    images = {}
    for tar_path in sorted((Path(out) / "distilled" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".png"):
                    images[m.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))).astype(int)
    return images


def test_demo_job_under_ray_job_submit_then_kill_mid_synthesis_and_resubmit(head, tmp_path):
    full = tmp_path / "full"
    r = _submit(head, full)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    summary = json.loads((full / "summary.json").read_text())
    assert summary["embed"]["counts"]["samples"] == 160
    m = summary["prototypes"]["prototypes"]["count"]
    assert m == 12 and summary["synthesize"]["images"] == m
    # under ray job submit the engine's passes run as Ray tasks on the cluster, not in the driver
    assert (
        summary["prototypes"]["executor"] == "ray"
        and sum(summary["prototypes"]["steps"]["assign"]["nodes"].values()) == 4
    )
    members = {}
    for tar_path in sorted((full / "distilled" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                members.setdefault(name.rsplit(".", 1)[1], []).append(name)
    assert {k: len(v) for k, v in members.items()} == {"png": m, "txt": m, "npy": m, "json": m}
    images = _images(full)
    assert len(images) == m and all(im.std() > 0 for im in images.values())  # no blank (NaN-conditioned) image
    report = (full / "report.html").read_text()
    assert report.count("<svg") == 2 and report.count("<figure>") == m and "Prototype alignment" in report
    # every file and folder the job wrote is readable by other users (the umask's modes, not mkstemp's 0600)
    unreadable = [p for p in full.rglob("*") if p.stat().st_mode & (0o055 if p.is_dir() else 0o044) == 0]
    assert not unreadable and not list(full.rglob(".*.tmp"))

    # a second job dies (SIGKILL of its driver) after the first synthesized shard; a third resumes it
    cut = tmp_path / "cut"
    shutil.copytree(full / "toy-shards", cut / "toy-shards")
    r = _submit(head, cut, env_vars={"RDISTILL_FAULT_KILL_AFTER": "synthesize:1"})
    assert r.returncode != 0
    assert len(list((cut / "distilled" / "shards").glob("*.tar"))) == 1
    stamps = {p: p.stat().st_mtime_ns for p in [cut / "embeddings" / "_SUCCESS", cut / "prototypes" / "_SUCCESS",
                                                 cut / "distilled" / "shards" / "distilled-00000.tar"]}  # fmt: skip
    time.sleep(0.01)
    r = _submit(head, cut)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["stages"]["embed"]["status"] == "skipped (done)"
    assert summary["stages"]["prototypes"]["status"] == "skipped (done)"
    assert summary["synthesize"]["this_run"]["images"] == m - 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished stages and shards untouched
    a, b = _images(full), _images(cut)
    assert a.keys() == b.keys() and max(int(np.abs(a[k] - b[k]).max()) for k in a) <= 1


def test_demo_job_on_a_multinode_cluster_runs_the_engine_on_the_workers(multinode, tmp_path):
    """Without --working-dir: the nodes of a one-machine test cluster share one session directory, and a worker
    node's runtime-env agent deletes the uploaded package once its own workers are done with it, which is the
    driver's working directory on the head (torch then dies loading MKL). The code comes from PYTHONPATH instead."""
    out = tmp_path / "out"
    cmd = [multinode["ray"], "job", "submit", "--address", multinode["address"],
           "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}}),
           "--", "python", "-m", "rdistill.pds", "--config", str(ROOT / "configs" / "demo.yaml"), "--output",
           str(out), "--quiet", *sum((["--set", s] for s in SMALL), [])]  # fmt: skip
    deadline = time.time() + 90
    while True:  # the job server answers before its agent on the node is up: Ray says to try again
        r = subprocess.run(cmd, env=multinode["env"], capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthesize"]["images"] == summary["prototypes"]["prototypes"]["count"] == 12
    steps, workers = summary["prototypes"]["steps"], set(multinode["workers"])
    assert summary["prototypes"]["executor"] == "ray"
    used = set()
    for step in ("scan", "assign", "prototypes", "captions"):  # 4 parts each, on the worker nodes only
        assert set(steps[step]["nodes"]) <= workers and sum(steps[step]["nodes"].values()) == 4, step
        used |= set(steps[step]["nodes"])
    assert used == workers  # SPREAD is best effort per step (a node slow to start workers may miss one), not overall
    assert set(steps["cluster"]["nodes"]) == workers  # a k-means actor on each worker node
    assert (out / "report.html").exists()
