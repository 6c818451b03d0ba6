"""CovMatch (Lee & Chung, NeurIPS 2025, arXiv 2510.18583): cross-covariance matching with a trainable text encoder.

The loss (paper eq. 11-12) on a real batch ``T`` and a synthetic batch ``S``::

    L = || rho * C_T - C_S ||_F^2 + lam * (L_feat^v + L_feat^l)
    C_X = cross-covariance of the encoders' image and text features over X (before the projections)
    L_feat^m = || mean_T G_m f_m(x) - mean_S G_m f_m(x_hat) ||^2          (m = v, l; G_m linear projections)

The cross-covariance is what a linear contrastive loss over linear projections ``G_v, G_l`` of fixed encoder
features sees: its optimum on ``S`` is ``G_v^T G_l = C_S / rho``, and the real-data loss at that optimum is matched
by aligning ``C_S`` with ``rho C_T`` (paper section 3). With in-batch negatives that matrix is
``sum_i x_i y_i^T / n - sum_{i != j} x_i y_j^T / (n (n - 1))``, which is exactly the unbiased sample
cross-covariance ``sum_i (x_i - x_bar)(y_i - y_bar)^T / (n - 1)``: :func:`cross_covariance`.

The model is trained alongside the data (paper Algorithm 1): after each update of ``S``, one contrastive step of the
encoders and projections on the real batch (the "online model"); every ``reset_every`` iterations the encoders go
back to their initial weights and the projections are drawn afresh.

Here the encoders are the harness's student (:mod:`rdistill.models.students`): the image model, and the trainable
text head on the frozen text features of ``ctx.text_space`` (the authors fine-tune BERT itself; our students keep
the text encoder frozen and train the head, the harness's protocol). The synthetic text is a vector in that text
space. Settings: :class:`CovMatchSettings` (config ``distill.covmatch.*``); sources in ``docs/methods/covmatch.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SHARED_KEYS = ("checkpoint_every", "log_every", "preset")  # distill.* fallbacks

# Paper 4.1 / appendix (as the summaries we could read report them): rho, lam and the iteration count by budget.
PAPER_RHO = ((100, 2.0), (None, 1.0))  # (max pairs, value): rho = 2 at 100 pairs, 1 from 200 on
PAPER_FEAT_WEIGHT = {  # lam = 0.1 at 100 / 200 pairs; at 500: 0.6 (Flickr30K), 0.5 (COCO)
    "flickr30k": ((200, 0.1), (None, 0.6)),
    "coco": ((200, 0.1), (None, 0.5)),
}
PAPER_ITERATIONS = ((200, 10_000), (None, 20_000))  # 10k iterations, 20k at 500 pairs


def _by_budget(table, num_pairs: int):
    for limit, value in table:
        if limit is None or num_pairs <= limit:
            return value
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CovMatchSettings:
    """The method's settings; 0 (or a negative ``feat_weight``) means "the paper's value for this budget"."""

    iterations: int = 0  # 0: 10,000 (20,000 at > 200 pairs)
    rho: float = 0.0  # scale of the real cross-covariance; 0: 2 at <= 100 pairs, else 1
    feat_weight: float = -1.0  # lam; < 0: 0.1 up to 200 pairs, else 0.6 (flickr30k) / 0.5 (coco)
    lr_image: float = 1.0  # SGD lr of the synthetic pixels (paper: 1.0)
    lr_text: float = 1.0  # SGD lr of the synthetic text vectors (paper: 1.0)
    momentum: float = 0.5  # SGD momentum of the synthetic data (paper: 0.5)
    batch_real: int = 256  # real pairs per iteration (our choice; paper ablates 64..1024)
    batch_syn: int = 0  # synthetic pairs per iteration; 0: all of them
    reset_every: int = 50  # online model back to its initial weights every this many iterations (paper: 50)
    projection_dim: int = 2304  # width of the linear projections G_v, G_l (paper default 2304)
    normalize_features: bool = False  # L2-normalise encoder features before the statistics (not in the paper)
    model_lr_image: float = 0.01  # online model: SGD lr of the image encoder (paper's evaluation setting)
    model_lr_text: float = 0.1  # online model: SGD lr of the text head and the projections (idem)
    model_momentum: float = 0.9
    model_weight_decay: float = 5e-4
    temperature: float = 0.07  # InfoNCE of the online model's step
    checkpoint_every: int = 100  # iterations between checkpoints
    log_every: int = 10
    preset: str = "flickr30k"  # whose per-budget values fill the zeros: flickr30k | coco (distill.preset)

    @classmethod
    def from_config(cls, cfg) -> CovMatchSettings:
        """The ``distill.covmatch`` section of a :class:`rdistill.config.Config` (same field names); fields it lacks
        keep the defaults here; ``checkpoint_every`` / ``log_every`` absent or 0 there take ``distill.*``'s, and
        ``preset`` is ``distill.preset``."""
        from rdistill.methods.common import settings_from_config

        return settings_from_config(cls, cfg, "covmatch", SHARED_KEYS)

    def resolved(self, num_pairs: int) -> CovMatchSettings:
        """Budget-dependent zeros replaced by the paper's values for ``num_pairs``."""
        return dataclasses.replace(
            self,
            iterations=self.iterations or _by_budget(PAPER_ITERATIONS, num_pairs),
            rho=self.rho or _by_budget(PAPER_RHO, num_pairs),
            feat_weight=self.feat_weight
            if self.feat_weight >= 0
            else _by_budget(PAPER_FEAT_WEIGHT[self.preset], num_pairs),
        )


