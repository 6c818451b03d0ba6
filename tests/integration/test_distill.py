"""``python -m rdistill.distill`` on the toy world (trajectory methods): the matching loss goes down, the harness's
students trained on the distilled set beat those trained on the set it started from (3 seeds), LoRS's similarity
labels move away from the identity and change what the students learn, a killed run resumes to the same result,
bad input is one line. Tiny random-init students (rdistill-tiny-resnet, the tiny CLIP text tower), CPU, local."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdistill.config import load_config
from rdistill.eval.driver import run_evaluate
from rdistill.eval.toy import write_toy_karpathy
from rdistill.methods.driver import run_distill

TINY = [
    "distill.num_pairs=8",
    "distill.student=rdistill-tiny-resnet",
    "distill.image_weights=random",
    "distill.text_encoder=clip:rdistill-tiny",
    "distill.image_size=16",
    "distill.threads=1",
    "distill.log_every=1",
    "distill.checkpoint_every=4",
    "distill.write_init=true",
    "distill.experts.num_experts=2",
    "distill.experts.epochs=3",
    "distill.experts.batch_size=16",
    "progress=false",
]
# the toy scale: experts move ~19 steps an epoch, so the published lrs (tuned for ~1100 steps an epoch of
# Flickr30K) are scaled down; two unrolled steps keep the test fast
TOY = {
    m: [f"distill.{m.replace('-', '_')}.{k}" for k in (
        "iterations=40", "syn_steps=2", "mini_batch=8", "lr_image=300", "lr_text=300", "lr_init_image=0.01",
        "lr_init_text=0.01", "lr_lr=0.0001", "max_start_epoch=2", "expert_epochs=1")]
    for m in ("mtt-vl", "tesla-vl", "lors")
}  # fmt: skip
TOY["lors"] += ["distill.lors.sim_rank=2", "distill.lors.sim_alpha=1.0", "distill.lors.lr_sim=10.0"]
EVAL = [
    "evaluate.protocol=lors",
    "evaluate.students=rdistill-tiny-resnet",
    "evaluate.image_weights=random",
    "evaluate.text_encoder=clip:rdistill-tiny",
    "evaluate.image_size=16",
    "evaluate.epochs=8",
    "evaluate.eval_every=4",
    "evaluate.batch_size=8",
    "evaluate.runs=3",
    "evaluate.random_subset=false",
    "evaluate.executor=local",
    "evaluate.cpus_per_worker=1",
    "progress=false",
]
SEEDS = (0, 1, 2)


def make_toy(tmp_path_factory, name: str) -> dict:
    """The tests' toy world: 40 training images (200 pairs), 30 val and 60 test images, 16 px."""
    root = tmp_path_factory.mktemp(name)
    path = write_toy_karpathy(root / "data", {"train": 40, "val": 30, "test": 60}, seed=3, size=16)
    return {"json": path, "root": root, "experts": root / "experts"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory, "toy-distill")


def _cfg(toy, method, seed, extra=()):
    return load_config(None, [*TINY, *TOY[method], f"seed={seed}", f"distill.experts_dir={toy['experts']}", *extra])


def _distill(toy, method, seed, extra=()):
    out = toy["root"] / f"{method}-s{seed}"
    if not (out / "_SUCCESS").exists():
        torch.set_num_threads(1)
        run_distill(method, str(toy["json"]), out, _cfg(toy, method, seed, extra))
    return out


def _r_mean(summary, path):
    (res,) = [r for r in summary["results"] if Path(r["set_path"]) == Path(path).resolve()]
    return res["test"]["r_mean"], res


def _evaluate(toy, d, seed, name):
    summary = run_evaluate([str(d), str(d / "init")], str(toy["json"]), toy["root"] / name,
                           load_config(None, [*EVAL, f"seed={seed}"]))  # fmt: skip
    dist, res = _r_mean(summary, d)
    init, _ = _r_mean(summary, d / "init")
    return dist, init, res


