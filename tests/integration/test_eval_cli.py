"""python -m rdistill.evaluate end to end on toy data: eval.json's fields, eval.html, resume, refusals."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rdistill.eval.driver import main  # noqa: E402
from rdistill.eval.toy import real_pair_samples, write_toy_karpathy  # noqa: E402
from rdistill.io.distilled import read_distilled_info, write_distilled_set, write_pds_distilled_json  # noqa: E402

TINY = [
    "evaluate.students=rdistill-tiny-resnet",
    "evaluate.image_weights=random",
    "evaluate.text_encoder=clip:rdistill-tiny",
    "evaluate.image_size=32",
    "evaluate.epochs=2",
    "evaluate.eval_every=1",
    "evaluate.batch_size=32",
    "evaluate.runs=2",
    "evaluate.lr_image=0.1",
    "evaluate.lr_text=0.1",
    "evaluate.executor=local",
]
KEYS = {"IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean"}


def _sets(root, space):
    kj = write_toy_karpathy(root / "karpathy", {"train": 40, "val": 12, "test": 12}, seed=4, size=32)
    samples = real_pair_samples(kj, 24)
    dim = samples[0]["npy"].shape[0]
    write_distilled_set(
        root / "set", samples, shard_size=10, method="test", text_space=space, text_vectors=True, text_dim=dim
    )
    return kj, root / "set"


def _cli(*args):
    return main([*[x for s in TINY for x in ("--set", s)], *args, "--quiet"])  # the test's --set win


def _replace_member(tar_path, name, data):
    """Rewrite the tar at ``tar_path`` with member ``name``'s bytes replaced by ``data``."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert name in [m.name for m, _ in members]
    with tarfile.open(tar_path, "w") as tar:
        for m, blob in members:
            blob = data if m.name == name else blob
            m.size = len(blob)
            tar.addfile(m, io.BytesIO(blob))


def test_cli_writes_the_table_and_resumes(tmp_path, capsys):
    kj, subset = _sets(tmp_path, "clip:rdistill-tiny")
    out = tmp_path / "eval"
    assert _cli("--train", str(subset), "--eval-data", str(kj), "--output", str(out)) == 0
    printed = capsys.readouterr().out
    assert "random-subset-24" in printed and "epochs selected on val" in printed
    doc = json.loads((out / "eval.json").read_text())
    assert [(r["set"], r["kind"]) for r in doc["results"]] == [
        ("set", "distilled"),
        ("random-subset-24", "random-subset"),
    ]
    for r in doc["results"]:
        assert {"set", "student", "protocol", "select", "runs", "test", "test_std", "epochs", "curve"} <= set(r)
        assert r["protocol"] == "pds" and r["select"] == "val" and r["runs"] == 2 and len(r["epochs"]) == 2
        assert set(r["test"]) == KEYS and set(r["test_std"]) == KEYS
        assert [p["epoch"] for p in r["curve"]] == [0, 1, 2]
        assert all(set(p["val"]) == KEYS and set(p["test"]) == KEYS for p in r["curve"])
        assert all(e in (0, 1, 2) for e in r["epochs"])
    assert doc["results"][0]["text_side"] == "npy" and doc["results"][1]["text_side"] == "caption"
    html = (out / "eval.html").read_text()
    assert "<table>" in html and "<svg" in html and "random-subset-24" in html
    assert len(list((out / "cache" / "text").glob("*.npy"))) >= 2  # val and test captions, encoded once
    assert _cli("--train", str(subset), "--eval-data", str(kj), "--output", str(out)) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["runs_this_time"] == 0 and again["results"][0]["test"] == doc["results"][0]["test"]


