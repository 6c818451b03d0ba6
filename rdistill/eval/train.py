"""One evaluation run: train a student CLIP on a distilled set, evaluating retrieval recall along the way. No Ray.

The loop is the authors' ``evaluate_synset_with_similarity`` (junhyeok9712/PDS ``src/epoch.py``):

* passes ``0 .. E`` (``E + 1`` of them) over the set; each pass is ``ceil(n / batch)`` batches, each the first
  ``batch`` of a fresh random permutation (the reference's ``SimilarityDataloader``);
* symmetric InfoNCE on L2-normalised image features and projected text features at a fixed temperature;
* SGD (momentum, weight decay) with one learning rate for the image backbone and one for the text head, both
  multiplied by ``decay_factor`` from pass ``decay_epoch`` on (the reference's ``MultiStepLR``);
* after passes ``0, eval_every, ..., E``: IR/TR@1/5/10 on the val and test splits (:mod:`rdistill.algo.recall`).

A set with learned similarity labels (LoRS: ``data["soft_labels"] (n, n)``, ``TrainSettings.soft_labels`` the loss)
trains with :func:`soft_label_loss` of each batch's logits against the labels' batch submatrix instead of InfoNCE,
as LoRS's ``evaluate_synset_with_similarity`` does. Training images are ``(n, S, S, 3) uint8`` (normalised here) or
a distilled set's optimised ``(n, 3, S, S) float32`` tensors, already normalised (:func:`model_input`).

Unlike the reference, the epoch is not chosen here: the run returns its whole curve, and
:func:`rdistill.eval.table.select_epoch` picks an epoch from the val numbers (or, on request, the test numbers).

Data-parallel (``comm`` with ``world > 1``, as under Ray Train): every rank draws the same global batch from the
same seeded generator and embeds its contiguous slice of the images; the image features are gathered, so each
rank computes the InfoNCE loss over the *whole* global batch (negatives from every worker). The text head runs on
the whole batch on every rank (same dropout masks as one worker). Image-backbone gradients are summed over the
ranks (each holds the gradient through its own slice), head gradients averaged (they are the same on every rank).
So ``W`` workers compute the loss and the update of one worker at the same global batch, up to float rounding.

With a frozen image backbone (``image_trainable`` false, the reference code's default) the image features of the
training and evaluation images are computed once and the loop trains the text head only.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from rdistill.algo.recall import recall_from_features
from rdistill.models.students import StudentSpec, build_image_model, normalize_images, projection_head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """The protocol's optimisation settings, resolved (no zeros meaning "default" left)."""

    epochs: int = 100
    eval_every: int = 10
    batch_size: int = 128
    lr_image: float = 0.2
    lr_text: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_epoch: int = 51
    decay_factor: float = 0.1
    temperature: float = 0.07
    head_dropout: float = 0.1
    image_trainable: bool = True
    eval_batch_size: int = 256
    soft_labels: str = ""  # the loss on a set's learned similarity labels (LoRS: wbce); "": InfoNCE on pairs

    def eval_epochs(self) -> list[int]:
        return sorted(set(range(0, self.epochs + 1, self.eval_every)) | {self.epochs})