def _history(d):
    return [h["loss"] for h in json.loads((d / "distilled.json").read_text())["source"]["history"]]


@pytest.mark.parametrize("method", ["mtt-vl", "tesla-vl", "lors"])
def test_matching_loss_goes_down(toy, method):
    hist = _history(_distill(toy, method, 0))
    third = max(1, len(hist) // 3)
    assert np.mean(hist[-third:]) < np.mean(hist[:third]), hist


@pytest.mark.slow
# tesla-vl takes MTT-VL's gradients (tests/unit/test_trajectory.py: equal to 1e-8) and the same batches, so its
# set is MTT-VL's; the comparison is run for mtt-vl and lors only, to keep the suite short
@pytest.mark.parametrize("method", ["mtt-vl", "lors"])
def test_students_learn_more_from_the_distilled_set_than_from_its_start(toy, method):
    """Over 3 seeds: the harness's students (mean test r_mean of 3 runs each) trained on the distilled set against
    the same students trained on the initial set (its real pairs, the initial learnable lrs, no soft labels)."""
    gains = []
    for seed in SEEDS:
        d = _distill(toy, method, seed)
        dist, init, res = _evaluate(toy, d, seed, f"eval-{method}-s{seed}")
        gains.append(dist - init)
        assert res["image_tensors"] and res["text_side"] == "npy"
        assert res["soft_labels"] == ("wbce" if method == "lors" else None)
    print(f"{method}: r_mean gain over the initial set per seed {np.round(gains, 2).tolist()}, mean "
          f"{np.mean(gains):.2f}")  # fmt: skip
    assert np.mean(gains) > 0, gains


def test_output_format_float_images_learned_lrs_and_soft_labels(toy):
    d = _distill(toy, "lors", 0)
    info = json.loads((d / "distilled.json").read_text())
    assert info["method"] == "lors" and info["image"]["tensor"] == "f32.npy"
    assert info["text"]["space"] == "clip:rdistill-tiny" and info["text"]["vectors"] == "npy"
    st = info["students"]
    assert st["soft_labels"] == "soft_labels.npy" and st["soft_label_loss"] == "wbce"
    assert st["lr_image"] != pytest.approx(0.01) and st["lr_text"] > 0
    from rdistill.eval.sets import read_distilled_set

    ts = read_distilled_set(d, 16)
    assert ts.images.dtype == np.float32 and ts.images.shape == (8, 3, 16, 16)
    init = read_distilled_set(d / "init", 16)
    assert not np.allclose(ts.images, init.images)  # the pixels moved, and not by 8-bit steps only
    frac = np.abs(ts.images * 255 - np.round(ts.images * 255))
    assert frac.max() > 0.01
    sim = np.load(d / "soft_labels.npy")
    assert sim.shape == (8, 8)
    assert np.abs(sim - np.eye(8)).max() > 1e-3, "LoRS's labels stayed at the identity"
    assert not (d / "_work").exists() and (d / "_SUCCESS").exists()


def test_soft_labels_change_what_the_students_learn(toy):
    d = _distill(toy, "lors", 0)
    plain = toy["root"] / "lors-s0-without-labels"
    if not plain.exists():
        shutil.copytree(d, plain, ignore=shutil.ignore_patterns("init"))
        info = json.loads((plain / "distilled.json").read_text())
        info["students"]["soft_labels"] = None
        (plain / "distilled.json").write_text(json.dumps(info))
    summary = run_evaluate([str(d), str(plain)], str(toy["json"]), toy["root"] / "eval-soft",
                           load_config(None, [*EVAL, "evaluate.runs=1"]))  # fmt: skip
    runs = [json.loads(p.read_text()) for p in (toy["root"] / "eval-soft" / "runs").glob("*.json")]
    with_labels = [r for r in runs if r["set"] == "lors-s0"]
    without = [r for r in runs if r["set"] == "lors-s0-without-labels"]
    assert with_labels and without
    assert not np.allclose(with_labels[0]["losses"], without[0]["losses"])
    (a,) = [r for r in summary["results"] if r["set"].endswith("lors-s0")]
    (b,) = [r for r in summary["results"] if r["set"].endswith("without-labels")]
    assert a["soft_labels"] == "wbce" and b["soft_labels"] is None


def _cli(toy, out, method, seed, env=None, extra=()):
    args = [sys.executable, "-m", "rdistill.distill", "--method", method, "--input", str(toy["json"]), "--num-pairs",
            "8", "--output", str(out), "--quiet"]  # fmt: skip
    for s in [*TINY, *TOY[method], f"seed={seed}", f"distill.experts_dir={toy['experts']}", *extra]:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(toy):
    short = ["distill.lors.iterations=10"]
    whole = toy["root"] / "lors-whole"  # the same run, never interrupted (in-process)
    if not (whole / "_SUCCESS").exists():
        run_distill("lors", str(toy["json"]), whole, _cfg(toy, "lors", 1, short))
    out = toy["root"] / "lors-killed"
    shutil.rmtree(out, ignore_errors=True)
    killed = _cli(toy, out, "lors", 1, {"RDISTILL_FAULT_KILL_AFTER": "distill:8"}, short)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "_work" / "checkpoint.pt").exists() and not (out / "_SUCCESS").exists()
    resumed = _cli(toy, out, "lors", 1, None, short)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    from rdistill.eval.sets import read_distilled_set

    a, b = read_distilled_set(whole, 16), read_distilled_set(out, 16)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.soft_labels, b.soft_labels)
    ia, ib = (json.loads((p / "distilled.json").read_text()) for p in (whole, out))
    assert ia["students"] == ib["students"]
    assert ib["source"]["resumed_from"] == 8
    assert [h["loss"] for h in ia["source"]["history"]] == [h["loss"] for h in ib["source"]["history"]]