# ------------------------------------------------------------------------------------------------------ the loss


def cross_covariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased sample cross-covariance of paired rows: ``x (n, p)``, ``y (n, q)`` -> ``(p, q)``,
    ``sum_i (x_i - x_bar)(y_i - y_bar)^T / (n - 1)`` (n >= 2)."""
    n = x.shape[0]
    if n < 2 or y.shape[0] != n:
        raise ValueError(f"cross-covariance needs >= 2 paired rows, got {x.shape[0]} and {y.shape[0]}")
    xc = x - x.mean(dim=0, keepdim=True)
    yc = y - y.mean(dim=0, keepdim=True)
    return xc.t() @ yc / (n - 1)


def covmatch_loss(
    real_img: torch.Tensor,
    real_txt: torch.Tensor,
    syn_img: torch.Tensor,
    syn_txt: torch.Tensor,
    proj_image: torch.nn.Module,
    proj_text: torch.nn.Module,
    rho: float,
    feat_weight: float,
) -> tuple[torch.Tensor, dict]:
    """Paper eq. 11-12 on encoder features: real ``(n, p)`` / ``(n, q)``, synthetic ``(m, p)`` / ``(m, q)``;
    ``proj_image`` / ``proj_text`` are the linear projections ``G_v``, ``G_l`` of the feature terms.
    Returns ``(loss, {"cov": ..., "feat_image": ..., "feat_text": ...})`` (floats)."""
    c_real = cross_covariance(real_img, real_txt)
    c_syn = cross_covariance(syn_img, syn_txt)
    l_cov = (rho * c_real - c_syn).pow(2).sum()
    l_feat_v = (proj_image(real_img).mean(0) - proj_image(syn_img).mean(0)).pow(2).sum()
    l_feat_l = (proj_text(real_txt).mean(0) - proj_text(syn_txt).mean(0)).pow(2).sum()
    loss = l_cov + feat_weight * (l_feat_v + l_feat_l)
    parts = {"cov": l_cov.item(), "feat_image": l_feat_v.item(), "feat_text": l_feat_l.item()}
    return loss, parts


def info_nce(img: torch.Tensor, txt: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised ``(n, k)`` features (the students' loss)."""
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = img @ txt.t() / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# ------------------------------------------------------------------------------------------------- the method


class _OnlineModel(torch.nn.Module):
    """Encoders (image student, text head) and the linear projections ``G_v``, ``G_l`` of the distillation."""

    def __init__(self, image: torch.nn.Module, text: torch.nn.Module, dim_image: int, dim_text: int, width: int):
        super().__init__()
        self.image, self.text = image, text
        self.proj_image = torch.nn.Linear(dim_image, width, bias=False)
        self.proj_text = torch.nn.Linear(dim_text, width, bias=False)

    def features(self, images: torch.Tensor, text: torch.Tensor, normalize: bool):
        fi, ft = self.image(images).float(), self.text(text).float()
        if normalize:
            fi, ft = F.normalize(fi, dim=1), F.normalize(ft, dim=1)
        return fi, ft


def _feature_dims(ctx, image: torch.nn.Module, text: torch.nn.Module) -> tuple[int, int]:
    with torch.no_grad():
        x = ctx.real.images[:2].to(ctx.device)
        t = ctx.real.text[:2].to(ctx.device)
        was = image.training, text.training
        image.eval(), text.eval()
        dims = int(image(x).shape[1]), int(text(t).shape[1])
        image.train(was[0]), text.train(was[1])
    return dims


def _fresh_model(ctx, s: CovMatchSettings) -> tuple[_OnlineModel, torch.optim.Optimizer]:
    image, text = ctx.image_student().to(ctx.device), ctx.text_head().to(ctx.device)
    dim_image, dim_text = _feature_dims(ctx, image, text)
    model = _OnlineModel(image, text, dim_image, dim_text, s.projection_dim).to(ctx.device)
    groups = [
        {"params": list(model.image.parameters()), "lr": s.model_lr_image},
        {
            "params": [*model.text.parameters(), *model.proj_image.parameters(), *model.proj_text.parameters()],
            "lr": s.model_lr_text,
        },
    ]
    opt = torch.optim.SGD(groups, lr=s.model_lr_text, momentum=s.model_momentum, weight_decay=s.model_weight_decay)
    return model, opt


