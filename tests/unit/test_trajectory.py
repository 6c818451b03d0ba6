"""Trajectory matching (rdistill.methods.trajectory): the unrolled student and its gradients against a hand-computed
two-step linear case, finite differences on pixels and learning rates, the memory-saving replay (TESLA) against the
full unroll (MTT), LoRS's soft labels and loss, the published settings. No Ray, CPU, tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdistill.config import load_config
from rdistill.eval.train import soft_label_loss
from rdistill.methods.trajectory import (
    FlatParams,
    SimilarityMatrix,
    _batches,
    budget_of,
    match_trajectory,
    resolve_settings,
)


@pytest.fixture(autouse=True)
def _double():
    """Gradients are compared to ~1e-9: float64 throughout these tests, float32 restored after each."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# ------------------------------------------------------------------------------- a hand-computed linear student


def _linear_case(seed=0, d_in=5, d_out=3):
    """Two synthetic steps of a linear model ``W`` (image branch) and ``V`` (text branch) on the loss
    ``0.5 ||W x_i - y_i||^2 + 0.5 ||V t_i - z_i||^2`` (one sample per step); the synthetic leaves are the pixels
    ``x (2, d_in)`` and the text ``t (2, d_in)``; ``y``, ``z`` fixed targets."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(W0=r(d_out, d_in), V0=r(d_out, d_in), Ws=r(d_out, d_in), Vs=r(d_out, d_in), x=r(2, d_in),
                t=r(2, d_in), y=r(2, d_out), z=r(2, d_out), a=0.3, b=0.2)  # fmt: skip


def _hand(c, branch: str, first_order: bool):
    """The matching loss of one branch and its gradients, derived by hand (numpy):
    theta_1 = theta_0 - a g_0, theta_2 = theta_1 - a g_1 with g_i = (theta_i x_i - y_i) x_i^T;
    L = ||theta_2 - theta*||^2 / ||theta_0 - theta*||^2; G = dL/dtheta_2 = 2 (theta_2 - theta*) / D;
    dL/dtheta_1 = G (I - a x_1 x_1^T) (exact) or G (first order); dL/dx_i = -a [(theta_i^T L_{i+1} + L_{i+1}^T
    theta_i) x_i - L_{i+1}^T y_i]; dL/da = <L_1, -g_0> + <G, -g_1>."""
    th0, ts, x, y, a = (c["W0"], c["Ws"], c["x"], c["y"], c["a"]) if branch == "img" else (
        c["V0"], c["Vs"], c["t"], c["z"], c["b"])  # fmt: skip
    th0, ts, x, y = (v.numpy() for v in (th0, ts, x, y))
    g0 = np.outer(th0 @ x[0] - y[0], x[0])
    th1 = th0 - a * g0
    g1 = np.outer(th1 @ x[1] - y[1], x[1])
    th2 = th1 - a * g1
    dist = ((th0 - ts) ** 2).sum()
    loss = ((th2 - ts) ** 2).sum() / dist
    G = 2 * (th2 - ts) / dist
    L1 = G if first_order else G @ (np.eye(len(x[1])) - a * np.outer(x[1], x[1]))
    dx1 = -a * ((th1.T @ G + G.T @ th1) @ x[1] - G.T @ y[1])
    dx0 = -a * ((th0.T @ L1 + L1.T @ th0) @ x[0] - L1.T @ y[0])
    da = (L1 * -g0).sum() + (G * -g1).sum()
    return loss, np.stack([dx0, dx1]), da


def _linear_match(c, memory_saving: bool, first_order: bool = False):
    x = c["x"].clone().requires_grad_(True)
    t = c["t"].clone().requires_grad_(True)
    d_out, d_in = c["W0"].shape

    def step_loss(i, params):
        W, V = params[0].view(d_out, d_in), params[1].view(d_out, d_in)
        return 0.5 * (W @ x[i] - c["y"][i]).pow(2).sum() + 0.5 * (V @ t[i] - c["z"][i]).pow(2).sum()

    return match_trajectory(
        step_loss, [c["W0"].reshape(-1), c["V0"].reshape(-1)], [c["Ws"].reshape(-1), c["Vs"].reshape(-1)],
        [torch.tensor(c["a"]), torch.tensor(c["b"])], [x, t], 2, step_seeds=[1, 2], memory_saving=memory_saving,
        first_order=first_order,
    )  # fmt: skip


@pytest.mark.parametrize("memory_saving", [False, True])
def test_two_linear_steps_match_the_hand_computed_gradients(memory_saving):
    c = _linear_case()
    res = _linear_match(c, memory_saving)
    li, gx, ga = _hand(c, "img", first_order=False)
    lt, gt, gb = _hand(c, "txt", first_order=False)
    assert res.loss == pytest.approx(li + lt, rel=1e-10)
    np.testing.assert_allclose(res.leaf_grads[0].numpy(), gx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.leaf_grads[1].numpy(), gt, rtol=1e-9, atol=1e-12)
    assert float(res.lr_grads[0]) == pytest.approx(ga, rel=1e-9)
    assert float(res.lr_grads[1]) == pytest.approx(gb, rel=1e-9)


def test_first_order_replay_drops_exactly_the_hessian_term():
    c = _linear_case(seed=3)
    res = _linear_match(c, memory_saving=True, first_order=True)
    _, gx, ga = _hand(c, "img", first_order=True)
    _, gx_exact, _ = _hand(c, "img", first_order=False)
    np.testing.assert_allclose(res.leaf_grads[0].numpy(), gx, rtol=1e-9, atol=1e-12)
    assert float(res.lr_grads[0]) == pytest.approx(ga, rel=1e-9)
    # the first step's pixels feel the Hessian term; the last step's do not
    assert not np.allclose(gx[0], gx_exact[0]) and np.allclose(gx[1], gx_exact[1])


# ------------------------------------------------------------------------------------ a real (tiny) CNN student


class _Tiny(torch.nn.Module):
    def __init__(self, d_out=6):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4, d_out)

    def forward(self, x):
        h = torch.nn.functional.avg_pool2d(torch.tanh(self.conv(x)), 4)
        return self.fc(h.flatten(1))


def _student_case(seed=0, m=6, steps=3, soft=False):
    torch.manual_seed(seed)
    img, head = _Tiny(), torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Dropout(0.2))
    f_img, f_txt = FlatParams(img), FlatParams(head)
    img_sd, head_sd = img.state_dict(), head.state_dict()
    start = [f_img.flatten(img_sd), f_txt.flatten(head_sd)]
    target = [s + 0.05 * torch.randn_like(s) for s in start]
    images = torch.randn(m, 3, 8, 8, requires_grad=True)
    text = torch.randn(m, 5, requires_grad=True)
    sim = None
    if soft:
        sim = SimilarityMatrix(m, "lowrank", rank=2, alpha=1.0, generator=torch.Generator().manual_seed(1))
    if sim is not None:
        with torch.no_grad():
            sim.right.normal_(0, 0.3)  # away from the identity, so every parameter matters
    batches = _batches(m, 4, steps, "walk", torch.Generator().manual_seed(2))
    head.train()

    def step_loss(i, params):
        idx = batches[i]
        fi = torch.nn.functional.normalize(f_img(params[0], images[idx]), dim=1)
        ft = torch.nn.functional.normalize(f_txt(params[1], text[idx]), dim=1)
        logits = fi @ ft.t() / 0.5
        if sim is None:
            y = torch.arange(len(idx))
            ce = torch.nn.functional.cross_entropy
            return (ce(logits, y) + ce(logits.t(), y)) / 2
        return soft_label_loss(logits, sim.batch(idx), "wbce")

    leaves = [images, text] + (list(sim.parameters()) if sim is not None else [])
    lrs = [torch.tensor(0.4), torch.tensor(0.3)]

    def run(memory_saving, first_order=False, lr=None, merge=False):
        return match_trajectory(step_loss, start, target, lr or lrs, leaves, steps, step_seeds=[5, 6, 7][:steps],
                                memory_saving=memory_saving, first_order=first_order, merge=merge)  # fmt: skip

    return run, images, lrs


@pytest.mark.parametrize("soft,merge", [(False, False), (True, False), (False, True)])
def test_constant_memory_gradients_equal_the_full_unroll(soft, merge):
    run, _, _ = _student_case(soft=soft)
    full, tesla = run(False, merge=merge), run(True, merge=merge)
    assert tesla.loss == pytest.approx(full.loss, rel=1e-12)
    for a, b in zip(full.leaf_grads, tesla.leaf_grads):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    for a, b in zip(full.lr_grads, tesla.lr_grads):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    approx = run(True, first_order=True, merge=merge)  # the LoRS code's gradient: close, not equal
    assert not torch.allclose(approx.leaf_grads[0], full.leaf_grads[0], rtol=1e-6)


def test_pixel_and_lr_gradients_match_finite_differences():
    run, images, lrs = _student_case(seed=4)
    res = run(True)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for _ in range(4):
        i, ch, u, v = rng.integers(6), rng.integers(3), rng.integers(8), rng.integers(8)
        with torch.no_grad():
            images[i, ch, u, v] += eps
        up = run(True).loss
        with torch.no_grad():
            images[i, ch, u, v] -= 2 * eps
        down = run(True).loss
        with torch.no_grad():
            images[i, ch, u, v] += eps
        assert float(res.leaf_grads[0][i, ch, u, v]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)
    for b in range(2):
        hi = [lr + (eps if k == b else 0.0) for k, lr in enumerate(lrs)]
        lo = [lr - (eps if k == b else 0.0) for k, lr in enumerate(lrs)]
        fd = (run(False, lr=hi).loss - run(False, lr=lo).loss) / (2 * eps)
        assert float(res.lr_grads[b]) == pytest.approx(fd, rel=1e-5)


def test_flat_params_calls_the_module_as_its_own_parameters_would():
    torch.manual_seed(0)
    net = _Tiny()
    flat = FlatParams(net)
    vec = flat.flatten(net.state_dict())
    assert vec.shape == (sum(p.numel() for p in net.parameters()),)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(flat(vec, x), net(x))
    torch.testing.assert_close(flat(vec * 0, x), net.fc.bias.detach().expand(3, -1) * 0 + flat(vec * 0, x))
    assert not torch.allclose(flat(vec * 1.1, x), net(x))


# --------------------------------------------------------------------------------------------------- LoRS parts


def test_similarity_matrix_starts_at_identity_and_batches_are_its_submatrices():
    sim = SimilarityMatrix(7, "lowrank", rank=3, alpha=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sim.matrix(), torch.eye(7))
    with torch.no_grad():
        sim.right.normal_()
    full = sim.matrix()
    idx = torch.tensor([5, 1, 3])
    torch.testing.assert_close(sim.batch(idx), full[idx][:, idx])
    expect = torch.diag(sim.diag) + sim.left @ sim.right.t() * (2.0 / 3)
    torch.testing.assert_close(full, expect)


def test_weighted_bce_averages_positives_and_negatives_separately():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])
    soft = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.9, 0.3], [0.6, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    per = -soft * torch.log(p + 1e-6) - (1 - soft) * torch.log(1 - p + 1e-6)
    pos = soft > 0.5
    expect = (per[pos].sum() / (pos.sum() + 1e-6) + per[~pos].sum() / ((~pos).sum() + 1e-6)) / 2  # the authors' eps
    assert float(soft_label_loss(logits, soft, "wbce")) == pytest.approx(float(expect), rel=1e-9)
    # with identity labels on a diagonal-dominant batch the loss is small, on a wrong one large
    eye = torch.eye(3)
    assert soft_label_loss(10 * eye - 5, eye, "wbce") < soft_label_loss(5 - 10 * eye, eye, "wbce")


# -------------------------------------------------------------------------------------------------- settings


def test_published_settings_by_method_preset_and_budget():
    cfg = load_config(None)
    mtt = resolve_settings(cfg, "mtt-vl", 100)
    assert (mtt.syn_steps, mtt.expert_epochs, mtt.max_start_epoch, mtt.lr_image, mtt.lr_lr, mtt.mini_batch) == (
        8, 1, 2, 1000.0, 1e-2, 100)  # fmt: skip
    assert not mtt.memory_saving and not mtt.soft_labels
    lors = resolve_settings(cfg, "lors", 100)
    assert (lors.lr_image, lors.sim_rank, lors.sim_alpha, lors.lr_sim, lors.mini_batch) == (100.0, 10, 3.0, 10.0, 20)
    assert lors.memory_saving and lors.soft_labels and lors.loss == "wbce" and not lors.first_order
    assert resolve_settings(cfg, "lors", 500).max_start_epoch == 3
    coco = load_config(None, ["distill.preset=coco"])
    c500 = resolve_settings(coco, "lors", 1000)
    assert (c500.lr_image, c500.sim_rank, c500.temperature, c500.merge_branches) == (5000.0, 40, 0.1, True)
    assert resolve_settings(coco, "tesla-vl", 200).iterations == 2000
    tesla = resolve_settings(cfg, "tesla-vl", 100)
    assert tesla.memory_saving and not tesla.soft_labels and tesla.lr_image == 100.0
    over = load_config(None, ["distill.mtt_vl.syn_steps=3", "distill.mtt_vl.mini_batch=4"])
    s = resolve_settings(over, "mtt-vl", 3)
    assert (s.syn_steps, s.mini_batch) == (3, 3)
    assert [budget_of(n) for n in (50, 100, 101, 200, 300, 5000)] == [100, 100, 200, 200, 500, 500]


def test_batches_fresh_and_walk():
    g = torch.Generator().manual_seed(0)
    walk = _batches(10, 4, 5, "walk", g)
    assert [len(b) for b in walk] == [4] * 5
    assert len(set(torch.cat(walk[:2]).tolist())) == 8  # no repeat within one permutation
    fresh = _batches(10, 4, 3, "fresh", torch.Generator().manual_seed(0))
    assert all(len(set(b.tolist())) == 4 for b in fresh)


def test_config_sections_of_covmatch_and_mdm_mirror_their_settings():
    """distill.covmatch / distill.mdm declare the methods' settings (same names and defaults), so that every one of
    them can be set from YAML or --set and is validated there; a setting the method takes from distill.* (preset)
    may be left to it."""
    import dataclasses

    covmatch = pytest.importorskip("rdistill.methods.covmatch")
    mdm = pytest.importorskip("rdistill.methods.mdm")
    cfg = load_config(None)
    for settings, section in ((covmatch.CovMatchSettings, cfg.distill.covmatch), (mdm.MDMSettings, cfg.distill.mdm)):
        want = {f.name: f.default for f in dataclasses.fields(settings)}
        want = {k: v for k, v in want.items() if hasattr(section, k) or not hasattr(cfg.distill, k)}
        have = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        assert have == want
