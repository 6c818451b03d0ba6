"""Trajectory matching for image-text pairs: MTT-VL, TESLA-VL and LoRS, one implementation.

MTT-VL (Wu et al., "Vision-Language Dataset Distillation", TMLR 2024, Algorithm 1): each iteration draws an expert
trajectory and a start epoch ``s < T+``, starts a student at the expert's parameters ``theta*_s`` (image backbone and
text head, two flat vectors), trains it for ``R`` SGD steps on mini-batches of the synthetic pairs (symmetric
InfoNCE, paper eq. 4) with a learnable learning rate per branch, and matches the result to the expert at
``s + expert_epochs`` with the normalised distance (eq. 5)::

    L = ||theta_R^img - theta*_{s+E}^img||^2 / ||theta*_s^img - theta*_{s+E}^img||^2 + (the same for the text head)

Its gradients go into the synthetic pixels, the synthetic text vectors and the two learning rates.

TESLA (Cui et al., ICML 2023) computes the same gradients with activation memory constant in ``R``
(``memory_saving``): the unroll runs once without a graph, keeping only the ``R + 1`` flat parameter vectors, then
the steps are replayed one at a time in reverse, each with its own graph, carrying the adjoint
``lambda_i = dL/dtheta_i`` (reverse-mode through the unroll: ``lambda_i = lambda_{i+1} - lr * H_i lambda_{i+1}``, a
Hessian-vector product from the same double backward that gives the step's data gradient). ``first_order`` drops
the Hessian term (``lambda_i = lambda_N``), which is what the LoRS code computes (``distill_tesla_lors.py``: the
student's steps use detached gradients); its gradients then differ from MTT's. TESLA-VL is LoRS without the
similarity matrix (as the LoRS paper runs it).

LoRS (Xu et al., "Low-Rank Similarity Mining for Multimodal Dataset Distillation", ICML 2024) also learns the
students' soft labels: a similarity matrix ``S = diag(a) + L R^T alpha / rank`` (``a = 1``, ``L ~ N(0, 1)``,
``R = 0`` at the start, so ``S = I``), the students' loss on a batch being the weighted BCE of the logits against
``S`` restricted to the batch (:func:`rdistill.eval.train.soft_label_loss`). The evaluation harness trains students
on a LoRS set with the same loss.

The unrolled student is the real one called through ``torch.func.functional_call`` on the flat parameter vectors
(:class:`FlatParams`). Every step draws its dropout masks from its own seed, so the memory-saving replay sees the
same student as the forward pass (the full and the memory-saving gradients are equal, not just close in mean).
Settings: ``distill.mtt_vl`` / ``distill.tesla_vl`` / ``distill.lors`` (:func:`resolve_settings`; sources in
``docs/methods/*.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rdistill.errors import RunError
from rdistill.eval.train import soft_label_loss

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ the published settings
BUDGETS = (100, 200, 500)
# LoRS's sh/distill_{flickr,coco}_lors_{100,200,500}.sh (silicx/LoRS_Distill @ 8a712af), per budget
LORS_PRESETS = {
    "flickr30k": {
        100: dict(lr_image=100.0, lr_text=100.0, sim_rank=10, sim_alpha=3.0, lr_sim=10.0, mini_batch=20,
                  max_start_epoch=2),
        200: dict(lr_image=1000.0, lr_text=1000.0, sim_rank=5, sim_alpha=1.0, lr_sim=10.0, mini_batch=20,
                  max_start_epoch=2),
        500: dict(lr_image=1000.0, lr_text=1000.0, sim_rank=20, sim_alpha=0.01, lr_sim=100.0, mini_batch=40,
                  max_start_epoch=3),
    },
    "coco": {
        100: dict(lr_image=1000.0, lr_text=1000.0, sim_rank=10, sim_alpha=1.0, lr_sim=5.0, mini_batch=20,
                  max_start_epoch=2, merge=True),
        200: dict(lr_image=1000.0, lr_text=1000.0, sim_rank=20, sim_alpha=1.0, lr_sim=50.0, mini_batch=20,
                  max_start_epoch=2, merge=True, iterations=2000),
        500: dict(lr_image=5000.0, lr_text=5000.0, sim_rank=40, sim_alpha=1.0, lr_sim=500.0, mini_batch=30,
                  max_start_epoch=2, merge=True, temperature=0.1),
    },
}  # fmt: skip
# MTT-VL README (princetonvisualai/multimodal_dataset_distillation @ c696fd6, the one command it gives, any budget)
MTT_VL = dict(iterations=50_000, syn_steps=8, expert_epochs=1, max_start_epoch=2, mini_batch=100, lr_image=1000.0,
              lr_text=1000.0, sampling="fresh", merge=False, temperature=0.07)  # fmt: skip
LORS_COMMON = dict(iterations=3000, syn_steps=8, expert_epochs=1, sampling="walk", merge=False, temperature=0.07)


def budget_of(num_pairs: int) -> int:
    """The published budget whose settings apply to ``num_pairs``: 100 up to 100 pairs, 200 up to 200, else 500."""
    return next((b for b in BUDGETS if num_pairs <= b), BUDGETS[-1])


@dataclass(frozen=True)
class TrajectorySettings:
    """Resolved settings (no 0 left meaning "the default")."""

    method: str
    iterations: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    mini_batch: int
    lr_image: float
    lr_text: float
    lr_lr: float
    lr_init_image: float
    lr_init_text: float
    momentum: float
    momentum_lr: float
    temperature: float
    merge_branches: bool
    sampling: str
    memory_saving: bool
    first_order: bool
    checkpoint_every: int
    log_every: int
    soft_labels: bool = False
    sim_type: str = "lowrank"
    sim_rank: int = 0
    sim_alpha: float = 0.0
    lr_sim: float = 0.0
    momentum_sim: float = 0.5
    loss: str = "infonce"


def resolve_settings(cfg, method: str, num_pairs: int) -> TrajectorySettings:
    """``distill.<method>`` of ``cfg`` with its 0 / auto values replaced by the published ones for
    ``distill.preset`` at ``num_pairs`` pairs (MTT-VL: its README's command; TESLA-VL and LoRS: LoRS's scripts)."""
    d = cfg.distill
    sec = getattr(d, method.replace("-", "_"))
    if method == "mtt-vl":
        pub = dict(MTT_VL)
    else:
        pub = {**LORS_COMMON, **LORS_PRESETS[d.preset][budget_of(num_pairs)]}
    lors = method == "lors"

    def pick(name, default_key=None):
        v = getattr(sec, name)
        return v if v else pub[default_key or name]

    merge = {"auto": pub["merge"] if "merge" in pub else False, "true": True, "false": False}[sec.merge_branches]
    s = TrajectorySettings(
        method=method,
        iterations=pick("iterations"),
        syn_steps=pick("syn_steps"),
        expert_epochs=pick("expert_epochs"),
        max_start_epoch=pick("max_start_epoch"),
        mini_batch=min(pick("mini_batch"), num_pairs),
        lr_image=pick("lr_image"),
        lr_text=pick("lr_text"),
        lr_lr=sec.lr_lr,
        lr_init_image=sec.lr_init_image,
        lr_init_text=sec.lr_init_text,
        momentum=sec.momentum,
        momentum_lr=sec.momentum_lr,
        temperature=pick("temperature"),
        merge_branches=merge,
        sampling=pub["sampling"] if sec.sampling == "auto" else sec.sampling,
        memory_saving=sec.memory_saving,
        first_order=sec.first_order,
        checkpoint_every=sec.checkpoint_every or d.checkpoint_every,
        log_every=d.log_every,
    )
    if lors:
        s = dataclasses.replace(
            s,
            soft_labels=True,
            sim_type=sec.sim_type,
            sim_rank=sec.sim_rank or pub["sim_rank"],
            sim_alpha=sec.sim_alpha or pub["sim_alpha"],
            lr_sim=sec.lr_sim or pub["lr_sim"],
            momentum_sim=sec.momentum_sim,
            loss=sec.loss,
        )
    if s.first_order and not s.memory_saving:
        raise RunError(f"distill.{method.replace('-', '_')}.first_order needs memory_saving (a mode of the replay)")
    if s.mini_batch < 2:
        raise RunError(f"distill.{method.replace('-', '_')}.mini_batch: a contrastive step needs at least 2 pairs")
    return s


# ------------------------------------------------------------------------------------------- the unrolled student


class FlatParams:
    """A module's trainable parameters as one flat vector (the order of ``named_parameters``), and the module
    called on such a vector through ``torch.func.functional_call`` (its buffers as given, or its own)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        self.buffers = dict(module.named_buffers())

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, state: dict, device=None) -> torch.Tensor:
        """``state`` (a state dict, e.g. an expert's epoch) -> ``(size,) float32``."""
        return torch.cat([state[n].reshape(-1) for n in self.names]).to(device or "cpu")

    def set_buffers(self, state: dict, device=None) -> None:
        self.buffers = {n: state[n].to(device or "cpu") for n in self.buffer_names if n in state}

    def unflatten(self, flat: torch.Tensor) -> dict:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, {**self.unflatten(flat), **self.buffers}, (x,))


