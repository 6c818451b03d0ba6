"""Expert trajectories: students trained on the full real data, their parameters saved after every epoch.

The protocol is the authors' ``buffer.py`` (MTT-VL and LoRS, identical there): a fresh student (the image model of
``distill.student`` with its pretrained weights, a fresh text head), symmetric InfoNCE at temperature 0.07, SGD
(lr 0.1 for the image backbone and for the text head, no momentum, no weight decay, no lr decay), batches of 128
real pairs, a new random permutation each epoch, 10 epochs, 20 experts. The authors also augment the real images
(resize/crop/flip/RandAugment); we train on the pre-resized images without augmentation (our choice: the
distillation matches un-augmented student steps too).

On disk (shared storage, reused by every distillation that asks for the same experts)::

    EXPERTS_DIR/<key>/experts.json       what they are: data fingerprint, student, text space, settings, seed
    EXPERTS_DIR/<key>/expert_000.pt      torch.save({"epochs": [{"image": state_dict, "text": state_dict}, ...],
                                                     "expert": 0, "seed": ..., "losses": [...]})
                                         epochs[0] is the initialisation, epochs[e] the parameters after epoch e

``<key>`` is a digest of ``experts.json``'s content, so other data, another student or other settings get another
directory, and asking for more experts than exist trains only the missing ones. Each file is written atomically
(a temporary name, then rename), so a killed training leaves whole files only, and a rerun trains the rest.
Experts are loaded memory-mapped (``torch.load(mmap=True)``): the trajectories of a big student stay on disk until
read.

Several experts train in parallel as Ray Train runs (one ``TorchTrainer`` per expert, launched from Ray tasks as
:mod:`rdistill.eval.runner` launches the evaluation runs) when the executor is ``ray``; else one after another here.
Each expert's randomness comes from its own seed, so the result does not depend on the executor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rdistill.errors import RunError
from rdistill.io.outputs import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

RECORD = "experts.json"
FORMAT = 1


@dataclass(frozen=True)
class ExpertSettings:
    num_experts: int = 20
    epochs: int = 10
    batch_size: int = 128
    lr_image: float = 0.1
    lr_text: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    temperature: float = 0.07

    @classmethod
    def from_config(cls, ec) -> ExpertSettings:
        return cls(**{k: getattr(ec, k) for k in asdict(cls())})


def default_experts_dir(configured: str) -> Path:
    """``distill.experts_dir``, else ``$RDISTILL_EXPERTS_DIR``, else ``~/.cache/rdistill/experts``."""
    if configured:
        return Path(configured)
    env = os.environ.get("RDISTILL_EXPERTS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rdistill" / "experts"


def expert_seed(seed: int, k: int) -> int:
    """The seed of expert ``k``: independent of how many experts are asked for and where they train."""
    return int(np.random.SeedSequence([int(seed), 7, int(k)]).generate_state(1)[0] % (2**31 - 1))


def experts_key(record: dict) -> str:
    """The directory name of the experts ``record`` describes (its digest, without ``num_experts``)."""
    core = {k: v for k, v in record.items() if k not in ("num_experts", "format")}
    core["settings"] = {k: v for k, v in record["settings"].items() if k != "num_experts"}
    return hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=10).hexdigest()


def info_nce(img: torch.Tensor, txt: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows ``(b, k)`` (normalised here): MTT-VL eq. 4 with a temperature."""
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = img @ txt.t() / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train_expert(build_image, build_head, data: dict, settings: ExpertSettings, seed: int, device: str = "cpu"):
    """One expert. ``build_image()`` / ``build_head()`` make a fresh image student and text head (random parts from
    torch's global generator, seeded here); ``data``: ``images (n_img, 3, S, S) float32``, ``text (n, d) float32``,
    ``pair_image (n,) int64``. Returns ``(epochs, losses)``: ``epochs[e]`` = ``{"image": sd, "text": sd}`` after
    epoch ``e`` (0: the initialisation), ``losses[e - 1]`` the mean training loss of epoch ``e``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    image, head = build_image().to(device), build_head().to(device)
    opt = torch.optim.SGD(
        [{"params": list(image.parameters()), "lr": settings.lr_image},
         {"params": list(head.parameters()), "lr": settings.lr_text}],
        lr=settings.lr_text, momentum=settings.momentum, weight_decay=settings.weight_decay,
    )  # fmt: skip
    images, text, pair_image = data["images"], data["text"], data["pair_image"]
    n = int(pair_image.shape[0])
    epochs = [{"image": _state(image), "text": _state(head)}]
    losses = []
    for _ in range(settings.epochs):
        image.train(), head.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for b in range(math.ceil(n / settings.batch_size)):
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            if len(idx) < 2:
                continue  # InfoNCE needs a negative
            x = images[pair_image[idx]].to(device)
            loss = info_nce(image(x).float(), head(text[idx].to(device)).float(), settings.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
        epochs.append({"image": _state(image), "text": _state(head)})
    return epochs, losses


def _save_expert(path: Path, k: int, seed: int, epochs: list, losses: list) -> None:
    with atomic_path(path) as tmp:
        torch.save({"epochs": epochs, "expert": k, "seed": seed, "losses": losses}, tmp)


def expert_path(root: Path, k: int) -> Path:
    return Path(root) / f"expert_{k:03d}.pt"


def load_experts(root: Path, count: int) -> list[list[dict]]:
    """The first ``count`` trajectories in ``root``, memory-mapped."""
    out = []
    for k in range(count):
        path = expert_path(root, k)
        try:
            doc = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # a damaged file on shared storage: name it
            raise RunError(f"{path}: cannot read this expert trajectory ({e}); delete it to retrain it") from None
        out.append(doc["epochs"])
    return out


class ExpertJob:
    """What a worker needs to train expert ``k`` (picklable: the student is rebuilt from its spec)."""

    def __init__(self, k: int, seed: int, spec, text_dim: int, head_dropout: float, settings, path: str, device: str,
                 threads: int = 0):  # fmt: skip
        self.k, self.seed, self.spec, self.text_dim = k, seed, spec, text_dim
        self.head_dropout, self.settings, self.path, self.device, self.threads = (
            head_dropout,
            settings,
            path,
            device,
            threads,
        )

    def run(self, data: dict, device: str | None = None) -> None:
        from rdistill.models.students import build_image_model, projection_head

        dim = {}

        def build_image():
            model, dim["out"] = build_image_model(self.spec)
            return model

        def build_head():
            return projection_head(self.text_dim, dim["out"], self.head_dropout)

        before = torch.get_num_threads()
        if self.threads > 0 and (device or self.device) == "cpu":
            torch.set_num_threads(self.threads)
        try:
            epochs, losses = train_expert(
                build_image, build_head, data, self.settings, self.seed, device or self.device
            )
        finally:
            torch.set_num_threads(before)
        _save_expert(Path(self.path), self.k, self.seed, epochs, losses)
        log.info("expert %d: %d epochs, losses %s", self.k, len(losses), ", ".join(f"{x:.3f}" for x in losses))


def _worker_loop(config: dict) -> None:
    """The Ray Train worker of one expert."""
    import ray
    import ray.train

    job: ExpertJob = config["job"]
    device = job.device
    if device == "cuda":
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    job.run(ray.get(config["data"][0]), device)
    ray.train.report({"expert": job.k})


def _fit(job: ExpertJob, data_ref: list, storage: str, cpus: float, gpus: float) -> int:
    """A Ray task: one expert's TorchTrainer, started and waited for."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus}
    if job.device == "cuda":
        resources["GPU"] = gpus
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "data": data_ref},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=job.device == "cuda", resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage, name=f"expert-{job.k:03d}-{Path(job.path).parent.name}",
                             failure_config=FailureConfig(max_failures=0)),
    )  # fmt: skip
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return job.k