def test_select_test_is_marked_and_a_foreign_text_space_is_refused(tmp_path, capsys):
    kj, subset = _sets(tmp_path, "clip:ViT-B-32/openai")
    code = _cli("--train", str(subset), "--eval-data", str(kj), "--output", str(tmp_path / "a"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "clip:ViT-B-32/openai" in err[0] and "clip:rdistill-tiny" in err[0] and "train_text=caption" in err[0]
    code = _cli(
        "--train",
        str(subset),
        "--eval-data",
        "toy",
        "--output",
        str(tmp_path / "b"),
        "--select",
        "test",
        "--set",
        "evaluate.train_text=caption",
        "--set",
        "evaluate.random_subset=false",
        "--set",
        "evaluate.runs=1",
        "--set",
        "evaluate.text_norm=raw",
    )
    assert code == 0
    doc = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert doc["results"][0]["text_side"] == "caption" and doc["results"][0]["text_unit"] is False  # text_norm=raw
    assert doc["select"] == "test" and "TEST split" in doc["select_note"]
    assert doc["eval_data"]["splits"]["test"] == {"images": 40, "captions": 200}  # --eval-data toy
    assert "TEST split" in (tmp_path / "b" / "eval.html").read_text()
    assert "SELECTED ON TEST" in capsys.readouterr().out


def test_missing_val_split_and_bad_set_are_one_line(tmp_path, capsys):
    kj = write_toy_karpathy(tmp_path / "k", {"train": 4, "test": 4}, seed=1, size=16)
    (tmp_path / "empty").mkdir()
    assert _cli("--train", str(tmp_path / "empty"), "--eval-data", str(kj), "--output", str(tmp_path / "o")) == 2
    assert "no val split" in capsys.readouterr().err
    kj2 = write_toy_karpathy(tmp_path / "k2", {"train": 4, "val": 4, "test": 4}, seed=1, size=16)
    assert _cli("--train", str(tmp_path / "empty"), "--eval-data", str(kj2), "--output", str(tmp_path / "o2")) == 2
    assert "no manifest.parquet" in capsys.readouterr().err


@pytest.mark.parametrize("records", [True, False])
def test_distilled_json_fallback_from_the_run_records(tmp_path, records):
    d = tmp_path / "distilled"
    d.mkdir()
    if records:
        (tmp_path / "store").mkdir()
        (tmp_path / "store" / "embed.json").write_text(
            json.dumps({"model": {"name": "ViT-L-14", "pretrained": "openai"}})
        )
        (tmp_path / "protos").mkdir()
        (tmp_path / "protos" / "prototypes.json").write_text(
            json.dumps({"embeddings": str(tmp_path / "store"), "config": {"embeddings": {"normalize": True}}})
        )
        (d / "synthesize.json").write_text(json.dumps({"prototypes": str(tmp_path / "protos")}))
    info = read_distilled_info(d)
    assert info["fallback"] is True
    assert info["text"]["space"] == ("clip:ViT-L-14/openai" if records else "unknown")
    # what the synthesis stage is to write: the same space, from the prototypes it painted
    write_pds_distilled_json(d, tmp_path / "protos", count=3, dim=768, image_format="png", image_size=224)
    written = read_distilled_info(d)
    assert "fallback" not in written and written["method"] == "pds" and written["text"]["vectors"] == "npy"
    assert written["text"]["space"] == info["text"]["space"] and written["text"]["dim"] == 768


def test_lors_protocol_with_bert_and_the_full_data_row(tmp_path):
    kj, subset = _sets(tmp_path, "none")
    code = _cli(
        "--train",
        str(subset),
        "--eval-data",
        str(kj),
        "--output",
        str(tmp_path / "l"),
        "--protocol",
        "lors",
        "--set",
        "evaluate.text_encoder=bert:rdistill-tiny",
        "--set",
        "evaluate.train_text=caption",
        "--set",
        "evaluate.full_data=true",
        "--set",
        "evaluate.random_subset=false",
        "--set",
        "evaluate.students=rdistill-tiny-vit",
        "--set",
        "evaluate.runs=1",
        "--set",
        "evaluate.epochs=1",
    )
    assert code == 0
    doc = json.loads((tmp_path / "l" / "eval.json").read_text())
    assert (
        doc["protocol"] == "lors" and doc["image_features"] == "pooled" and doc["text_encoder"] == "bert:rdistill-tiny"
    )
    rows = {r["set"]: r for r in doc["results"]}
    assert rows["full-data"]["pairs"] == 200 and rows["full-data"]["kind"] == "full-data"
    assert not rows["set"]["text_unit"]  # BERT CLS features are used raw, as LoRS does
    rec = json.loads(next((tmp_path / "l" / "runs").glob("set-*.json")).read_text())
    assert rec["image_dim"] == 64  # tiny ViT's pooled features, with a 32 -> 64 text head


def test_rerun_with_select_test_more_runs_and_an_added_set_reuses_the_finished_runs(tmp_path, capsys):
    """Epoch selection, the number of runs, the random-subset row and the list of sets are not result-defining:
    a rerun reuses every finished run (its record untouched) and trains only the missing ones. A second set of
    the same name (which renames the first in the table) does not rename its runs. What a run computes still
    refuses, and so does a set that changed, whose runs alone --overwrite redoes."""
    kj, subset = _sets(tmp_path, "clip:rdistill-tiny")
    out = tmp_path / "eval"
    fast = ["--set", "evaluate.epochs=1"]
    assert _cli("--train", str(subset), "--eval-data", str(kj), "--output", str(out), *fast) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "runs").glob("*.json")}
    assert len(before) == 4  # set and random-subset-24, 2 runs each
    other = tmp_path / "more" / "set"
    shutil.copytree(subset, other)
    tar = sorted((other / "shards").glob("*.tar"))[0]
    _replace_member(tar, "00000003.png", b"not a png")  # a broken image in a training set: skipped, counted
    more = ["--set", "evaluate.runs=3", "--set", "evaluate.random_subset=false", "--select", "test", *fast]
    assert _cli("--train", str(subset), str(other), "--eval-data", str(kj), "--output", str(out), *more) == 0
    doc = json.loads((out / "eval.json").read_text())
    assert doc["runs_this_time"] == 4 and doc["runs_reused"] == 2  # the set's 3rd run, the new set's 3
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "runs").glob("*.json")}
    assert {k: after[k] for k in before} == before and len(after) == 8
    rows = {r["set"]: r for r in doc["results"]}
    assert set(rows) == {f"{tmp_path.name}/set", "more/set"}
    assert all(r["select"] == "test" and r["runs"] == 3 and len(r["epochs"]) == 3 for r in rows.values())
    assert rows["more/set"]["skipped"] == {"corrupt_images": 1, "pairs": 1} and rows["more/set"]["pairs"] == 23
    assert rows[f"{tmp_path.name}/set"]["skipped"] == {"corrupt_images": 0, "pairs": 0}
    capsys.readouterr()
    # a setting that changes what a run computes is refused
    assert (
        _cli("--train", str(subset), "--eval-data", str(kj), "--output", str(out), "--set", "evaluate.lr_text=0.05")
        == 2
    )
    assert "lr_text: 0.1 -> 0.05" in capsys.readouterr().err
    # a set evaluated before that changed: refused; --overwrite redoes its runs only
    (subset / "distilled.json").write_text((subset / "distilled.json").read_text() + " ")
    args = ["--train", str(subset), str(other), "--eval-data", str(kj), "--output", str(out), *more]
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and str(subset.resolve()) in err and "distilled.json" in err
    assert _cli(*args, "--overwrite") == 0
    doc = json.loads((out / "eval.json").read_text())
    assert doc["runs_this_time"] == 3 and doc["runs_reused"] == 3
    redone = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "runs").glob("*.json")}
    changed_set = next(k.split("__")[0] for k in before if k.startswith("set-")) + "__"
    assert set(redone) == set(after)
    for k in after:  # the changed set's 3 runs redone, the other set's and the random subset's untouched
        assert (redone[k] != after[k]) == k.startswith(changed_set), k