def test_bad_input_is_one_line(toy, tmp_path):
    cfg = _cfg(toy, "mtt-vl", 0, ["distill.num_pairs=100000"])
    from rdistill.errors import InputError

    with pytest.raises(InputError, match="has only"):
        run_distill("mtt-vl", str(toy["json"]), tmp_path / "o", cfg)
    r = subprocess.run([sys.executable, "-m", "rdistill.distill", "--method", "lors", "--input",
                        str(tmp_path / "missing.json"), "--num-pairs", "4", "--output", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_ray_train_experts_equal_the_local_ones(tmp_path, ray_local):
    """The experts as Ray Train runs (one TorchTrainer each, in parallel) are the local loop's, bit for bit."""
    import dataclasses

    from rdistill.methods.experts import ExpertSettings, load_or_train_experts
    from rdistill.models.students import StudentSpec

    spec = StudentSpec("rdistill-tiny-vit", "random", "pooled", 8)
    settings = ExpertSettings(num_experts=2, epochs=2, batch_size=16)
    g = torch.Generator().manual_seed(0)
    data = {"images": torch.randn(32, 3, 8, 8, generator=g), "text": torch.randn(32, 12, generator=g),
            "pair_image": torch.arange(32)}  # fmt: skip
    record = {"data": "random-32", "student": dataclasses.asdict(spec), "settings": dataclasses.asdict(settings)}
    kw = dict(text_dim=12, head_dropout=0.0, settings=settings, seed=0)
    local, _ = load_or_train_experts(tmp_path / "local", record, data, spec, executor="local", **kw)
    remote, info = load_or_train_experts(tmp_path / "ray", record, data, spec, executor="ray", cpus_per_expert=1.0,
                                         **kw)  # fmt: skip
    assert info["trained"] == 2
    for a, b in zip(local, remote):
        for ea, eb in zip(a, b):
            for part in ("image", "text"):
                for k in ea[part]:
                    assert torch.equal(eb[part][k], ea[part][k]), (part, k)
