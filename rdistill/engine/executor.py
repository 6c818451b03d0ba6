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

log = logging.getLogger(__name__)


def _node() -> str:
    return f"local:{socket.gethostname()}"


class LocalExecutor:
    """Runs tasks one after another in this process."""

    name = "local"

    def __init__(self):
        self.nodes: dict[str, Counter] = {}

    def map(self, step: str, fn: Callable, items: Iterable[tuple], **shared) -> Iterator:
        """``fn(*item, **shared)`` for each item, results in item order."""
        nodes = self.nodes.setdefault(step, Counter())
        for item in items:
            nodes[_node()] += 1
            yield fn(*item, **shared)


DELAY_ENV = "RDISTILL_TASK_DELAY"


def _on_node(step: str, fn, *args, **kwargs):
    """A task's body on its worker: ``fn``'s result with the id of the node that ran it. Testing hook:
    ``RDISTILL_TASK_DELAY=step:seconds`` in the workers' environment slows that step's tasks down, so a test can
    remove a node while they run."""
    import time

    import ray

    spec = os.environ.get(DELAY_ENV, "")
    if spec.rpartition(":")[0] == step:
        time.sleep(float(spec.rpartition(":")[2]))
    return ray.get_runtime_context().get_node_id(), fn(*args, **kwargs)


class RayExecutor:
    """Runs tasks as Ray tasks of ``num_cpus`` each; ``shared`` arguments go to the object store once."""

    name = "ray"

    def __init__(self, num_cpus: float = 1.0, window: int = 0, max_retries: int = 5):
        import ray

        self.ray = ray
        self.num_cpus, self.max_retries = num_cpus, max_retries
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = window or max(2, 2 * cpus)
        self.nodes: dict[str, Counter] = {}
        self._task = ray.remote(_on_node)

    def map(self, step: str, fn: Callable, items: Iterable[tuple], **shared) -> Iterator:
        ray = self.ray
        refs = {k: ray.put(v) for k, v in shared.items()}
        # SPREAD: the parts of a pass go to every node, rather than to whichever node asked for work first
        task = self._task.options(num_cpus=self.num_cpus, max_retries=self.max_retries, name=f"rdistill.{step}",
                                  scheduling_strategy="SPREAD")  # fmt: skip
        nodes = self.nodes.setdefault(step, Counter())
        pending: deque = deque()
        items = iter(items)
        done = False
        while True:
            while not done and len(pending) < self.window:
                item = next(items, None)
                if item is None:
                    done = True
                    break
                pending.append(task.remote(step, fn, *item, **refs))
            if not pending:
                return
            node, result = ray.get(pending.popleft())
            nodes[node] += 1
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
    return RayExecutor()