def test_text_norm_chooses_unit_or_raw_caption_features(tmp_path):
    """Under pds the captions' features are unit vectors by default; text_norm=raw feeds the encoder's raw ones
    (the authors' choice), whose norms are not 1; under lors raw is the default."""
    from rdistill.config import load_config
    from rdistill.eval.driver import FeatureCache, _text_side, resolve_protocol
    from rdistill.eval.sets import TrainSet

    caps = ["a red circle on a white background", "a photo of a blue square", "green triangle, black backdrop"]
    ts = TrainSet("t", str(tmp_path), "random-subset", {}, np.zeros((3, 8, 8, 3), np.uint8), np.arange(3), caps)
    got = {}
    for protocol, encoder in (("pds", "clip:rdistill-tiny"), ("lors", "bert:rdistill-tiny")):
        for norm in ("auto", "unit", "raw"):
            cfg = load_config(
                None,
                [f"evaluate.protocol={protocol}", f"evaluate.text_encoder={encoder}", f"evaluate.text_norm={norm}"],
            )
            p = resolve_protocol(cfg)
            feats, unit, side = _text_side(ts, FeatureCache(tmp_path / "cache", cfg, p), cfg, p)
            assert side == "caption" and feats.shape[0] == 3
            got[protocol, norm] = (unit, np.linalg.norm(feats, axis=1))
    for protocol, default in (("pds", True), ("lors", False)):
        assert (
            got[protocol, "auto"][0] is default
            and got[protocol, "unit"][0] is True
            and got[protocol, "raw"][0] is False
        )
        assert np.allclose(got[protocol, "unit"][1], 1.0, atol=1e-5)
        assert not np.allclose(got[protocol, "raw"][1], 1.0, atol=1e-2)
        assert np.array_equal(got[protocol, "auto"][1], got[protocol, "unit" if default else "raw"][1])


def test_a_corrupt_npy_member_is_one_line_naming_the_shard_and_key(tmp_path, capsys):
    kj, subset = _sets(tmp_path, "clip:rdistill-tiny")
    tar = sorted((subset / "shards").glob("*.tar"))[1]
    with tarfile.open(tar) as t:
        key = sorted(m.name for m in t if m.name.endswith(".npy"))[0][: -len(".npy")]
    _replace_member(tar, f"{key}.npy", b"\x93NUMPY not an array")
    assert _cli("--train", str(subset), "--eval-data", str(kj), "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and tar.name in err[0] and f"sample {key}" in err[0] and ".npy" in err[0], err
