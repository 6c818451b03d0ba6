"""Where the runs of a table train: in this process one after another, or as Ray Train runs over the cluster.

* ``local``: :func:`rdistill.eval.train.train_run` in the driver, world size 1.
* ``ray``: every run is a Ray Train ``TorchTrainer`` (``workers`` data-parallel workers, on GPU when the job
  says so); the runs of a table are Ray tasks that each start and wait for their trainer, all submitted at once,
  so they run in parallel as far as the cluster's resources allow (Ray Train V2 runs trainers side by side from
  tasks). The tasks reserve no CPU themselves: the trainers' workers do. The arrays of each set and of the eval
  splits go into the object store once and every worker of every run reads them from there.

Each run's record is written by its rank 0 to ``runs_dir/RUN_ID.json`` (atomically): it is what the driver reads,
and a rerun skips the runs whose record exists. With the ``ray`` executor ``runs_dir`` must be on storage every
node can reach, as the output of the prototype engine's Ray executor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rdistill.errors import RunError
from rdistill.eval.train import Comm, RunJob, train_run
from rdistill.io.outputs import atomic_write_json

log = logging.getLogger(__name__)


def _record_path(runs_dir: Path, job: RunJob) -> Path:
    return Path(runs_dir) / f"{job.run_id}.json"


def _defining(job: dict) -> dict:
    # where and how wide a run trained (workers, device, threads) does not change what it computes; nor does the
    # set's display name, which the run id (naming the set by its path) does not depend on
    return {k: v for k, v in job.items() if k not in ("workers", "device", "threads", "set_name")}


def load_done(runs_dir: Path, jobs: list[RunJob]) -> dict[str, dict]:
    """Records of the ``jobs`` already finished in ``runs_dir`` (same run id, student, settings and seed; workers,
    device, threads and the set's display name may differ), by run id."""
    done = {}
    for job in jobs:
        path = _record_path(runs_dir, job)
        if path.exists():
            try:
                rec = json.loads(path.read_text())
            except ValueError:
                continue
            if _defining(rec.get("job") or {}) == _defining(json.loads(json.dumps(job.to_dict()))):
                done[job.run_id] = rec
    return done


def run_local(
    jobs: list[RunJob],
    sets: dict[str, dict],
    evals: dict[str, dict],
    eval_of: dict[str, str],
    runs_dir: Path,
    on_done=None,
) -> dict[str, dict]:
    """Train ``jobs`` one after another in this process. ``sets[job.set_name]`` holds the run's training arrays,
    ``evals[eval_of[job.set_name]]`` its eval splits (see :func:`train_run`). Returns the records by run id."""
    out = {}
    for job in jobs:
        rec = train_run(job, {**sets[job.set_name], "eval": evals[eval_of[job.set_name]]})
        atomic_write_json(_record_path(runs_dir, job), rec)
        out[job.run_id] = rec
        if on_done:
            on_done(rec)
    return out


def _worker_loop(config: dict) -> None:
    """The Ray Train worker: fetch the data, train, rank 0 writes the record."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job: RunJob = config["job"]
    if job.device == "cuda":
        import dataclasses

        import ray.train.torch

        job = dataclasses.replace(job, device=str(ray.train.torch.get_device()))
    train, evals = ray.get(config["data"])
    rec = train_run(job, {**train, "eval": evals}, Comm(rank, world) if world > 1 else None)
    if rank == 0:
        atomic_write_json(config["record"], rec)
    ray.train.report({"r_mean_last": rec["curve"][-1]["test"]["r_mean"] if rec["curve"] else 0.0})


def _fit(job: RunJob, data_ref: list, record: str, storage: str, cpus: float, gpus: float) -> dict:
    """A Ray task: start this run's TorchTrainer, wait for it, return its record."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus}
    if job.device == "cuda":
        resources["GPU"] = gpus
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "data": data_ref, "record": record},
        scaling_config=ScalingConfig(
            num_workers=job.workers, use_gpu=job.device == "cuda", resources_per_worker=resources
        ),
        run_config=RunConfig(storage_path=storage, name=job.run_id, failure_config=FailureConfig(max_failures=0)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads(Path(record).read_text())


def run_ray(
    jobs: list[RunJob],
    sets: dict[str, dict],
    evals: dict[str, dict],
    eval_of: dict[str, str],
    runs_dir: Path,
    storage: Path,
    cpus_per_worker: float,
    gpus_per_worker: float,
    on_done=None,
) -> dict[str, dict]:
    """Train ``jobs`` as Ray Train runs in parallel over the cluster (Ray must be initialised); arguments as
    :func:`run_local`. Bad input met in a worker (an :class:`InputError` there) becomes a :class:`RunError` naming
    the run."""
    import ray

    from rdistill.errors import InputError
    from rdistill.ray.pools import input_error_in

    used = {j.set_name for j in jobs}
    set_refs = {name: ray.put(d) for name, d in sets.items() if name in used}
    eval_refs = {key: ray.put(d) for key, d in evals.items() if key in {eval_of[n] for n in used}}
    fit = ray.remote(num_cpus=0, max_retries=0)(_fit)
    storage.mkdir(parents=True, exist_ok=True)
    pending = {
        fit.remote(
            job,
            [set_refs[job.set_name], eval_refs[eval_of[job.set_name]]],
            str(_record_path(runs_dir, job)),
            str(storage.resolve()),
            cpus_per_worker,
            gpus_per_worker,
        ): job
        for job in jobs
    }
    out = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            rec = ray.get(ready[0])
        except InputError:
            raise
        except Exception as e:
            message = input_error_in(e)
            for ref in pending:
                ray.cancel(ref)
            if message is None:
                raise
            raise RunError(f"evaluation run {job.run_id} failed: {message}") from e
        out[job.run_id] = rec
        if on_done:
            on_done(rec)
    return out
