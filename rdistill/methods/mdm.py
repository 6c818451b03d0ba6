"""MDM, Multimodal Distribution Matching (Jeong, Kwon, Kim & Yoon, CVPR 2026; authors' code andyj1/mdm).

Three parts (poster and project page; ``distill_mdm.py`` of the authors' code):

1. **Data initialisation** (:func:`kmeans_init`): every real pair embedded as ``normalize([z_v, z_t])`` (the
   unit image and text features of the initial model, concatenated), k-means with ``k = M``, and per cluster the
   real pair nearest its centroid in cosine distance among the cluster's members (an empty cluster takes the
   nearest pair not yet chosen).
2. **Model initialisation** (:func:`merge_experts`): two expert checkpoints (random expert, random epoch) merged
   with the anchor (the freshly initialised student) tensor by tensor, Model-Stock style: with ``c`` the cosine of
   the two experts' displacements from the anchor and ``r = k c / ((k - 1) c + 1)`` (``k = 2``),
   ``w = w_0 + alpha * r * ((w_1 + w_2) / 2 - w_0)``. A new merged model every iteration.
3. **Matching** (:func:`mdm_loss`): agreement ``u = normalize(z_v + z_t)`` and discrepancy
   ``g = normalize(z_v - z_t)`` of real and synthetic pairs matched by the geodesic kernel energy
   (:func:`geodesic_kernel_energy`, kernel ``exp(-arccos(<a, b>)^2 / (2 sigma^2))``), plus the symmetric InfoNCE of
   the synthetic pairs::

       L = w_nce * InfoNCE(z_v^s, z_t^s) + w_agr * GKE(U_r, U_s) + w_dis * GKE(G_r, G_s)

Only the synthetic images and text vectors are optimised (SGD with momentum, gradient norm clipped); the model is
never trained here. Settings: :class:`MDMSettings` (config ``distill.mdm.*``); sources in ``docs/methods/mdm.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SHARED_KEYS = ("checkpoint_every", "log_every")  # distill.* fallbacks

EPS = 1e-12


@dataclass(frozen=True)
class MDMSettings:
    """The method's settings (authors' ``sh/distill.sh`` where it sets them, else ``distill_mdm.py``'s defaults)."""

    iterations: int = 3000
    lr_image: float = 1000.0
    lr_text: float = 1000.0
    momentum: float = 0.5
    grad_clip: float = 1.0  # max L2 norm of the (pixels, text) gradient, both together
    batch_real: int = 256
    batch_syn: int = 64  # synthetic pairs per iteration: min(batch_real, 64, M) in the authors' code
    w_nce: float = 1.0
    w_agr: float = 0.8
    w_dis: float = 0.8
    sigma_agr: float = 0.5
    sigma_dis: float = 0.5
    diversity_agr: float = 1.0  # weight of the synthetic-synthetic kernel term of the agreement energy
    diversity_dis: float = 1.0
    sqrt_energy: bool = True  # the energy as sqrt(MMD^2) (the paper's GKE), else MMD^2
    off_diagonal: bool = True  # within-set kernel means without the diagonal (the code), else with (the paper)
    temperature: float = 0.07
    merge_alpha: float = 0.5
    merge_k: float = 2.0
    min_start_epoch: int = 1
    max_start_epoch: int = 10
    anchor: str = "fixed"  # fixed: one fresh student per run is the anchor; fresh: a new one every iteration
    init: str = "kmeans"  # kmeans | given (ctx.init as the framework made it)
    kmeans_max_rows: int = 50_000  # k-means on at most this many real pairs (our bound on memory)
    kmeans_niter: int = 20
    feature_batch: int = 256
    checkpoint_every: int = 100
    log_every: int = 10

    @classmethod
    def from_config(cls, cfg) -> MDMSettings:
        """The ``distill.mdm`` section of a :class:`rdistill.config.Config` (same field names); fields it lacks
        keep the defaults here; ``checkpoint_every`` / ``log_every`` absent or 0 there take ``distill.*``'s."""
        from rdistill.methods.common import settings_from_config

        return settings_from_config(cls, cfg, "mdm", SHARED_KEYS)


# ------------------------------------------------------------------------------------------------------ the loss


