"""The thin layer between the stages and Ray: joining or starting a cluster, sizing actor pools, and the
``map_batches`` arguments that changed across Ray releases (``compute=ActorPoolStrategy`` vs ``concurrency=``).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from dataclasses import dataclass

from rdistill.config import ConfigError, PoolConfig, RayConfig
from rdistill.errors import InputError, RunError

log = logging.getLogger(__name__)


def init_ray(rc: RayConfig) -> None:
    """Join the cluster at ``ray.address`` or ``RAY_ADDRESS`` (set under ``ray job submit``), else start a local
    instance. Ray Data keeps input order (parts complete one after another, so the driver's buffers stay small).
    """
    import ray

    if not ray.is_initialized():
        address = rc.address or os.environ.get("RAY_ADDRESS") or None
        kwargs = {"address": address} if address else {"num_cpus": rc.num_cpus or None, "include_dashboard": False}
        log.info("ray: %s", f"joining {address}" if address else "starting a local instance")
        ray.init(logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = rc.data_progress
    ctx.execution_options.preserve_order = True
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = rc.data_progress


@dataclass(frozen=True)
class PoolPlan:
    """A resolved actor pool: how many actors, on which device, reserving what."""

    actors: int
    device: str
    num_gpus: float
    num_cpus: float
    precision: str
    threads: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def plan_pool(pool: PoolConfig, section: str) -> PoolPlan:
    """Resolve ``pool`` against the running cluster's resources; ``section`` names the config key in errors."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    device = pool.device if pool.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if device == "cuda" and gpus == 0:
        raise ConfigError(f"{section}.pool.device: cuda, but the Ray cluster has no GPUs")
    num_gpus = pool.gpus_per_actor if device == "cuda" else 0.0
    if device == "cuda" and num_gpus <= 0:
        raise ConfigError(f"{section}.pool.gpus_per_actor: must be above 0 on cuda")
    if pool.actors:
        actors = pool.actors
    elif device == "cuda":
        actors = max(1, int(gpus // num_gpus))
    else:  # leave half the CPUs to the tasks that feed the pool: a pool holding every CPU starves its readers
        actors = max(1, int(cpus // 2 // max(pool.cpus_per_actor, 0.25)))
    if device == "cpu" and actors * pool.cpus_per_actor > cpus - 0.25:
        # Ray Data then has no CPU left for its own tasks and waits forever (seen with Ray 2.60)
        raise ConfigError(
            f"{section}.pool: {actors} actors x {pool.cpus_per_actor:g} CPUs take all {cpus:g} CPUs of the cluster; "
            f"lower {section}.pool.actors or {section}.pool.cpus_per_actor"
        )
    threads = max(1, math.ceil(pool.cpus_per_actor)) if device == "cpu" else 0
    return PoolPlan(actors, device, num_gpus, pool.cpus_per_actor, pool.precision, threads)


def actor_pool_args(plan: PoolPlan) -> dict:
    """``map_batches`` keyword arguments for a fixed-size pool of ``plan.actors`` actors on any Ray release."""
    import ray

    params = inspect.signature(ray.data.Dataset.map_batches).parameters
    if hasattr(ray.data, "ActorPoolStrategy") and "compute" in params:
        size = {"compute": ray.data.ActorPoolStrategy(size=plan.actors)}
    else:
        size = {"concurrency": plan.actors}
    return {**size, "num_gpus": plan.num_gpus, "num_cpus": plan.num_cpus}


def reader_task_args(num_cpus: float, plan: PoolPlan) -> dict:
    """``map_batches`` arguments for the CPU tasks that feed the actor pool of ``plan``, kept as separate tasks.

    Ray Data fuses a task stage into the next actor stage when their resource requests are equal, which makes
    each model actor decode its own input and ties decode parallelism to the pool size. Its documented way out
    (ray-project/ray#54433) is unequal requests: a reader request equal to the actors' is lowered by 0.1%.
    """
    if plan.num_gpus == 0 and num_cpus == plan.num_cpus and num_cpus > 0:
        num_cpus *= 0.999
    return {"num_cpus": num_cpus}


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def input_error_in(e: BaseException) -> str | None:
    """The message of the :class:`InputError` behind an exception raised through Ray tasks and actors, or
    ``None`` when it is no bad input (a bug, a lost node). Ray re-raises a task's error as an instance of its class
    when it can; an actor that died in ``__init__`` comes back as ``ActorDiedError`` whose text holds the
    original traceback, so that text is searched for an InputError's ``Name: message`` line."""
    import importlib
    import re

    for module in ("rdistill.io.shards", "rdistill.io.store", "rdistill.models.clip", "rdistill.models.unclip"):
        importlib.import_module(module)  # they define InputError's other subclasses: every name is known here

    names = "|".join(sorted({c.__name__ for c in _subclasses(InputError)} | {"InputError"}))

    line = re.compile(rf"^\s*(?:[\w.]+\.)?(?:{names}): (.+)$", re.M)
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, InputError):
            text = [t for t in str(e).strip().splitlines() if t.strip()]
            m = line.search(str(e))
            return m.group(1).strip() if m else (text[-1].strip() if text else type(e).__name__)
        found = line.findall(f"{e}\n{getattr(e, 'error_msg', '') or ''}")
        if found:
            return found[-1].strip()
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def start_pool(rc: RayConfig, pool: PoolConfig, section: str) -> PoolPlan:
    """Join or start Ray, then size the ``section`` stage's actor pool; a pool that cannot be is a RunError."""
    init_ray(rc)
    try:
        return plan_pool(pool, section)
    except ConfigError as e:
        raise RunError(str(e)) from None


def drain(ds, sink, stage: str) -> float:
    """Feed every output batch of ``ds`` (numpy format, in order) to ``sink``; returns the seconds it took. Bad
    input met in a task or actor (an :class:`InputError` there) becomes a RunError naming ``stage``; anything
    else is a bug and propagates with its traceback."""
    t0 = time.perf_counter()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            sink(batch)
    except InputError:
        raise
    except Exception as e:
        message = input_error_in(e)
        if message is None:
            raise
        raise RunError(f"{stage} stage failed: {message}") from e
    return time.perf_counter() - t0