def _train_ray(jobs: list[ExpertJob], data: dict, storage: Path, cpus: float, gpus: float) -> None:
    import ray

    from rdistill.errors import InputError
    from rdistill.ray.pools import input_error_in

    ref = ray.put(data)
    fit = ray.remote(num_cpus=0, max_retries=0)(_fit)
    storage.mkdir(parents=True, exist_ok=True)
    pending = {fit.remote(j, [ref], str(storage.resolve()), cpus, gpus): j for j in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            ray.get(ready[0])
        except InputError:
            raise
        except Exception as e:
            message = input_error_in(e)
            for r in pending:
                ray.cancel(r)
            if message is None:
                raise
            raise RunError(f"expert {job.k} failed: {message}") from e
        log.info("expert %d done (%d to go)", job.k, len(pending))


def load_or_train_experts(
    experts_dir: str | Path,
    record: dict,
    data: dict,
    spec,
    *,
    text_dim: int,
    head_dropout: float,
    settings: ExpertSettings,
    seed: int,
    executor: str = "local",
    device: str = "cpu",
    cpus_per_expert: float = 1.0,
    gpus_per_expert: float = 1.0,
) -> tuple[list[list[dict]], dict]:
    """The ``settings.num_experts`` trajectories described by ``record`` (data fingerprint, student, text space,
    settings, seed: the ``experts.json`` content), from ``experts_dir/<key>/`` when there, else trained (only the
    missing ones) and saved there. ``data`` as :func:`train_expert` takes it. Returns ``(trajectories, info)``,
    ``info``: the directory, how many were trained now and how many reused."""
    root = Path(experts_dir) / experts_key(record)
    root.mkdir(parents=True, exist_ok=True)
    rec_path = root / RECORD
    previous = None
    if rec_path.exists():
        try:
            previous = json.loads(rec_path.read_text())
        except ValueError:
            previous = None
        if previous is not None and experts_key(previous) != experts_key(record):
            raise RunError(f"{rec_path} describes other experts than its directory name says: remove {root}")
    have = int((previous or {}).get("num_experts", 0))
    atomic_write_json(rec_path, {**record, "format": FORMAT, "num_experts": max(settings.num_experts, have)})
    missing = [k for k in range(settings.num_experts) if not expert_path(root, k).exists()]
    threads = max(1, int(cpus_per_expert)) if device == "cpu" else 0
    jobs = [
        ExpertJob(k, expert_seed(seed, k), spec, text_dim, head_dropout, settings, str(expert_path(root, k)), device,
                  threads)
        for k in missing
    ]  # fmt: skip
    if jobs:
        log.info("experts: training %d of %d into %s (%s)", len(jobs), settings.num_experts, root, executor)
        if executor == "ray":
            _train_ray(jobs, data, root / "_ray", cpus_per_expert, gpus_per_expert)
        else:
            for job in jobs:
                job.run(data)
    else:
        log.info("experts: reusing %d trajectories in %s", settings.num_experts, root)
    info = {"dir": str(root), "trained": len(jobs), "reused": settings.num_experts - len(jobs),
            "num_experts": settings.num_experts}  # fmt: skip
    return load_experts(root, settings.num_experts), info