def geodesic_kernel(a: torch.Tensor, b: torch.Tensor, sigma: float, eps: float = 1e-6) -> torch.Tensor:
    """``(m, d)``, ``(n, d)`` -> ``(m, n)``: ``exp(-phi^2 / (2 sigma^2))``, ``phi = arccos(<a, b>)`` of the unit rows
    (cosine clamped to ``[-1 + eps, 1 - eps]``, as the authors do, so that arccos has a finite gradient)."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    phi = torch.acos((a @ b.t()).clamp(-1.0 + eps, 1.0 - eps))
    return torch.exp(-phi * phi / (2.0 * sigma * sigma))


def _within_mean(k: torch.Tensor, off_diagonal: bool) -> torch.Tensor:
    n = k.shape[0]
    if off_diagonal and n > 1:
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
    return k.mean()


def geodesic_kernel_energy(
    real: torch.Tensor,
    syn: torch.Tensor,
    sigma: float,
    *,
    diversity: float = 1.0,
    off_diagonal: bool = True,
    sqrt: bool = True,
) -> torch.Tensor:
    """Geodesic kernel energy of unit rows ``real (n, d)`` and ``syn (m, d)``:
    ``diversity * mean k(s, s') + mean k(r, r') - 2 mean k(s, r)``, within-set means over ``i != j`` when
    ``off_diagonal``; its square root (clamped at 0, + 1e-12) when ``sqrt`` (the paper's GKE)."""
    mmd2 = (
        diversity * _within_mean(geodesic_kernel(syn, syn, sigma), off_diagonal)
        + _within_mean(geodesic_kernel(real, real, sigma), off_diagonal)
        - 2.0 * geodesic_kernel(syn, real, sigma).mean()
    )
    return torch.sqrt(mmd2.clamp(min=0.0) + EPS) if sqrt else mmd2


def info_nce(img: torch.Tensor, txt: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised ``(n, k)`` features."""
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = img @ txt.t() / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def mdm_loss(
    real_img: torch.Tensor, real_txt: torch.Tensor, syn_img: torch.Tensor, syn_txt: torch.Tensor, s: MDMSettings
) -> tuple[torch.Tensor, dict]:
    """The MDM objective on unit features ``z_v``, ``z_t``: real ``(n, k)``, synthetic ``(m, k)``.
    Returns ``(loss, {"nce", "agr", "dis"})`` (floats, unweighted)."""
    nce = info_nce(syn_img, syn_txt, s.temperature)
    u_r, u_s = F.normalize(real_img + real_txt, dim=1), F.normalize(syn_img + syn_txt, dim=1)
    g_r, g_s = F.normalize(real_img - real_txt, dim=1), F.normalize(syn_img - syn_txt, dim=1)
    kw = {"off_diagonal": s.off_diagonal, "sqrt": s.sqrt_energy}
    agr = geodesic_kernel_energy(u_r, u_s, s.sigma_agr, diversity=s.diversity_agr, **kw)
    dis = geodesic_kernel_energy(g_r, g_s, s.sigma_dis, diversity=s.diversity_dis, **kw)
    loss = s.w_nce * nce + s.w_agr * agr + s.w_dis * dis
    return loss, {"nce": nce.item(), "agr": agr.item(), "dis": dis.item()}


# --------------------------------------------------------------------------------------------- model merging


def merge_experts(w1: dict, w2: dict, w0: dict, alpha: float, k: float = 2.0) -> dict:
    """Merge two expert state dicts ``w1``, ``w2`` with the anchor ``w0`` (same keys, tensors): per floating tensor
    of matching shape, ``c = cos(w1 - w0, w2 - w0)`` (clamped to [-1, 1]), ``r = k c / ((k - 1) c + 1)`` and
    ``w0 + alpha r ((w1 + w2) / 2 - w0)``; other entries (integer buffers, mismatches) keep ``w0``'s."""
    out = {}
    for key, v0 in w0.items():
        v1, v2 = w1.get(key), w2.get(key)
        ok = all(torch.is_tensor(v) and v.is_floating_point() for v in (v0, v1, v2))
        if not ok or not (v0.shape == v1.shape == v2.shape):
            out[key] = v0
            continue
        v0f, v1f, v2f = v0.double(), v1.to(v0.device).double(), v2.to(v0.device).double()
        a, b = (v1f - v0f).reshape(-1), (v2f - v0f).reshape(-1)
        cos = (a @ b / (a.norm() * b.norm() + EPS)).clamp(-1.0, 1.0)
        ratio = k * cos / ((k - 1.0) * cos + 1.0 + EPS)
        out[key] = (v0f + alpha * ratio * (0.5 * (v1f + v2f) - v0f)).to(v0.dtype)
    return out


def pick_expert_pair(experts: list, s: MDMSettings, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """Two ``(expert, epoch)`` picks as the authors draw them: experts uniformly (may repeat), epochs uniformly in
    ``[min_start_epoch, max_start_epoch]`` clipped to the trajectories' length, the second epoch differing from the
    first when the expert repeats."""
    last = min(len(t) for t in experts) - 1
    lo = min(max(0, s.min_start_epoch), last)
    hi = max(lo, min(s.max_start_epoch, last))
    e1 = int(rng.integers(len(experts)))
    p1 = int(rng.integers(lo, hi + 1))
    e2 = int(rng.integers(len(experts)))
    pool = [p for p in range(lo, hi + 1) if not (e1 == e2 and p == p1)] or [p1]
    p2 = int(pool[int(rng.integers(len(pool)))])
    return (e1, p1), (e2, p2)


class _Student(torch.nn.Module):
    def __init__(self, image: torch.nn.Module, text: torch.nn.Module):
        super().__init__()
        self.image, self.text = image, text

    def forward(self, images: torch.Tensor, text: torch.Tensor):
        return F.normalize(self.image(images).float(), dim=1), F.normalize(self.text(text).float(), dim=1)


def fresh_anchor(ctx) -> dict:
    """The anchor of the merge: a freshly initialised student's ``{"image": sd, "text": sd}``."""
    return {"image": _copy(ctx.image_student().state_dict()), "text": _copy(ctx.text_head().state_dict())}


def _copy(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def merged_student(ctx, experts: list, s: MDMSettings, rng: np.random.Generator, anchor: dict | None = None):
    """A student whose weights are ``anchor`` (default: a fresh student) merged with two random expert checkpoints
    (:func:`merge_experts`); frozen, in eval mode."""
    image, text = ctx.image_student().to(ctx.device), ctx.text_head().to(ctx.device)
    if anchor is not None:
        image.load_state_dict(anchor["image"]), text.load_state_dict(anchor["text"])
    if experts:
        (e1, p1), (e2, p2) = pick_expert_pair(experts, s, rng)
        a, b = experts[e1][p1], experts[e2][p2]
        image.load_state_dict(merge_experts(a["image"], b["image"], image.state_dict(), s.merge_alpha, s.merge_k))
        text.load_state_dict(merge_experts(a["text"], b["text"], text.state_dict(), s.merge_alpha, s.merge_k))
    student = _Student(image, text).to(ctx.device).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student


# --------------------------------------------------------------------------------------------- initialisation


def pick_nearest(joint: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Per centroid, the row of unit ``joint (n, d)`` nearest it in cosine distance among the rows assigned to it
    (nearest centroid by Euclidean distance, as the k-means assigned them); an empty cluster takes the nearest row
    not chosen yet. ``(k,) int64`` row indices, distinct."""
    x = joint.astype(np.float32)
    c = centroids.astype(np.float32)
    d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    labels = d2.argmin(1)
    cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), EPS)
    cos = x @ cn.T  # rows of x are unit
    chosen = np.zeros(len(x), bool)
    picks = np.empty(len(c), np.int64)
    for j in range(len(c)):
        score = np.where(labels == j, cos[:, j], -np.inf)
        if not np.isfinite(score).any() or chosen[int(score.argmax())]:
            score = np.where(chosen, -np.inf, cos[:, j])
        picks[j] = int(score.argmax())
        chosen[picks[j]] = True
    return picks


@torch.no_grad()
def joint_features(student: _Student, images, text, rows: np.ndarray, pair_image, batch: int, device) -> np.ndarray:
    """``normalize([z_v, z_t])`` of the real pairs ``rows``: ``(len(rows), 2k) float32``."""
    out = []
    for i in range(0, len(rows), batch):
        idx = torch.from_numpy(rows[i : i + batch])
        zv, zt = student(images[pair_image[idx]].to(device), text[idx].to(device))
        out.append(F.normalize(torch.cat([zv, zt], dim=1), dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def kmeans_init(ctx, student: _Student, s: MDMSettings) -> np.ndarray:
    """Real pair indices (into ``ctx.real.text``) of the joint-space k-means initialisation, ``(M,) int64``."""
    from rdistill.algo.kmeans import fit_kmeans

    n, m = ctx.real.text.shape[0], ctx.num_pairs
    rng = np.random.default_rng(ctx.seed)
    rows = np.arange(n) if n <= s.kmeans_max_rows else np.sort(rng.choice(n, s.kmeans_max_rows, replace=False))
    joint = joint_features(
        student, ctx.real.images, ctx.real.text, rows, ctx.real.pair_image, s.feature_batch, ctx.device
    )
    centroids, stats = fit_kmeans(joint, m, niter=s.kmeans_niter, seed=int(ctx.seed))
    log.info("mdm: k-means on %d pairs, k=%d, SSE %.4g", len(rows), m, stats.sse_final)
    return rows[pick_nearest(joint, centroids)]


# ------------------------------------------------------------------------------------------------- the method


def run(ctx) -> object:
    """``python -m rdistill.distill --method mdm``: the distilled set."""
    return distill_mdm(ctx, MDMSettings.from_config(ctx.cfg))


def distill_mdm(ctx, settings: MDMSettings):
    """MDM on ``ctx`` (a :class:`rdistill.methods.common.MethodContext`): returns a ``Synthetic``. Resumes from
    ``ctx.load_checkpoint()``; checkpoints every ``checkpoint_every`` iterations (the RNG states with it)."""
    s = settings
    # the students' random inits draw from torch's global generator: seed it, so that a run does not depend on what
    # ran before it in the process (a resumed run gets the saved state back below)
    torch.manual_seed(int(ctx.seed))
    rng = np.random.default_rng([int(ctx.seed), 1])
    gen = torch.Generator().manual_seed(int(ctx.seed))
    experts = ctx.experts() if s.merge_alpha > 0 else []
    if not experts:
        log.warning("mdm: no expert trajectories; the anchor model is used unmerged")
    state = ctx.load_checkpoint()
    anchor = None
    if state is None:
        if s.anchor == "fixed":
            anchor = fresh_anchor(ctx)
        if s.init == "kmeans":
            student = merged_student(ctx, experts, s, rng, anchor)
            pairs = kmeans_init(ctx, student, s)
            images0 = ctx.real.images[ctx.real.pair_image[torch.from_numpy(pairs)]].float()
            text0 = ctx.real.text[torch.from_numpy(pairs)].float()
            captions = [ctx.real.captions[int(i)] for i in pairs]
            source = [int(i) for i in pairs]
        else:
            images0, text0 = ctx.init.images.float(), ctx.init.text.float()
            captions, source = list(ctx.init.captions), list(ctx.init.source_index)
        start = 0
    else:
        images0, text0, captions, source = state["images"], state["text"], state["captions"], state["source_index"]
        anchor, start = state["anchor"], int(state["iteration"])
    images = images0.detach().clone().to(ctx.device).requires_grad_(True)
    text = text0.detach().clone().to(ctx.device).requires_grad_(True)
    opt = torch.optim.SGD(
        [{"params": [images], "lr": s.lr_image}, {"params": [text], "lr": s.lr_text}],
        lr=s.lr_image,
        momentum=s.momentum,
    )
    if state is not None:
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        log.info("mdm: resuming after iteration %d of %d", start, s.iterations)
    m, n = images.shape[0], ctx.real.text.shape[0]
    loss = torch.zeros(())
    for it in range(start, s.iterations):
        student = merged_student(ctx, experts, s, rng, anchor)
        idx = torch.randperm(n, generator=gen)[: min(s.batch_real, n)]
        sel = torch.randperm(m, generator=gen)[: min(s.batch_syn, m)].to(ctx.device)
        with torch.no_grad():
            rv, rt = student(
                ctx.real.images[ctx.real.pair_image[idx]].to(ctx.device), ctx.real.text[idx].to(ctx.device)
            )
        sv, st = student(images[sel], text[sel])
        loss, parts = mdm_loss(rv, rt, sv, st, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([images, text], s.grad_clip)
        opt.step()
        done = it + 1
        if done % s.log_every == 0 or done == s.iterations:
            ctx.log(done, s.iterations, loss=loss.item(), **parts)
        if done % s.checkpoint_every == 0 and done < s.iterations:
            ctx.save_checkpoint(
                {
                    "iteration": done,
                    "images": images.detach().cpu(),
                    "text": text.detach().cpu(),
                    "captions": captions,
                    "source_index": source,
                    "anchor": anchor,
                    "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state,
                    "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                },
                done,
            )
    return dataclasses.replace(
        ctx.init,
        images=images.detach().cpu(),
        text=text.detach().cpu(),
        captions=captions,
        source_index=source,
        lr_image=None,
        lr_text=None,
        extra={
            "method": "mdm",
            "settings": dataclasses.asdict(s),
            "init": s.init,
            "reference": "Jeong, Kwon, Kim & Yoon, CVPR 2026; code andyj1/mdm@30b62d8",
            "final_loss": loss.item() if s.iterations > start else None,
        },
    )
