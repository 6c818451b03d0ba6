"""Karpathy-style eval data, eval shards with several captions, and the Karpathy -> WebDataset converter."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdistill.eval.convert import convert_karpathy
from rdistill.eval.convert import main as convert_main
from rdistill.eval.toy import write_toy_karpathy
from rdistill.io.karpathy import EvalDataError, load_eval_data, load_images, read_eval_shards, read_karpathy
from rdistill.io.shards import SampleFormat, ShardStats, iter_samples


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("karpathy")
    return write_toy_karpathy(root, {"train": 6, "val": 4, "test": 5}, seed=3, size=40)


def test_read_karpathy_splits_and_captions(toy):
    data = read_karpathy(toy)
    doc = json.loads(toy.read_text())
    assert set(data.splits) == {"train", "val", "test"}
    test = data.splits["test"]
    entries = [im for im in doc["images"] if im["split"] == "test"]
    assert test.num_images == 5 and len(test.captions) == 25
    for i, im in enumerate(entries):
        assert [test.captions[t] for t in test.img2txt[i]] == [s["raw"] for s in im["sentences"]]
        assert test.paths[i] == str(toy.parent / "images" / im["filename"])
    assert np.array_equal(test.txt2img, np.repeat(np.arange(5), 5))


def test_load_images_is_a_bicubic_square_resize(toy):
    split = read_karpathy(toy).splits["val"]
    got = load_images(split, 24)
    assert got.shape == (4, 24, 24, 3) and got.dtype == np.uint8
    want = np.asarray(Image.open(split.paths[2]).convert("RGB").resize((24, 24), Image.BICUBIC))
    assert np.array_equal(got[2], want)


def test_restval_is_train_and_bad_entries_are_named(tmp_path, toy):
    doc = json.loads(toy.read_text())
    doc["images"][0]["split"] = "restval"
    good = tmp_path / "restval.json"
    good.write_text(json.dumps(doc))
    assert read_karpathy(good, toy.parent).splits["train"].num_images == 6
    cases = {
        "no key 'sentences'": lambda d: d["images"][3].pop("sentences"),
        "images[2]: split 'dev'": lambda d: d["images"][2].update(split="dev"),
        "images[1].sentences[0]: no non-empty 'raw'": lambda d: d["images"][1]["sentences"][0].pop("raw"),
        "000004.png not found": lambda d: (toy.parent / "images" / "000004.png").rename(tmp_path / "x.png"),
    }
    for message, spoil in cases.items():
        d = json.loads(toy.read_text())
        spoil(d)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(d))
        with pytest.raises(EvalDataError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
            read_karpathy(bad, toy.parent)
        assert str(bad) in str(e.value)
        if (tmp_path / "x.png").exists():
            (tmp_path / "x.png").rename(toy.parent / "images" / "000004.png")
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(EvalDataError, match="not valid JSON"):
        read_karpathy(tmp_path / "notjson.json")


def test_converter_per_caption_pairs_read_by_the_embed_reader(tmp_path, toy):
    summary = convert_karpathy(toy, None, tmp_path / "pairs", splits=("train",), shard_size=7)
    assert summary["splits"]["train"]["samples"] == 30 and len(summary["splits"]["train"]["shards"]) == 5
    split = read_karpathy(toy).splits["train"]
    got = []
    for name in summary["splits"]["train"]["shards"]:
        got += list(iter_samples(str(tmp_path / "pairs" / name), SampleFormat(), ShardStats()))
    assert [s.caption for s in got] == split.captions
    files = {i: open(p, "rb").read() for i, p in enumerate(split.paths)}
    assert all(s.image == files[split.txt2img[k]] for k, s in enumerate(got))
    assert (tmp_path / "pairs" / "_SUCCESS").exists()


def test_converter_per_image_shards_equal_the_karpathy_file(tmp_path, toy):
    assert convert_main(["--karpathy", str(toy), "--output", str(tmp_path / "ev"), "--per-image", "--quiet"]) == 0
    shards = read_eval_shards(str(tmp_path / "ev"))
    karpathy = read_karpathy(toy)
    assert set(shards.splits) == {"val", "test"}
    for name in ("val", "test"):
        a, b = shards.splits[name], karpathy.splits[name]
        assert a.captions == b.captions and np.array_equal(a.txt2img, b.txt2img)
        assert np.array_equal(load_images(a, 16), load_images(b, 16))
    assert load_eval_data(str(tmp_path / "ev")).kind == "shards"


def test_eval_shards_bad_samples_are_named(tmp_path, capsys):
    path = tmp_path / "bad" / "eval-00000.tar"
    path.parent.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", buf.getvalue()), ("a.json", b'{"split": "test"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(EvalDataError, match=r"eval-00000.tar: sample a: no captions"):
        read_eval_shards(str(path.parent))
    code = convert_main(["--karpathy", str(tmp_path / "missing.json"), "--output", str(tmp_path / "o")])
    assert code == 2 and "missing.json: file not found" in capsys.readouterr().err


def test_corrupt_images_are_skipped_in_training_pairs_and_an_error_in_eval_splits(tmp_path):
    """A broken train image drops its image and its captions' pairs from the full-data and random-subset sets,
    counted; in a val or test split it stays an error naming the file."""
    from rdistill.eval.sets import pairs_from_split

    kj = write_toy_karpathy(tmp_path, {"train": 6, "val": 3, "test": 3}, seed=2, size=16)
    data = read_karpathy(kj)
    train, val = data.splits["train"], data.splits["val"]
    Path(train.paths[2]).write_bytes(b"not a png")
    Path(val.paths[1]).write_bytes(b"\x89PNG broken")
    full = pairs_from_split(train, 16, "full-data", "full-data")
    assert full.skipped == {"corrupt_images": 1, "pairs": 5}
    assert full.num_pairs == 25 and len(full.images) == 5 and full.info["count"] == 25
    want_caps = [c for c, i in zip(train.captions, train.txt2img) if i != 2]
    assert full.captions == want_caps
    # every pair still points at its own image
    own = {i: load_images(train, 16, rows=np.array([i]))[0] for i in (0, 1, 3, 4, 5)}
    kept = [int(i) for i in train.txt2img if i != 2]
    assert all(np.array_equal(full.images[full.pair_image[j]], own[i]) for j, i in enumerate(kept))
    sub = pairs_from_split(train, 16, "random-subset-30", "random-subset", pairs=30, seed=0)
    assert sub.skipped == {"corrupt_images": 1, "pairs": 5} and sub.num_pairs == 25
    with pytest.raises(EvalDataError, match=re.escape(val.paths[1]) + ".*cannot be decoded"):
        load_images(val, 16)
    with pytest.raises(EvalDataError, match="cannot be decoded"):
        load_images(train, 16)