@contextmanager
def _seeded(seed: int, device: str):
    """Torch's global RNG (dropout) seeded for one student step, restored after; attention through the math kernel
    (the fused CPU kernels have no double backward, which the unroll needs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), sdpa_kernel([SDPBackend.MATH]):
        torch.manual_seed(int(seed))
        yield


@dataclass
class MatchResult:
    """``loss``: the normalised distance; ``leaf_grads``: dL/d leaf for each leaf (None where unused);
    ``lr_grads``: dL/d lr per branch; ``parts``: the per-branch distances (floats)."""

    loss: float
    leaf_grads: list
    lr_grads: list
    parts: dict


def _objective(final: Sequence[torch.Tensor], target: Sequence[torch.Tensor], dist: Sequence[torch.Tensor],
               merge: bool):  # fmt: skip
    sq = [(f - t).pow(2).sum() for f, t in zip(final, target)]
    if merge:
        return sum(sq) / sum(dist), sq
    return sum(q / d for q, d in zip(sq, dist)), sq


def match_trajectory(
    step_loss: Callable[[int, list], torch.Tensor],
    start: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    lrs: Sequence[torch.Tensor],
    leaves: Sequence[torch.Tensor],
    num_steps: int,
    *,
    step_seeds: Sequence[int],
    memory_saving: bool = False,
    first_order: bool = False,
    merge: bool = False,
    device: str = "cpu",
) -> MatchResult:
    """The trajectory-matching loss of ``num_steps`` student steps and its gradients.

    ``step_loss(i, params)``: the student's loss at step ``i`` on its mini-batch, ``params`` one flat vector per
    branch (image, text), differentiable in the ``leaves`` (synthetic pixels, text, similarity parameters) it reads.
    Step ``i`` updates ``params_b -= lrs[b] * grad_b``. ``start`` / ``target``: the expert's flat vectors at the
    start and target epochs. The loss is ``sum_b ||theta_R^b - target^b||^2 / ||start^b - target^b||^2`` (``merge``:
    one ratio of sums). Without ``memory_saving`` the whole unroll is one graph (MTT); with it the steps are
    replayed in reverse one graph at a time (TESLA), exactly or, with ``first_order``, without the Hessian terms."""
    dtype = start[0].dtype
    start = [s.detach().to(device) for s in start]
    target = [t.detach().to(device=device, dtype=dtype) for t in target]
    dist = [(s - t).pow(2).sum() for s, t in zip(start, target)]
    if first_order and not memory_saving:
        raise ValueError("first_order is a mode of the memory-saving replay (set memory_saving too)")
    if not memory_saving:
        lr = [torch.as_tensor(x, dtype=dtype, device=device).detach().clone().requires_grad_(True) for x in lrs]
        cur = [s.clone().requires_grad_(True) for s in start]
        for i in range(num_steps):
            with _seeded(step_seeds[i], device):
                loss_i = step_loss(i, cur)
            grads = torch.autograd.grad(loss_i, cur, create_graph=True)
            cur = [c - rate * g for c, rate, g in zip(cur, lr, grads)]
        loss, sq = _objective(cur, target, dist, merge)
        out = torch.autograd.grad(loss, list(leaves) + lr, allow_unused=True)
        leaf_grads = list(out[: len(leaves)])
        lr_grads = [g if g is not None else torch.zeros((), dtype=dtype, device=device) for g in out[len(leaves) :]]
        return MatchResult(float(loss.detach()), leaf_grads, [g.detach() for g in lr_grads], _parts(sq, dist))

    lr = [torch.as_tensor(x, dtype=dtype, device=device).detach() for x in lrs]
    thetas = [start]
    for i in range(num_steps):  # forward without a graph: only the parameter vectors are kept
        params = [t.detach().requires_grad_(True) for t in thetas[-1]]
        with _seeded(step_seeds[i], device):
            loss_i = step_loss(i, params)
        grads = torch.autograd.grad(loss_i, params)
        thetas.append([(p - rate * g).detach() for p, rate, g in zip(params, lr, grads)])
    final = [t.clone().requires_grad_(True) for t in thetas[-1]]
    loss, sq = _objective(final, target, dist, merge)
    lam = list(torch.autograd.grad(loss, final))
    leaf_grads: list = [None] * len(leaves)
    lr_grads = [torch.zeros((), dtype=dtype, device=device) for _ in lr]
    for i in reversed(range(num_steps)):
        params = [t.detach().requires_grad_(True) for t in thetas[i]]
        with _seeded(step_seeds[i], device):
            loss_i = step_loss(i, params)
        grads = torch.autograd.grad(loss_i, params, create_graph=True)
        dots = [(la * g).sum() for la, g in zip(lam, grads)]
        for b, dot in enumerate(dots):
            lr_grads[b] = lr_grads[b] - dot.detach()  # dtheta_{i+1}/dlr_b = -g_i^b
        s = sum(rate * dot for rate, dot in zip(lr, dots))
        out = torch.autograd.grad(s, params + list(leaves), allow_unused=True)
        for j, g in enumerate(out[len(params) :]):
            if g is not None:
                leaf_grads[j] = -g if leaf_grads[j] is None else leaf_grads[j] - g
        if not first_order:
            lam = [la - g.detach() for la, g in zip(lam, out[: len(params)])]
        thetas[i + 1] = None  # free what the replay no longer needs
    return MatchResult(float(loss.detach()), leaf_grads, lr_grads, _parts(sq, dist))


def _parts(sq, dist) -> dict:
    if len(sq) != 2:
        return {}
    return {"dist_image": float(sq[0].detach() / dist[0]), "dist_text": float(sq[1].detach() / dist[1])}


# --------------------------------------------------------------------------------------------- LoRS's soft labels


class SimilarityMatrix(torch.nn.Module):
    """LoRS's learnable similarity labels (``src/similarity_mining.py``): ``lowrank``:
    ``S = diag(a) + L R^T alpha / rank`` with ``a = 1``, ``L ~ N(0, 1)``, ``R = 0`` at the start; ``full``: an
    ``(M, M)`` matrix from the identity. :meth:`batch` is ``S[idx][:, idx]`` from the rows ``idx`` alone."""

    def __init__(self, m: int, kind: str = "lowrank", rank: int = 10, alpha: float = 1.0,
                 generator: torch.Generator | None = None):  # fmt: skip
        super().__init__()
        self.kind, self.rank, self.alpha = kind, int(rank), float(alpha)
        if kind == "lowrank":
            self.diag = torch.nn.Parameter(torch.ones(m))
            self.left = torch.nn.Parameter(torch.randn(m, self.rank, generator=generator))
            self.right = torch.nn.Parameter(torch.zeros(m, self.rank))
        else:
            self.full = torch.nn.Parameter(torch.eye(m))

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.kind == "lowrank":
            return torch.diag(self.diag[idx]) + self.left[idx] @ self.right[idx].t() * (self.alpha / self.rank)
        return self.full[idx][:, idx]

    def matrix(self) -> torch.Tensor:
        return self.batch(torch.arange(self.diag.shape[0] if self.kind == "lowrank" else self.full.shape[0]))


# ------------------------------------------------------------------------------------------------------ the method


def _batches(m: int, size: int, steps: int, sampling: str, gen: torch.Generator) -> list[torch.Tensor]:
    """Mini-batch indices of ``steps`` student steps: ``fresh`` (MTT-VL ``distill.py``: the first ``size`` of a new
    permutation each step) or ``walk`` (LoRS: consecutive chunks of one permutation, a new one when it runs out)."""
    out = []
    if sampling == "fresh":
        for _ in range(steps):
            out.append(torch.randperm(m, generator=gen)[:size])
        return out
    perm, pos = torch.randperm(m, generator=gen), 0
    for _ in range(steps):
        if pos + size > m:
            perm, pos = torch.randperm(m, generator=gen), 0
        out.append(perm[pos : pos + size])
        pos += size
    return out


def student_loss(logits: torch.Tensor, soft: torch.Tensor | None, kind: str) -> torch.Tensor:
    """InfoNCE (MTT-VL eq. 4) on ``(b, b)`` logits, or LoRS's loss against the soft labels ``soft (b, b)``."""
    if soft is None:
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    return soft_label_loss(logits, soft, kind)


