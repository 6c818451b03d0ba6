"""Where the engine's per-part tasks run: in this process (:class:`LocalExecutor`) or as Ray tasks over the
cluster's workers (:class:`RayExecutor`). Both hand results back in part order, so every reduction adds the same
partials in the same order whatever the cluster's shape: one config gives the same prototypes anywhere.

The Ray executor keeps at most ``window`` tasks in flight and reduces each result as soon as it is the next in
order, so the driver holds a few partials, never all of them. A task lost with its node is retried (``max_retries``)
on another; its spill files are written atomically, so a retried task simply writes them again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator

from rdistill.algo.kmeans import KMeansShard, LocalShards, check_faiss_gpu, gpu_resources
from rdistill.errors import ConfigError
from rdistill.metrics import delay

log = logging.getLogger(__name__)


class _CountedShards(LocalShards):
    """Local shards that count their calls under this machine's name (``nodes`` in ``summary.json``)."""

    def __init__(self, shards, gpu: bool, nodes: Counter):
        super().__init__(shards, gpu)
        self.nodes = nodes

    def call(self, op: str, *args, **kwargs) -> dict:
        self.nodes[_node()] += 1
        return super().call(op, *args, **kwargs)

    def close(self) -> None:
        self.shards = []


def _node() -> str:
    return f"local:{socket.gethostname()}"


class LocalExecutor:
    """Runs tasks one after another in this process."""

    name = "local"

    def __init__(self):
        self.nodes: dict[str, Counter] = {}

    def check_gpu(self) -> str:
        """For ``cluster.gpu``: this process's faiss must see a GPU (raises ConfigError before any work)."""
        try:
            return f"{check_faiss_gpu()} GPU(s) seen by faiss in this process"
        except RuntimeError as e:
            raise ConfigError(f"cluster.gpu is true but {e}") from None

    def shard_set(self, step: str, specs: list, loader, gpu: bool = False) -> LocalShards:
        """The k-means sample's shards, loaded here by ``loader(spec) -> (x, offset)``, as a
        :class:`LocalShards`."""
        res = gpu_resources() if gpu else None
        shards = [KMeansShard(*loader(spec), gpu, res) for spec in specs]
        return _CountedShards(shards, gpu, self.nodes.setdefault(step, Counter()))

    def map(self, step: str, fn: Callable, items: Iterable[tuple], *, search: bool = False, **shared) -> Iterator:
        """``fn(*item, **shared)`` for each item, results in item order."""
        nodes = self.nodes.setdefault(step, Counter())
        for item in items:
            nodes[_node()] += 1
            yield fn(*item, **shared)


def _on_node(step: str, fn, *args, **kwargs):
    """A task's body on its worker: ``fn``'s result with the id of the node that ran it and the BLAS kernel faiss
    runs there. Testing hook: ``RDISTILL_TASK_DELAY=step:seconds`` in the workers' environment slows that step's
    tasks down, so a test can remove a node while they run."""
    import ray

    from rdistill.blas import faiss_kernel

    delay(step)
    result = fn(*args, **kwargs)
    return ray.get_runtime_context().get_node_id(), _kernel(faiss_kernel), result


_KERNEL: list = []


def _kernel(probe) -> str | None:
    if not _KERNEL:
        _KERNEL.append(probe())
    return _KERNEL[0]


def _gpu_probe() -> str:
    import ray

    try:
        n = check_faiss_gpu()
    except RuntimeError as e:
        return f"error: {e}"
    return f"{n} GPU(s) seen by faiss on node {ray.get_runtime_context().get_node_id()}"


class RayExecutor:
    """Runs tasks as Ray tasks of ``num_cpus`` each; ``shared`` arguments go to the object store once."""

    name = "ray"

    def __init__(self, num_cpus: float = 1.0, window: int = 0, max_retries: int = 5, gpu: bool = False):
        import ray

        self.ray = ray
        self.num_cpus, self.max_retries, self.gpu = num_cpus, max_retries, gpu
        res = ray.cluster_resources()
        self.window = window or max(2, 2 * int(res.get("CPU", 1)))
        self.gpu_window = window or max(2, 2 * int(res.get("GPU", 0)))  # searching passes with cluster.gpu
        self.nodes: dict[str, Counter] = {}
        self.kernels: dict[str, str | None] = {}
        self._task = ray.remote(_on_node)

    def check_gpu(self) -> str:
        """For ``cluster.gpu``: the cluster must have GPUs and faiss on a GPU worker must see one (ConfigError
        before any work otherwise)."""
        ray = self.ray
        if ray.cluster_resources().get("GPU", 0) < 1:
            raise ConfigError("cluster.gpu is true but the Ray cluster has no GPUs")
        answer = ray.get(ray.remote(_gpu_probe).options(num_gpus=1, num_cpus=0).remote())
        if answer.startswith("error: "):
            raise ConfigError(f"cluster.gpu is true but on a GPU worker {answer[7:]}")
        return answer

    def shard_set(self, step: str, specs: list, loader, gpu: bool = False):
        """The k-means sample's shards on Ray actors (:class:`rdistill.engine.pool.RayShards`)."""
        from rdistill.engine.pool import RayShards

        shards = RayShards(step, specs, loader, gpu=gpu, nodes=self.nodes.setdefault(step, Counter()))
        self.kernels.update(shards.kernels)
        return shards

    def map(self, step: str, fn: Callable, items: Iterable[tuple], *, search: bool = False, **shared) -> Iterator:
        """Tasks in part order; ``search``: the step runs nearest-neighbour searches, on a GPU each with
        ``cluster.gpu``."""
        ray = self.ray
        refs = {k: ray.put(v) for k, v in shared.items()}
        # SPREAD: the parts of a pass go to every node, rather than to whichever node asked for work first
        gpus = 1 if search and self.gpu else 0
        window = self.gpu_window if gpus else self.window
        task = self._task.options(num_cpus=self.num_cpus, num_gpus=gpus, max_retries=self.max_retries,
                                  name=f"rdistill.{step}", scheduling_strategy="SPREAD")  # fmt: skip
        nodes = self.nodes.setdefault(step, Counter())
        pending: deque = deque()
        items = iter(items)
        done = False
        while True:
            while not done and len(pending) < window:
                item = next(items, None)
                if item is None:
                    done = True
                    break
                pending.append(task.remote(step, fn, *item, **refs))
            if not pending:
                return
            node, kernel, result = ray.get(pending.popleft())
            nodes[node] += 1
            self.kernels[node] = kernel
            yield result


def make_executor(cfg):
    """The ``executor`` config -> an executor. ``auto``: Ray when an address is given (``ray.address``, or
    ``RAY_ADDRESS``, which ``ray job submit`` sets), else local; ``ray`` joins that cluster or starts a local
    instance."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if cfg.executor == "local" or (cfg.executor == "auto" and not address):
        return LocalExecutor()
    from rdistill.ray.pools import init_ray

    init_ray(cfg.ray)
    return RayExecutor(gpu=cfg.cluster.gpu)