def _real_batch(ctx, gen: torch.Generator, size: int):
    n = ctx.real.text.shape[0]
    idx = torch.randperm(n, generator=gen)[: min(size, n)]
    images = ctx.real.images[ctx.real.pair_image[idx]].to(ctx.device)
    return images, ctx.real.text[idx].to(ctx.device)


def run(ctx) -> object:
    """``python -m rdistill.distill --method covmatch``: the distilled set, from ``ctx.init``."""
    return distill_covmatch(ctx, CovMatchSettings.from_config(ctx.cfg))


def distill_covmatch(ctx, settings: CovMatchSettings):
    """Algorithm 1 of the paper on ``ctx`` (a :class:`rdistill.methods.common.MethodContext`): returns a
    ``Synthetic`` like ``ctx.init`` with the optimised images and text vectors. Resumes from
    ``ctx.load_checkpoint()``; checkpoints every ``checkpoint_every`` iterations (the RNG states with it)."""
    s = settings.resolved(ctx.num_pairs)
    init = ctx.init
    # the students' random inits and dropout draw from torch's global generator: seed it, so that a run does not
    # depend on what ran before it in the process (a resumed run gets the saved state back below)
    torch.manual_seed(int(ctx.seed))
    gen = torch.Generator().manual_seed(int(ctx.seed))
    images = init.images.detach().clone().float().to(ctx.device).requires_grad_(True)
    text = init.text.detach().clone().float().to(ctx.device).requires_grad_(True)
    opt_syn = torch.optim.SGD(
        [{"params": [images], "lr": s.lr_image}, {"params": [text], "lr": s.lr_text}],
        lr=s.lr_image,
        momentum=s.momentum,
    )
    model, opt_model = _fresh_model(ctx, s)
    start = 0
    state = ctx.load_checkpoint()
    if state is not None:
        with torch.no_grad():
            images.copy_(state["images"]), text.copy_(state["text"])
        opt_syn.load_state_dict(state["opt_syn"])
        model.load_state_dict(state["model"])
        opt_model.load_state_dict(state["opt_model"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["iteration"])
        log.info("covmatch: resuming after iteration %d of %d", start, s.iterations)
    m = images.shape[0]
    losses = []
    for it in range(start, s.iterations):
        if it > 0 and it % s.reset_every == 0:
            model, opt_model = _fresh_model(ctx, s)
        real_images, real_text = _real_batch(ctx, gen, s.batch_real)
        sel = torch.randperm(m, generator=gen)[: s.batch_syn] if 0 < s.batch_syn < m else torch.arange(m)
        sel = sel.to(ctx.device)

        # 1. the synthetic data: the matching loss at the current model (model parameters not updated here)
        model.eval()
        with torch.no_grad():
            ri, rt = model.features(real_images, real_text, s.normalize_features)
        si, st = model.features(images[sel], text[sel], s.normalize_features)
        loss, parts = covmatch_loss(ri, rt, si, st, model.proj_image, model.proj_text, s.rho, s.feat_weight)
        opt_syn.zero_grad(set_to_none=True)
        loss.backward()
        opt_syn.step()

        # 2. the online model: one contrastive step on the real batch
        model.train()
        opt_model.zero_grad(set_to_none=True)
        fi, ft = model.features(real_images, real_text, normalize=False)
        model_loss = info_nce(model.proj_image(fi), model.proj_text(ft), s.temperature)
        model_loss.backward()
        opt_model.step()

        losses.append(loss.item())
        done = it + 1
        if done % s.log_every == 0 or done == s.iterations:
            ctx.log(done, s.iterations, loss=loss.item(), model_loss=model_loss.item(), **parts)
        if done % s.checkpoint_every == 0 and done < s.iterations:
            ctx.save_checkpoint(
                {
                    "iteration": done,
                    "images": images.detach().cpu(),
                    "text": text.detach().cpu(),
                    "opt_syn": opt_syn.state_dict(),
                    "model": model.state_dict(),
                    "opt_model": opt_model.state_dict(),
                    "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                },
                done,
            )
    return dataclasses.replace(
        init,
        images=images.detach().cpu(),
        text=text.detach().cpu(),
        lr_image=None,
        lr_text=None,
        extra={
            "method": "covmatch",
            "settings": dataclasses.asdict(s),
            "reference": "Lee & Chung, NeurIPS 2025 (arXiv 2510.18583)",
            "final_loss": losses[-1] if losses else None,
        },
    )