def distill_trajectory(ctx, s: TrajectorySettings):
    """Trajectory matching on ``ctx`` (:class:`rdistill.methods.common.MethodContext`) with settings ``s``;
    returns the optimised :class:`rdistill.methods.common.Synthetic`. Resumes from ``ctx.load_checkpoint()``."""
    from rdistill.methods.common import Synthetic

    device = ctx.device
    experts = ctx.experts()
    if not experts:
        raise RunError("no expert trajectories (distill.experts.num_experts)")
    epochs_avail = len(experts[0]) - 1
    key = f"distill.{s.method.replace('-', '_')}"
    if s.max_start_epoch - 1 + s.expert_epochs > epochs_avail:
        raise RunError(
            f"{key}: max_start_epoch {s.max_start_epoch} + expert_epochs {s.expert_epochs} needs experts of at "
            f"least {s.max_start_epoch - 1 + s.expert_epochs} epochs, they have {epochs_avail} "
            "(distill.experts.epochs)"
        )
    gen = torch.Generator().manual_seed(ctx.seed)
    image_model = ctx.image_student().to(device).train()
    head = ctx.text_head().to(device).train()
    for p in [*image_model.parameters(), *head.parameters()]:
        p.requires_grad_(False)  # the unrolled student's parameters are the flat vectors, never these
    f_img, f_txt = FlatParams(image_model), FlatParams(head)
    images = ctx.init.images.detach().clone().float().to(device).requires_grad_(True)
    text = ctx.init.text.detach().clone().float().to(device).requires_grad_(True)
    lr_img = torch.tensor(float(s.lr_init_image), device=device).requires_grad_(True)
    lr_txt = torch.tensor(float(s.lr_init_text), device=device).requires_grad_(True)
    m = images.shape[0]
    sim = None
    groups = [
        {"params": [images], "lr": s.lr_image, "momentum": s.momentum},
        {"params": [text], "lr": s.lr_text, "momentum": s.momentum},
        {"params": [lr_img, lr_txt], "lr": s.lr_lr, "momentum": s.momentum_lr},
    ]
    if s.soft_labels:
        sim = SimilarityMatrix(m, s.sim_type, s.sim_rank, s.sim_alpha, generator=gen).to(device)
        groups.append({"params": list(sim.parameters()), "lr": s.lr_sim, "momentum": s.momentum_sim})
    opt = torch.optim.SGD(groups, lr=0.0)
    start_it = 0
    state = ctx.load_checkpoint()
    if state is not None:
        with torch.no_grad():
            images.copy_(state["images"].to(device))
            text.copy_(state["text"].to(device))
            lr_img.copy_(state["lr_image"])
            lr_txt.copy_(state["lr_text"])
            if sim is not None:
                sim.load_state_dict(state["sim"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start_it = int(state["iteration"])
    leaves = [images, text] + (list(sim.parameters()) if sim is not None else [])
    losses = []
    for it in range(start_it, s.iterations):
        k = int(torch.randint(len(experts), (1,), generator=gen))
        start_ep = int(torch.randint(s.max_start_epoch, (1,), generator=gen))
        traj = experts[k]
        f_img.set_buffers(traj[start_ep]["image"], device)
        f_txt.set_buffers(traj[start_ep]["text"], device)
        start = [f_img.flatten(traj[start_ep]["image"], device), f_txt.flatten(traj[start_ep]["text"], device)]
        tgt = traj[start_ep + s.expert_epochs]
        target = [f_img.flatten(tgt["image"], device), f_txt.flatten(tgt["text"], device)]
        batches = [b.to(device) for b in _batches(m, s.mini_batch, s.syn_steps, s.sampling, gen)]
        seeds = torch.randint(2**31 - 1, (s.syn_steps,), generator=gen).tolist()

        def step_loss(i: int, params: list, batches=batches) -> torch.Tensor:
            idx = batches[i]
            fi = F.normalize(f_img(params[0], images[idx]).float(), dim=1)
            ft = F.normalize(f_txt(params[1], text[idx]).float(), dim=1)
            logits = fi @ ft.t() / s.temperature
            return student_loss(logits, sim.batch(idx) if sim is not None else None, s.loss)

        res = match_trajectory(
            step_loss, start, target, [lr_img, lr_txt], leaves, s.syn_steps, step_seeds=seeds,
            memory_saving=s.memory_saving, first_order=s.first_order, merge=s.merge_branches, device=device,
        )  # fmt: skip
        if not math.isfinite(res.loss):
            raise RunError(
                f"{s.method}: the matching loss became {res.loss} at iteration {it + 1}; lower {key}.lr_image / "
                "lr_text / lr_lr"
            )
        opt.zero_grad(set_to_none=True)
        for leaf, g in zip(leaves, res.leaf_grads):
            leaf.grad = None if g is None else g.detach()
        lr_img.grad, lr_txt.grad = res.lr_grads[0].detach(), res.lr_grads[1].detach()
        opt.step()
        losses.append(res.loss)
        done = it + 1
        if done % s.log_every == 0 or done == s.iterations or done == start_it + 1:
            ctx.log(done, s.iterations, loss=res.loss, lr_image=float(lr_img.detach()), lr_text=float(lr_txt.detach()),
                    start_epoch=start_ep, **res.parts)  # fmt: skip
        if done % s.checkpoint_every == 0 and done < s.iterations:
            ctx.save_checkpoint(
                {
                    "iteration": done,
                    "images": images.detach().cpu(),
                    "text": text.detach().cpu(),
                    "lr_image": lr_img.detach().cpu(),
                    "lr_text": lr_txt.detach().cpu(),
                    "sim": None if sim is None else {k: v.cpu() for k, v in sim.state_dict().items()},
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                },
                done,
            )
    soft = None if sim is None else sim.matrix().detach().cpu().float()
    return Synthetic(
        images=images.detach().cpu(),
        text=text.detach().cpu(),
        captions=list(ctx.init.captions),
        source_index=list(ctx.init.source_index),
        lr_image=float(lr_img.detach()),
        lr_text=float(lr_txt.detach()),
        soft_labels=soft,
        extra={
            "method": s.method,
            "settings": dataclasses.asdict(s),
            "final_loss": losses[-1] if losses else None,
            "soft_label_loss": s.loss if s.soft_labels else None,
            "temperature": s.temperature,
            "initial_lrs": [s.lr_init_image, s.lr_init_text],
        },
    )


def run_mtt(ctx):
    """``--method mtt-vl``."""
    return distill_trajectory(ctx, resolve_settings(ctx.cfg, "mtt-vl", ctx.num_pairs))


def run_tesla(ctx):
    """``--method tesla-vl``: LoRS's settings without the similarity matrix, the constant-memory unroll."""
    return distill_trajectory(ctx, resolve_settings(ctx.cfg, "tesla-vl", ctx.num_pairs))


def run_lors(ctx):
    """``--method lors``."""
    return distill_trajectory(ctx, resolve_settings(ctx.cfg, "lors", ctx.num_pairs))
