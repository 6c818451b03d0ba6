"""CovMatch (rdistill.methods.covmatch): the loss against explicit formulas, pixel gradients by finite differences,
the loss going down over a run, and a killed run resuming to the same result. Tiny random-init models, CPU."""

from __future__ import annotations

import copy
import dataclasses
import io
import types

import numpy as np
import pytest
import torch

from rdistill.methods.covmatch import (
    CovMatchSettings,
    covmatch_loss,
    cross_covariance,
    distill_covmatch,
)
from rdistill.models.students import projection_head

S, D_TEXT, D_FEAT = 8, 12, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: more torch threads than free cores only add overhead (many times, on a busy machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_image_model(dtype=torch.float32):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(24, D_FEAT),
    ).to(dtype)


class Killed(RuntimeError):
    pass


class FakeContext:
    """The framework's MethodContext as the agreed interface describes it, on planted tiny data: real pairs whose
    image colour and text vector share one of 4 latent concepts."""

    def __init__(self, seed=0, n=96, m=8, store=None, kill_at=None):
        g = torch.Generator().manual_seed(1234)
        concept = torch.randint(0, 4, (n,), generator=g)
        colours = torch.randn(4, 3, 1, 1, generator=g)
        words = torch.randn(4, D_TEXT, generator=g)
        images = colours[concept] + 0.3 * torch.randn(n, 3, S, S, generator=g)
        text = words[concept] + 0.3 * torch.randn(n, D_TEXT, generator=g)
        self.real = types.SimpleNamespace(
            images=images, text=text, captions=[f"c{int(c)}" for c in concept], pair_image=torch.arange(n)
        )
        pick = torch.randperm(n, generator=g)[:m]
        self.init = Synth(
            images[pick].clone(), text[pick].clone(), [f"c{int(c)}" for c in concept[pick]], [int(i) for i in pick]
        )
        self.cfg, self.method, self.num_pairs, self.seed, self.device = None, "covmatch", m, seed, "cpu"
        self.text_space, self.image_size = "test", S
        self.store = {} if store is None else store
        self.logged, self.kill_at = [], kill_at
        torch.manual_seed(seed)

    def image_student(self):
        return tiny_image_model()

    def text_head(self):
        return projection_head(D_TEXT, D_FEAT)

    def experts(self):
        return []

    def save_checkpoint(self, state, iteration):
        buf = io.BytesIO()
        torch.save(state, buf)
        self.store["last"] = buf.getvalue()

    def load_checkpoint(self):
        if "last" not in self.store:
            return None
        return torch.load(io.BytesIO(self.store["last"]), weights_only=False)

    def log(self, iteration, total, **metrics):
        self.logged.append((iteration, metrics))
        if self.kill_at is not None and iteration == self.kill_at:
            raise Killed(f"killed at {iteration}")