@dataclass(frozen=True)
class RunJob:
    """One run of the table: a set, a student, a seed, where and how wide it runs."""

    run_id: str
    set_name: str
    student: StudentSpec
    settings: TrainSettings
    seed: int
    run: int = 0
    workers: int = 1
    device: str = "cpu"
    threads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Comm:
    """The collectives a data-parallel run needs, over ``torch.distributed`` (Ray Train sets the group up)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def gather(self, x):
        """``(n_r, ...)`` on each rank (``n_r`` may differ by rank) -> list of the ranks' tensors, in rank order."""
        import torch
        import torch.distributed as dist

        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        top = int(max(s.item() for s in sizes))
        pad = torch.zeros((top - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        buf = [torch.empty((top, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(self.world)]
        dist.all_gather(buf, torch.cat([x, pad]))
        return [b[: int(s.item())] for b, s in zip(buf, sizes)]

    def all_reduce_(self, tensors, average: bool) -> None:
        """Sum (or average) a list of same-dtype tensors over the ranks in place, as one flat buffer."""
        import torch
        import torch.distributed as dist

        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        if average:
            flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def model_input(images: np.ndarray, rows, device: str):
    """The student's input for ``images[rows]``: ``(n, S, S, 3) uint8`` images are CLIP-normalised here; float
    images (a distilled set's optimised pixels, ``(n, 3, S, S) float32``) are already in that space."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images[rows])).to(device)
    return normalize_images(x) if x.dtype == torch.uint8 else x.float()


def soft_label_loss(logits, soft, kind: str = "wbce"):
    """The students' loss against learned similarity labels (LoRS, ``MultilabelContrastiveLoss`` of
    silicx/LoRS_Distill ``src/similarity_mining.py:91``): ``logits (b, b)`` (cosine / temperature), ``soft (b, b)`` the
    similarity matrix restricted to the batch. ``wbce``: binary cross-entropy of ``sigmoid(logits)`` against the
    labels, averaged separately over the positive (label > 0.5) and the negative entries, then the mean of the two;
    ``bce``: plain mean BCE; ``infonce``: the symmetric cross-entropy against the label rows (not renormalised, as
    LoRS's "InfoNCE" option)."""
    import torch

    soft = soft.to(logits.dtype)
    if kind in ("wbce", "bce"):
        p = torch.sigmoid(logits)
        per = -soft * torch.log(p + 1e-6) - (1 - soft) * torch.log(1 - p + 1e-6)  # the authors' eps
        if kind == "bce":
            return per.mean()
        pos = (soft > 0.5).detach()
        loss_pos = torch.where(pos, per, torch.zeros_like(per)).sum() / (pos.sum() + 1e-6)
        loss_neg = torch.where(~pos, per, torch.zeros_like(per)).sum() / ((~pos).sum() + 1e-6)
        return (loss_pos + loss_neg) / 2
    if kind == "infonce":
        li = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
        lt = -(soft.t() * torch.log_softmax(logits.t(), 1)).sum(1).mean()
        return (li + lt) / 2
    raise ValueError(f"unknown soft-label loss {kind!r} (wbce, bce, infonce)")


def _encode_images(model, images: np.ndarray, rows: np.ndarray, batch: int, device: str):
    """Image features of ``images[rows]`` in eval mode, ``(len(rows), dim) float32`` torch on ``device``."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            out.append(model(model_input(images, rows[i : i + batch], device)).float())
    if not out:
        return torch.zeros((0, 1), device=device)
    return torch.cat(out)


def _split_rows(n: int, comm: Comm | None) -> np.ndarray:
    if comm is None or comm.world == 1:
        return np.arange(n)
    return np.array_split(np.arange(n), comm.world)[comm.rank]


def _all_image_features(model, images, batch, device, comm):
    """Every image's features, the rows spread over the ranks and gathered (eval mode)."""
    import torch

    local = _encode_images(model, images, _split_rows(len(images), comm), batch, device)
    if comm is None or comm.world == 1:
        return local
    return torch.cat(comm.gather(local.contiguous()))


def info_nce(img_feat, txt_feat, temperature: float):
    """Symmetric InfoNCE of ``(b, d)`` image and text features (normalised here), matched by row; a scalar."""
    import torch
    import torch.nn.functional as F

    img = F.normalize(img_feat, dim=1)
    txt = F.normalize(txt_feat, dim=1)
    logits = (img @ txt.t()) / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def train_run(job: RunJob, data: dict, comm: Comm | None = None) -> dict:
    """Train ``job.student`` on ``data`` and evaluate it along the way.

    ``data``: ``train_images (n_img, S, S, 3) uint8``, ``pair_image (n,) int64`` (the image of each pair),
    ``train_text (n, d) float32`` (the text features the head takes), and ``eval``: ``{split: {"images" (m, S, S, 3)
    uint8, "text" (t, d) float32, "txt2img" (t,) int64}}``. Returns the run's record: ``curve`` (per evaluated pass:
    mean training loss, ``val`` and ``test`` recalls), per-pass ``losses``, timings and the job.

    On CPU with ``job.threads`` > 0 torch runs this many threads during the run; the caller's setting is restored
    after it (the local executor runs in the driver)."""
    import torch

    if not (job.threads > 0 and job.device == "cpu"):
        return _train_run(job, data, comm)
    before = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _train_run(job, data, comm)
    finally:
        torch.set_num_threads(before)


def _train_run(job: RunJob, data: dict, comm: Comm | None) -> dict:
    import torch

    s = job.settings
    torch.manual_seed(job.seed)
    rng = np.random.default_rng(job.seed)
    device = job.device
    started, t_start, c_start = time.time(), time.perf_counter(), time.process_time()
    model, dim = build_image_model(job.student)
    text = torch.from_numpy(np.array(data["train_text"], dtype=np.float32)).to(device)
    head = projection_head(text.shape[1], dim, s.head_dropout).to(device)
    model = model.to(device)
    images, pair_image = data["train_images"], np.asarray(data["pair_image"], np.int64)
    soft = None
    if s.soft_labels:
        if data.get("soft_labels") is None:
            raise ValueError(f"{job.run_id}: settings ask for soft labels ({s.soft_labels}) but the data has none")
        soft = torch.from_numpy(np.asarray(data["soft_labels"], dtype=np.float32)).to(device)
    n = len(pair_image)
    world = 1 if comm is None else comm.world
    frozen_train = frozen_eval = None
    t_feat = 0.0
    c_train = c_eval = 0.0
    if not s.image_trainable:
        t0 = time.perf_counter()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        frozen_train = _all_image_features(model, images, s.eval_batch_size, device, comm)
        frozen_eval = {
            k: _all_image_features(model, v["images"], s.eval_batch_size, device, comm)
            for k, v in data["eval"].items()
        }
        t_feat = time.perf_counter() - t0
    image_params = [p for p in model.parameters() if p.requires_grad]
    head_params = list(head.parameters())
    groups = [{"params": head_params, "lr": s.lr_text, "base": s.lr_text}]
    if image_params:
        groups.insert(0, {"params": image_params, "lr": s.lr_image, "base": s.lr_image})
    opt = torch.optim.SGD(groups, lr=0.0, momentum=s.momentum, weight_decay=s.weight_decay)
    evals, curve, losses = set(s.eval_epochs()), [], []
    t_train = t_eval = 0.0
    batches = math.ceil(n / s.batch_size)
    for ep in range(s.epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        factor = s.decay_factor if ep >= s.decay_epoch else 1.0
        for g in opt.param_groups:
            g["lr"] = g["base"] * factor
        head.train()
        if s.image_trainable:
            model.train()
        total, count = 0.0, 0
        for _ in range(batches):
            ids = rng.permutation(n)[: s.batch_size]
            if frozen_train is not None:
                img = frozen_train[torch.from_numpy(pair_image[ids]).to(device)]
            else:
                mine = np.array_split(ids, world)[0 if comm is None else comm.rank]
                local = model(model_input(images, pair_image[mine], device)).float()
                if world > 1:
                    parts = comm.gather(local.detach().contiguous())
                    parts[comm.rank] = local  # the gradient flows through this rank's own slice only
                    img = torch.cat(parts)
                else:
                    img = local
            txt = head(text[torch.from_numpy(ids).to(device)])
            if soft is not None:
                sel = torch.from_numpy(ids).to(device)
                img_n = torch.nn.functional.normalize(img, dim=1)
                txt_n = torch.nn.functional.normalize(txt, dim=1)
                loss = soft_label_loss(img_n @ txt_n.t() / s.temperature, soft[sel][:, sel], s.soft_labels)
            else:
                loss = info_nce(img, txt, s.temperature)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if world > 1:
                comm.all_reduce_([p.grad for p in image_params if p.grad is not None], average=False)
                comm.all_reduce_([p.grad for p in head_params if p.grad is not None], average=True)
            opt.step()
            total += float(loss.detach()) * len(ids)
            count += len(ids)
        losses.append(total / max(count, 1))
        t_train += time.perf_counter() - t0
        c_train += time.process_time() - c0
        if ep in evals:
            t0, c0 = time.perf_counter(), time.process_time()
            point = {"epoch": ep, "loss": losses[-1]}
            model.eval()
            head.eval()
            with torch.no_grad():
                for split, ev in data["eval"].items():
                    if frozen_eval is not None:
                        img = frozen_eval[split]
                    else:
                        img = _all_image_features(model, ev["images"], s.eval_batch_size, device, comm)
                    txt = head(torch.from_numpy(np.array(ev["text"], dtype=np.float32)).to(device))
                    img = torch.nn.functional.normalize(img, dim=1)
                    txt = torch.nn.functional.normalize(txt, dim=1)
                    point[split] = recall_from_features(img, txt, ev["txt2img"])
            curve.append(point)
            t_eval += time.perf_counter() - t0
            c_eval += time.process_time() - c0
            log.info(
                "%s pass %d: loss %.4f%s",
                job.run_id,
                ep,
                losses[-1],
                "".join(f", {k} r_mean {point[k]['r_mean']:.2f}" for k in data["eval"]),
            )
    return {
        "run_id": job.run_id,
        "set": job.set_name,
        "student": job.student.name,
        "seed": job.seed,
        "run": job.run,
        "workers": world,
        "device": device,
        "image_dim": dim,
        "started": started,
        "curve": curve,
        "losses": losses,
        "seconds": {
            "total": round(time.perf_counter() - t_start, 3),
            "train": round(t_train, 3),
            "eval": round(t_eval, 3),
            "frozen_features": round(t_feat, 3),
        },
        # CPU seconds of this process (all its threads): what the run costs on a machine shared with others
        "cpu_seconds": {
            "total": round(time.process_time() - c_start, 3),
            "train": round(c_train, 3),
            "eval": round(c_eval, 3),
        },
        "job": job.to_dict(),
    }
