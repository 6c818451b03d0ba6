"""The k-means training sample spread over a pool of Ray actors (:class:`RayShards`), one per worker node (CPU) or
one per GPU (``cluster.gpu``). Each actor loads its shards of the sample from the work directory and runs the shard
ops of :mod:`rdistill.algo.kmeans` on them; the driver broadcasts centroids through the object store and adds the
actors' exact (fixed-point) partials, so the result does not depend on how many actors there are or which shard
sits where.

An actor lost with its node is not restarted (on a small cluster there may be no free CPU for it, and waiting for
one would hang the run): its shards are loaded by the surviving actors, and the call raises
:class:`rdistill.algo.kmeans.ShardsLost`, upon which the fit redoes its current phase.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter

import numpy as np

from rdistill.algo.kmeans import (
    FixedPoint,
    KMeansShard,
    ShardsLost,
    add_partials,
    decode,
    gpu_resources,
    knn_search,
    run_on_shards,
)
from rdistill.errors import RunError
from rdistill.metrics import delay

log = logging.getLogger(__name__)

ACTOR_PREFIX = "rdistill.kmeans"


class ShardHolder:
    """A Ray actor's body: some shards of one modality's sample and the ops on them."""

    def __init__(self, step: str, threads: int, gpu: bool):
        import faiss

        if threads > 0:
            faiss.omp_set_num_threads(threads)
        self.step, self.gpu = step, gpu
        self.resources = gpu_resources() if gpu else None
        self.shards: dict[int, KMeansShard] = {}
        self.fp: FixedPoint | None = None

    def node(self) -> tuple[str, str | None]:
        import ray

        from rdistill.blas import faiss_kernel

        return ray.get_runtime_context().get_node_id(), faiss_kernel()

    def load(self, specs: list[tuple[int, dict]], loader, bits: int | None = None) -> list[tuple[int, int, float]]:
        """Load shards ``(id, spec)`` with ``loader(spec) -> (x (n, d) float32, offset)``; returns (id, rows, max
        squared norm) of each. ``bits``: the fixed-point grid, once known."""
        if bits is not None:
            self.fp = FixedPoint(bits)
        out = []
        for j, spec in specs:
            x, offset = loader(spec)
            self.shards[j] = KMeansShard(x, offset, self.gpu, self.resources)
            out.append((j, self.shards[j].n, self.shards[j].max_sqnorm()))
        return out

    def set_grid(self, bits: int) -> None:
        self.fp = FixedPoint(bits)

    def call(self, op: str, arguments: tuple[tuple, dict]) -> dict:
        delay(self.step)
        args, kwargs = arguments
        return run_on_shards([self.shards[j] for j in sorted(self.shards)], self.fp, op, *args, **kwargs)

    def gather(self, idx: np.ndarray) -> list[tuple[int, np.ndarray]]:
        return [(j, self.shards[j].rows(idx)) for j in sorted(self.shards)]

    def knn(self, queries: np.ndarray, base: np.ndarray, k: int):
        return knn_search(queries, base, k, self.gpu)


def _lost_errors():
    """What Ray raises for an actor gone with its node: dead, unavailable, or never placed (hard node affinity to a
    node that died before the actor started: ``ActorUnschedulableError``)."""
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "NodeDiedError",
             "OwnerDiedError")  # fmt: skip
    return tuple(getattr(rex, name) for name in names if hasattr(rex, name))


class RayShards:
    """A shard set (the interface of :class:`rdistill.algo.kmeans.LocalShards`) on Ray actors.

    ``specs``: one loader spec per shard, in sample order; ``loader(spec) -> (x, offset)`` runs on the actors.
    CPU: one actor per alive node with CPUs, pinned there, reserving ``cpus_per_actor`` and running faiss on all
    of the node's CPUs; GPU (``gpu``): one actor per GPU of the cluster. ``nodes`` counts calls per node id.
    """

    def __init__(self, step: str, specs: list, loader, *, gpu: bool = False, cpus_per_actor: float = 1.0,
                 start_timeout: float = 120.0, nodes: Counter | None = None):  # fmt: skip
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.step, self.loader, self.specs = ray, step, loader, specs
        self.nodes = nodes if nodes is not None else Counter()
        self.kernels: dict[str, str | None] = {}
        self.num_shards, self.calls = len(specs), 0
        holder = ray.remote(ShardHolder)
        actors = []
        tag = f"{ACTOR_PREFIX}.{uuid.uuid4().hex[:8]}"  # named, so they can be found (dashboard, tests)
        if gpu:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if gpus < 1:
                raise RunError("cluster.gpu is true but the Ray cluster has no GPUs")
            for i in range(gpus):
                actors.append(holder.options(num_cpus=cpus_per_actor, num_gpus=1, max_restarts=0,
                                             name=f"{tag}.gpu{i}").remote(step, 2, True))  # fmt: skip
        else:
            for node in ray.nodes():
                cpus = int(node.get("Resources", {}).get("CPU", 0))
                if not node.get("Alive") or cpus < 1:
                    continue
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                actors.append(holder.options(num_cpus=min(cpus_per_actor, cpus), max_restarts=0,
                                             scheduling_strategy=strategy, name=f"{tag}.{node['NodeID'][:8]}")
                              .remote(step, cpus, False))  # fmt: skip
        if not actors:
            raise RunError("no Ray node with CPUs to hold the k-means sample")
        ready = {a.node.remote(): a for a in actors}
        done, late = ray.wait(list(ready), num_returns=len(ready), timeout=start_timeout)
        self.actors, self.node_of = [], {}
        for ref in done:
            try:
                node, kernel = ray.get(ref)
            except _lost_errors() as e:
                log.warning("k-means: an actor died as it started, going on without it: %s", e)
                continue
            self.actors.append(ready[ref])
            self.node_of[ready[ref]] = node
            self.kernels[node] = kernel
        for ref in late:  # no free resources there within the timeout: go on without it rather than wait
            log.warning("k-means: an actor did not start within %.0f s; going on without it", start_timeout)
            ray.kill(ready[ref])
        if not self.actors:
            raise RunError(f"no k-means actor started within {start_timeout:.0f} s (no free CPU or GPU?)")
        self.owner: dict[int, object] = {}
        self.fp: FixedPoint | None = None
        plan = {a: [] for a in self.actors}
        for j in range(len(specs)):  # round-robin: shard j to actor j mod A
            plan[self.actors[j % len(self.actors)]].append(j)
        info = self._load(plan)
        rows = sum(n for _, n, _ in info)
        self.rows = rows
        self.fp = FixedPoint.for_sample(rows, max((m for _, _, m in info), default=0.0))
        try:
            self._run("set_grid", self.fp.bits)
        except ShardsLost:  # already reloaded elsewhere, with the grid
            pass
        log.info("k-means %s: %d shards (%d rows) on %d actors", step, len(specs), rows, len(self.actors))

    def _load(self, plan: dict) -> list:
        """Load shards on their new owners; an owner lost meanwhile hands its share to the others."""
        ray = self.ray
        info = []
        while True:
            bits = None if self.fp is None else self.fp.bits
            refs = {a: a.load.remote([(j, self.specs[j]) for j in js], self.loader, bits)
                    for a, js in plan.items() if js}  # fmt: skip
            lost = []
            for a, ref in refs.items():
                try:
                    info.extend(ray.get(ref))
                    for j in plan[a]:
                        self.owner[j] = a
                except _lost_errors():
                    lost.append(a)
            if not lost:
                return info
            # everything the lost actors held: this call's shards and any they had loaded before
            orphans = sorted({j for a in lost for j in plan[a]} | {j for j, o in self.owner.items() if o in lost})
            info = [row for row in info if row[0] not in orphans]
            self._drop(lost)
            plan = self._spread(orphans)

    def _drop(self, lost: list) -> None:
        for a in lost:
            if a in self.actors:
                self.actors.remove(a)
                log.warning("k-means %s: the actor on node %s was lost", self.step, self.node_of.get(a))
            try:  # an "unavailable" one may yet come back: it must not hold a CPU and stale shards till the job ends
                self.ray.kill(a)
            except Exception:  # already gone
                pass
        if not self.actors:
            raise RunError(f"k-means {self.step}: every actor holding the sample was lost")

    def _spread(self, orphans: list[int]) -> dict:
        """Orphaned shards to the actors holding the fewest, in shard order."""
        load = Counter({a: 0 for a in self.actors})
        for a in self.owner.values():
            if a in load:
                load[a] += 1
        plan = {a: [] for a in self.actors}
        for j in sorted(orphans):
            a = min(self.actors, key=lambda a: (load[a], self.actors.index(a)))
            plan[a].append(j)
            load[a] += 1
        return plan

    def _recover(self, lost: list) -> None:
        orphans = sorted(j for j, a in self.owner.items() if a in lost)
        self._drop(lost)
        self._load(self._spread(orphans))
        raise ShardsLost(f"{len(lost)} actor(s) lost; shards {orphans} moved to {len(self.actors)} surviving")

    def _run(self, method: str, *args):
        """``method(*args)`` on every actor, results by actor; lost actors trigger recovery and ShardsLost."""
        ray = self.ray
        self.calls += 1
        args = tuple(ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 1 << 16 else a for a in args)
        refs = {a: getattr(a, method).remote(*args) for a in self.actors}
        results, lost = {}, []
        for a, ref in refs.items():
            try:
                results[a] = ray.get(ref)
                self.nodes[self.node_of[a]] += 1
            except _lost_errors():
                lost.append(a)
        if lost:
            self._recover(lost)
        return results

    def call(self, op: str, *args, **kwargs) -> dict:
        total = None
        # the arguments (centroids, directions: O(M d)) go to the object store once, not once per actor
        results = self._run("call", op, self.ray.put((args, kwargs)))
        for part in results.values():
            total = add_partials(total, part)
        if op in ("assign", "apply") and int(total["counts"].sum()) != self.rows:  # every row counted exactly once
            raise RunError(f"k-means {self.step}: {op} counted {int(total['counts'].sum())} of {self.rows} rows")
        return decode(total or {}, self.fp)

    def gather(self, idx: np.ndarray) -> np.ndarray:
        pieces = [p for r in self._run("gather", idx).values() for p in r]
        if sorted(j for j, _ in pieces) != list(range(self.num_shards)):
            raise RunError(f"k-means {self.step}: shards {sorted(j for j, _ in pieces)} answered, not all")
        return np.concatenate([x for _, x in sorted(pieces, key=lambda p: p[0])])

    def knn(self, queries: np.ndarray, base: np.ndarray, k: int):
        ray = self.ray
        for a in list(self.actors):
            try:
                return ray.get(a.knn.remote(queries, base, k))
            except _lost_errors():
                self._recover([a])
        raise RunError("no k-means actor left")

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