@dataclasses.dataclass
class Synth:
    images: torch.Tensor
    text: torch.Tensor
    captions: list
    source_index: list
    lr_image: float | None = None
    lr_text: float | None = None
    soft_labels: torch.Tensor | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def test_cross_covariance_is_the_linear_contrastive_matrix():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 4))
    xm, ym = x.mean(0), y.mean(0)
    explicit = sum(np.outer(x[i] - xm, y[i] - ym) for i in range(7)) / 6
    got = cross_covariance(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, explicit, rtol=1e-12, atol=1e-12)
    # positives minus in-batch negatives, as the linear contrastive loss weighs them (paper section 3)
    pos = sum(np.outer(x[i], y[i]) for i in range(7)) / 7
    neg = sum(np.outer(x[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    np.testing.assert_allclose(got, pos - neg, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        cross_covariance(torch.zeros(1, 3), torch.zeros(1, 3))


def test_covmatch_loss_matches_explicit_formula():
    rng = np.random.default_rng(1)
    ri, rt = rng.normal(size=(9, 4)), rng.normal(size=(9, 5))
    si, st = rng.normal(size=(5, 4)), rng.normal(size=(5, 5))
    gv, gl = rng.normal(size=(6, 4)), rng.normal(size=(6, 5))
    rho, lam = 2.0, 0.3

    def cov(a, b):
        return sum(np.outer(a[i] - a.mean(0), b[i] - b.mean(0)) for i in range(len(a))) / (len(a) - 1)

    l_cov = sum(v * v for v in (rho * cov(ri, rt) - cov(si, st)).ravel())
    feat_v = np.sum((np.mean([gv @ r for r in ri], 0) - np.mean([gv @ s for s in si], 0)) ** 2)
    feat_l = np.sum((np.mean([gl @ r for r in rt], 0) - np.mean([gl @ s for s in st], 0)) ** 2)
    pv, pl = torch.nn.Linear(4, 6, bias=False).double(), torch.nn.Linear(5, 6, bias=False).double()
    with torch.no_grad():
        pv.weight.copy_(torch.from_numpy(gv)), pl.weight.copy_(torch.from_numpy(gl))
    t = torch.from_numpy
    loss, parts = covmatch_loss(t(ri), t(rt), t(si), t(st), pv, pl, rho, lam)
    assert loss.item() == pytest.approx(l_cov + lam * (feat_v + feat_l), rel=1e-10)
    assert parts["cov"] == pytest.approx(l_cov, rel=1e-10)
    # a synthetic set equal to the real one, rho 1: every term vanishes
    zero, _ = covmatch_loss(t(ri), t(rt), t(ri), t(rt), pv, pl, 1.0, lam)
    assert zero.item() == pytest.approx(0.0, abs=1e-20)


def test_pixel_gradients_match_finite_differences():
    torch.manual_seed(0)
    image, head = tiny_image_model(torch.float64), projection_head(D_TEXT, D_FEAT, dropout=0.0).double().eval()
    pv = torch.nn.Linear(D_FEAT, 10, bias=False).double()
    pl = torch.nn.Linear(D_FEAT, 10, bias=False).double()
    real_i, real_t = torch.randn(12, 3, S, S, dtype=torch.float64), torch.randn(12, D_TEXT, dtype=torch.float64)
    syn_i = torch.randn(5, 3, S, S, dtype=torch.float64, requires_grad=True)
    syn_t = torch.randn(5, D_TEXT, dtype=torch.float64, requires_grad=True)

    def loss_of(si, st):
        f = torch.nn.functional.normalize
        return covmatch_loss(
            f(image(real_i), dim=1), f(head(real_t), dim=1), f(image(si), dim=1), f(head(st), dim=1), pv, pl, 2.0, 0.5
        )[0]

    loss_of(syn_i, syn_t).backward()
    h = 1e-6
    for idx in [(0, 0, 1, 2), (3, 2, 7, 0), (4, 1, 4, 4)]:
        plus, minus = syn_i.detach().clone(), syn_i.detach().clone()
        plus[idx] += h
        minus[idx] -= h
        fd = (loss_of(plus, syn_t) - loss_of(minus, syn_t)) / (2 * h)
        assert syn_i.grad[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)
    for idx in [(1, 3), (4, 11)]:
        plus, minus = syn_t.detach().clone(), syn_t.detach().clone()
        plus[idx] += h
        minus[idx] -= h
        fd = (loss_of(syn_i, plus) - loss_of(syn_i, minus)) / (2 * h)
        assert syn_t.grad[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)


SETTINGS = CovMatchSettings(
    iterations=60,
    rho=1.0,
    feat_weight=0.1,
    lr_image=10.0,
    lr_text=10.0,
    batch_real=64,
    reset_every=20,
    projection_dim=16,
    normalize_features=True,
    checkpoint_every=1000,
    log_every=1,
)


def _loss_under_fresh_models(ctx, images, text, seeds=(11, 12, 13)):
    """The matching loss of a synthetic set under fresh models (no online training): the same models and real
    batch for every set compared."""
    out = []
    for sd in seeds:
        torch.manual_seed(sd)
        image, head = ctx.image_student().eval(), ctx.text_head().eval()
        pv, pl = torch.nn.Linear(D_FEAT, 16, bias=False), torch.nn.Linear(D_FEAT, 16, bias=False)
        f = torch.nn.functional.normalize
        with torch.no_grad():
            loss, _ = covmatch_loss(
                f(image(ctx.real.images), dim=1),
                f(head(ctx.real.text), dim=1),
                f(image(images), dim=1),
                f(head(text), dim=1),
                pv,
                pl,
                1.0,
                0.1,
            )
        out.append(float(loss))
    return float(np.mean(out))


@pytest.mark.parametrize("normalize", [True, False])
def test_loss_goes_down_at_a_fixed_model(normalize):
    # online model frozen (lrs 0, no reset): the logged loss is the same objective at every iteration
    s = dataclasses.replace(
        SETTINGS,
        model_lr_image=0.0,
        model_lr_text=0.0,
        reset_every=10_000,
        normalize_features=normalize,
        lr_image=10.0 if normalize else 1.0,
        lr_text=10.0 if normalize else 1.0,
    )
    ctx = FakeContext()
    distill_covmatch(ctx, s)
    logged = [m["loss"] for _, m in ctx.logged]
    assert len(logged) == 60
    assert np.mean(logged[-10:]) < 0.5 * np.mean(logged[:10])


def test_full_schedule_lowers_the_loss_under_fresh_models():
    # online model trained and reset every 20 iterations: judged under models the run never saw
    ctx = FakeContext()
    out = distill_covmatch(ctx, SETTINGS)
    before = _loss_under_fresh_models(ctx, ctx.init.images, ctx.init.text)
    after = _loss_under_fresh_models(ctx, out.images, out.text)
    assert after < 0.9 * before
    assert out.images.shape == ctx.init.images.shape and out.text.shape == ctx.init.text.shape
    assert out.captions == ctx.init.captions and out.extra["method"] == "covmatch"
    assert not torch.equal(out.images, ctx.init.images)


def test_killed_run_resumes_to_the_same_result():
    s = dataclasses.replace(SETTINGS, iterations=14, reset_every=4, checkpoint_every=3, batch_syn=5)
    whole = distill_covmatch(FakeContext(seed=3), s)
    store = {}
    with pytest.raises(Killed):
        distill_covmatch(FakeContext(seed=3, store=store, kill_at=8), s)
    assert torch.load(io.BytesIO(store["last"]), weights_only=False)["iteration"] == 6
    resumed_ctx = FakeContext(seed=3, store=store)
    resumed = distill_covmatch(resumed_ctx, s)
    assert resumed_ctx.logged[0][0] == 7  # it started after the checkpoint, not from scratch
    assert torch.equal(whole.images, resumed.images)
    assert torch.equal(whole.text, resumed.text)


def test_settings_by_budget_and_from_config():
    s = CovMatchSettings()
    assert (s.resolved(100).rho, s.resolved(100).feat_weight, s.resolved(100).iterations) == (2.0, 0.1, 10_000)
    assert (s.resolved(200).rho, s.resolved(200).feat_weight, s.resolved(200).iterations) == (1.0, 0.1, 10_000)
    assert (s.resolved(500).rho, s.resolved(500).feat_weight, s.resolved(500).iterations) == (1.0, 0.6, 20_000)
    assert CovMatchSettings(preset="coco").resolved(500).feat_weight == 0.5
    assert CovMatchSettings(rho=3.0, feat_weight=0.0).resolved(100).rho == 3.0
    assert CovMatchSettings(feat_weight=0.0).resolved(500).feat_weight == 0.0
    section = types.SimpleNamespace(lr_image=0.5, checkpoint_every=0, log_every=3)
    cfg = types.SimpleNamespace(distill=types.SimpleNamespace(covmatch=section, checkpoint_every=7, preset="coco"))
    got = CovMatchSettings.from_config(cfg)
    assert (got.lr_image, got.checkpoint_every, got.log_every, got.preset, got.lr_text) == (0.5, 7, 3, "coco", 1.0)
    assert copy.deepcopy(got) == got
