"""MDM (rdistill.methods.mdm): the geodesic kernel energy against a brute-force double loop, the expert merge
against its per-tensor formula, the joint-space k-means initialisation, pixel gradients by finite differences,
the loss going down, and a killed run resuming to the same result. Tiny random-init models, CPU."""

from __future__ import annotations

import dataclasses
import io
import math
import types

import numpy as np
import pytest
import torch

from rdistill.methods.mdm import (
    MDMSettings,
    distill_mdm,
    fresh_anchor,
    geodesic_kernel_energy,
    kmeans_init,
    mdm_loss,
    merge_experts,
    merged_student,
    pick_expert_pair,
    pick_nearest,
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


def _info_nce(img, txt, t=0.07):
    f = torch.nn.functional
    logits = f.normalize(img, dim=1) @ f.normalize(txt, dim=1).t() / t
    y = torch.arange(len(logits))
    return (f.cross_entropy(logits, y) + f.cross_entropy(logits.t(), y)) / 2


class FakeContext:
    """The framework's MethodContext as the agreed interface describes it, on planted tiny data (4 concepts shared
    by image colour and text vector), with expert trajectories really trained here (2 experts, 3 epochs)."""

    def __init__(self, seed=0, n=96, m=8, store=None, kill_at=None, concepts=4):
        g = torch.Generator().manual_seed(1234)
        self.concept = torch.randint(0, concepts, (n,), generator=g)
        colours = 2.0 * torch.randn(concepts, 3, 1, 1, generator=g)
        words = 2.0 * torch.randn(concepts, D_TEXT, generator=g)
        images = colours[self.concept] + 0.3 * torch.randn(n, 3, S, S, generator=g)
        text = words[self.concept] + 0.3 * torch.randn(n, D_TEXT, generator=g)
        self.real = types.SimpleNamespace(
            images=images, text=text, captions=[f"c{int(c)}" for c in self.concept], pair_image=torch.arange(n)
        )
        pick = torch.randperm(n, generator=g)[:m]
        self.init = Synth(
            images[pick].clone(), text[pick].clone(), [self.real.captions[i] for i in pick], [int(i) for i in pick]
        )
        self.cfg, self.method, self.num_pairs, self.seed, self.device = None, "mdm", m, seed, "cpu"
        self.text_space, self.image_size = "test", S
        self.store = {} if store is None else store
        self.logged, self.kill_at = [], kill_at
        self._experts = self._train_experts()
        torch.manual_seed(seed)

    def _train_experts(self, n_experts=2, epochs=3):
        out = []
        with torch.random.fork_rng(devices=[]):
            for e in range(n_experts):
                torch.manual_seed(100 + e)
                image, head = self.image_student(), self.text_head()
                opt = torch.optim.SGD([*image.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
                traj = [{"image": _copy(image.state_dict()), "text": _copy(head.state_dict())}]
                for _ in range(epochs):
                    for idx in torch.randperm(len(self.real.text)).split(32):
                        loss = _info_nce(image(self.real.images[idx]), head(self.real.text[idx]))
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    traj.append({"image": _copy(image.state_dict()), "text": _copy(head.state_dict())})
                out.append(traj)
        return out

    def image_student(self):
        return tiny_image_model()

    def text_head(self):
        return projection_head(D_TEXT, D_FEAT)

    def experts(self):
        return self._experts

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


def _copy(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("off_diagonal", [True, False])
@pytest.mark.parametrize("sqrt", [True, False])
def test_geodesic_kernel_energy_matches_a_double_loop(off_diagonal, sqrt):
    rng = np.random.default_rng(0)
    real, syn = _unit(rng, 7, 5), _unit(rng, 4, 5)
    sigma, div = 0.6, 0.8

    def k(a, b):
        phi = math.acos(max(-1 + 1e-6, min(1 - 1e-6, float(a @ b))))
        return math.exp(-phi * phi / (2 * sigma * sigma))

    def within(x):
        pairs = [(i, j) for i in range(len(x)) for j in range(len(x)) if (i != j or not off_diagonal)]
        return sum(k(x[i], x[j]) for i, j in pairs) / len(pairs)

    cross = sum(k(s, r) for s in syn for r in real) / (len(syn) * len(real))
    mmd2 = div * within(syn) + within(real) - 2 * cross
    want = math.sqrt(max(mmd2, 0.0) + 1e-12) if sqrt else mmd2
    got = geodesic_kernel_energy(
        torch.from_numpy(real), torch.from_numpy(syn), sigma, diversity=div, off_diagonal=off_diagonal, sqrt=sqrt
    )
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_energy_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(_unit(rng, 30, 4))
    same = geodesic_kernel_energy(x, x, 0.5, off_diagonal=False, sqrt=False)
    assert float(same) == pytest.approx(0.0, abs=1e-12)
    shifted = torch.nn.functional.normalize(x + torch.tensor([2.0, 0, 0, 0], dtype=x.dtype), dim=1)
    assert float(geodesic_kernel_energy(x, shifted, 0.5)) > 0.3


def test_merge_matches_the_per_tensor_formula():
    g = torch.Generator().manual_seed(0)
    w0 = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "n": torch.tensor(7)}
    w1 = {k: v + (torch.randn(v.shape, generator=g) if v.is_floating_point() else 1) for k, v in w0.items()}
    w2 = {k: v + (torch.randn(v.shape, generator=g) if v.is_floating_point() else 2) for k, v in w0.items()}
    alpha = 0.5
    out = merge_experts(w1, w2, w0, alpha)
    for key in ("a", "b"):
        d1, d2 = (w1[key] - w0[key]).double().ravel(), (w2[key] - w0[key]).double().ravel()
        c = float(d1 @ d2 / (d1.norm() * d2.norm()))
        r = 2 * c / (c + 1)
        want = w0[key].double() + alpha * r * ((w1[key] + w2[key]).double() / 2 - w0[key].double())
        torch.testing.assert_close(out[key].double(), want, rtol=1e-6, atol=1e-6)
    assert int(out["n"]) == 7  # integer buffers keep the anchor's
    # experts moving the same way (cos 1): ratio 1, the anchor moves alpha of the way to their mean
    d = torch.randn(3, 4, generator=g)
    same = merge_experts({"a": w0["a"] + d}, {"a": w0["a"] + 2 * d}, {"a": w0["a"]}, 0.5)
    torch.testing.assert_close(same["a"], w0["a"] + 0.5 * 1.5 * d, rtol=1e-5, atol=1e-5)


def test_expert_pairs_stay_in_range_and_differ():
    s = MDMSettings(min_start_epoch=1, max_start_epoch=10)
    experts = [[{}] * 4, [{}] * 4]  # epochs 0..3: the range clips to 1..3
    rng = np.random.default_rng(0)
    for _ in range(200):
        (e1, p1), (e2, p2) = pick_expert_pair(experts, s, rng)
        assert 1 <= p1 <= 3 and 1 <= p2 <= 3 and 0 <= e1 < 2 and 0 <= e2 < 2
        assert (e1, p1) != (e2, p2)


def test_pick_nearest_matches_brute_force():
    rng = np.random.default_rng(2)
    joint = _unit(rng, 60, 6).astype(np.float32)
    centroids = rng.normal(size=(5, 6)).astype(np.float32) * 0.5
    picks = pick_nearest(joint, centroids)
    labels = np.array([np.argmin([np.sum((x - c) ** 2) for c in centroids]) for x in joint])
    chosen = set()
    for j, c in enumerate(centroids):
        members = [i for i in range(len(joint)) if labels[i] == j]
        pool = members if members else [i for i in range(len(joint)) if i not in chosen]
        cos = [joint[i] @ c / np.linalg.norm(c) for i in pool]
        best = pool[int(np.argmax(cos))]
        if best in chosen:  # a member already taken by an earlier empty cluster: any row not yet chosen
            pool = [i for i in range(len(joint)) if i not in chosen]
            best = pool[int(np.argmax([joint[i] @ c / np.linalg.norm(c) for i in pool]))]
        assert picks[j] == best
        chosen.add(best)
    assert len(set(picks.tolist())) == len(picks)


def test_kmeans_init_covers_the_planted_concepts():
    ctx = FakeContext(m=4)
    s = MDMSettings(kmeans_niter=20)
    student = merged_student(ctx, ctx.experts(), s, np.random.default_rng(0))
    pairs = kmeans_init(ctx, student, s)
    assert len(set(pairs.tolist())) == 4
    assert sorted(int(ctx.concept[i]) for i in pairs) == [0, 1, 2, 3]


def test_pixel_gradients_match_finite_differences():
    torch.manual_seed(0)
    image, head = tiny_image_model(torch.float64), projection_head(D_TEXT, D_FEAT, dropout=0.0).double().eval()
    s = MDMSettings()
    f = torch.nn.functional.normalize
    real_i, real_t = torch.randn(12, 3, S, S, dtype=torch.float64), torch.randn(12, D_TEXT, dtype=torch.float64)
    syn_i = torch.randn(5, 3, S, S, dtype=torch.float64, requires_grad=True)
    syn_t = torch.randn(5, D_TEXT, dtype=torch.float64, requires_grad=True)

    def loss_of(si, st):
        return mdm_loss(f(image(real_i), dim=1), f(head(real_t), dim=1), f(image(si), dim=1), f(head(st), dim=1), s)[0]

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


SETTINGS = MDMSettings(
    iterations=60,
    lr_image=10.0,
    lr_text=10.0,
    batch_real=64,
    batch_syn=8,
    checkpoint_every=1000,
    log_every=1,
    kmeans_niter=10,
)


def _loss_under_held_out_merges(ctx, images, text, s, anchor, seeds=(5, 6, 7)):
    """The loss under merges of the run's anchor with expert picks the run did not draw (other generators)."""
    out = []
    for sd in seeds:
        student = merged_student(ctx, ctx.experts(), s, np.random.default_rng([sd, 99]), anchor)
        with torch.no_grad():
            rv, rt = student(ctx.real.images, ctx.real.text)
            sv, st = student(images, text)
            out.append(mdm_loss(rv, rt, sv, st, s)[0].item())
    return float(np.mean(out))


def test_loss_goes_down():
    ctx = FakeContext(m=8)
    out = distill_mdm(ctx, SETTINGS)
    logged = [m["loss"] for _, m in ctx.logged]
    assert len(logged) == 60
    assert np.mean(logged[-10:]) < 0.6 * np.mean(logged[:10])
    torch.manual_seed(ctx.seed)
    anchor = fresh_anchor(ctx)  # the run's anchor: the first draw after the context seeded torch
    start = torch.stack([ctx.real.images[i] for i in out.source_index]), ctx.real.text[out.source_index]
    before = _loss_under_held_out_merges(ctx, *start, SETTINGS, anchor)
    after = _loss_under_held_out_merges(ctx, out.images, out.text, SETTINGS, anchor)
    assert after < 0.8 * before
    assert out.captions == [ctx.real.captions[i] for i in out.source_index]
    assert out.extra["method"] == "mdm" and out.images.shape == (8, 3, S, S)


def test_killed_run_resumes_to_the_same_result():
    s = dataclasses.replace(SETTINGS, iterations=14, checkpoint_every=3, batch_syn=5)
    whole = distill_mdm(FakeContext(seed=3), s)
    store = {}
    with pytest.raises(Killed):
        distill_mdm(FakeContext(seed=3, store=store, kill_at=8), s)
    assert torch.load(io.BytesIO(store["last"]), weights_only=False)["iteration"] == 6
    resumed_ctx = FakeContext(seed=3, store=store)
    resumed = distill_mdm(resumed_ctx, s)
    assert resumed_ctx.logged[0][0] == 7
    assert torch.equal(whole.images, resumed.images) and torch.equal(whole.text, resumed.text)
    assert whole.source_index == resumed.source_index
