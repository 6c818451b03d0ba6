"""Expert trajectories (rdistill.methods.experts): the per-epoch parameters of students trained on real pairs, the
on-disk format keyed by what they were trained from, reuse and top-up, and the same experts from Ray Train runs as
from the local loop (tests/integration/test_distill.py). Tiny random-init students on planted data, CPU, no Ray."""

from __future__ import annotations

import dataclasses
import json

import torch

from rdistill.methods.experts import (
    ExpertSettings,
    expert_path,
    expert_seed,
    experts_key,
    load_or_train_experts,
    train_expert,
)
from rdistill.models.students import StudentSpec, build_image_model, projection_head

SPEC = StudentSpec("rdistill-tiny-vit", "random", "pooled", 8)
SETTINGS = ExpertSettings(num_experts=2, epochs=3, batch_size=16)


def _data(n=48, d=12, concepts=4):
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, concepts, (n,), generator=g)
    colour = 2 * torch.randn(concepts, 3, 1, 1, generator=g)
    word = 2 * torch.randn(concepts, d, generator=g)
    return {"images": colour[c] + 0.3 * torch.randn(n, 3, 8, 8, generator=g),
            "text": word[c] + 0.3 * torch.randn(n, d, generator=g), "pair_image": torch.arange(n)}  # fmt: skip


def _record(**kw):
    return {"data": "planted-0", "pairs": 48, "student": dataclasses.asdict(SPEC), "text_space": "test:12",
            "head_dropout": 0.0, "settings": dataclasses.asdict(SETTINGS), "seed": 0, **kw}  # fmt: skip


def _builders():
    dim = {}

    def image():
        m, dim["d"] = build_image_model(SPEC)
        return m

    return image, lambda: projection_head(12, dim["d"], 0.0)


def test_an_expert_saves_every_epoch_learns_and_is_deterministic():
    torch.set_num_threads(1)
    epochs, losses = train_expert(*_builders(), _data(), SETTINGS, seed=5)
    assert len(epochs) == SETTINGS.epochs + 1 and len(losses) == SETTINGS.epochs
    assert set(epochs[0]) == {"image", "text"}
    w0, w1 = epochs[0]["text"]["projection.weight"], epochs[1]["text"]["projection.weight"]
    assert not torch.equal(w0, w1)
    assert losses[-1] < losses[0]
    again, _ = train_expert(*_builders(), _data(), SETTINGS, seed=5)
    for a, b in zip(epochs, again):
        for k in a["image"]:
            assert torch.equal(a["image"][k], b["image"][k])
    other, _ = train_expert(*_builders(), _data(), SETTINGS, seed=6)
    assert not torch.equal(other[0]["text"]["projection.weight"], w0)


def test_experts_are_stored_by_what_they_were_trained_from_and_reused(tmp_path):
    torch.set_num_threads(1)
    kw = dict(text_dim=12, head_dropout=0.0, settings=SETTINGS, seed=0, executor="local")
    trajs, info = load_or_train_experts(tmp_path, _record(), _data(), SPEC, **kw)
    assert info["trained"] == 2 and len(trajs) == 2 and len(trajs[0]) == 4
    root = tmp_path / experts_key(_record())
    rec = json.loads((root / "experts.json").read_text())
    assert rec["num_experts"] == 2 and rec["data"] == "planted-0"
    doc = torch.load(expert_path(root, 1), weights_only=True)
    assert doc["seed"] == expert_seed(0, 1) and len(doc["losses"]) == 3
    again, info2 = load_or_train_experts(tmp_path, _record(), _data(), SPEC, **kw)
    assert info2 == {**info, "trained": 0, "reused": 2}
    for k, v in trajs[1][3]["image"].items():
        assert torch.equal(again[1][3]["image"][k], v)
    more, info3 = load_or_train_experts(
        tmp_path, _record(), _data(), SPEC, **{**kw, "settings": dataclasses.replace(SETTINGS, num_experts=3)}
    )
    assert info3["trained"] == 1 and len(more) == 3  # the first two reused, one added
    # other data or settings: another directory
    assert experts_key(_record(data="planted-1")) != experts_key(_record())
    assert experts_key(_record(settings={**dataclasses.asdict(SETTINGS), "epochs": 4})) != experts_key(_record())
    # the count is not part of the key
    assert experts_key(_record(settings={**dataclasses.asdict(SETTINGS), "num_experts": 9})) == experts_key(_record())


def test_the_random_states_after_experts_do_not_depend_on_whether_they_were_trained(tmp_path):
    """A method seeds torch, then asks for its experts, then draws its students' inits: training the experts on
    first use (which seeds and draws) must leave the generators as loading them from the cache does."""
    import random

    import numpy as np

    from rdistill.methods.common import MethodContext

    torch.set_num_threads(1)
    kw = dict(text_dim=12, head_dropout=0.0, settings=SETTINGS, seed=0, executor="local")

    def draws_after_experts():
        ctx = MethodContext.__new__(MethodContext)
        ctx._experts = None
        ctx._experts_fn = lambda: load_or_train_experts(tmp_path, _record(), _data(), SPEC, **kw)[0]
        torch.manual_seed(5), np.random.seed(5), random.seed(5)
        ctx.experts()
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    trained = draws_after_experts()  # first call: the experts are trained
    loaded = draws_after_experts()  # second: read from the cache
    assert trained == loaded
