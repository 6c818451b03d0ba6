"""The embedding stage on a local Ray instance with the tiny random-init CLIP, on shards written here."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rdistill.config import load_config
from rdistill.dev.toydata import toy_samples, write_tar
from rdistill.errors import InputError
from rdistill.io.shards import decode_image
from rdistill.io.store import EmbeddingStore
from rdistill.models.clip import ClipEncoder, crop_transform, resolve_clip
from rdistill.stages.embed.driver import RunError, run_embed

ROOT = Path(__file__).resolve().parents[2]
TINY = ["embed.model=rdistill-tiny", "embed.pretrained=", "embed.batch_size=32", "embed.decode_batch=16",
        "progress=false"]  # fmt: skip


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def _image_ext(sample):
    return next(k for k in sample if k in ("jpg", "png", "webp"))


@pytest.fixture(scope="module")
def messy_shards(tmp_path_factory):
    """Five shards: two clean, one with every sample defect, one empty tar, one cut in half. Returns
    (dir, expected rows per part, expected skip counts, {key: image bytes} of the kept samples)."""
    d = tmp_path_factory.mktemp("shards")
    kept = {}
    s0, s1 = list(toy_samples(40, seed=1)), list(toy_samples(25, seed=2, start=100))
    write_tar(d / "a-0.tar", s0)
    write_tar(d / "a-1.tar", s1)
    for s in s0 + s1:
        kept[s["__key__"]] = s[_image_ext(s)]
    s2 = list(toy_samples(12, seed=3, start=200))
    s2[1] = {"__key__": s2[1]["__key__"], "jpg": b"\xff\xd8\xff\xe0 truncated jpeg", "txt": b"broken"}
    s2[2] = {"__key__": s2[2]["__key__"], "png": s2[2].get("png", s2[0][_image_ext(s2[0])])}  # no caption at all
    s2[3] = {k: v for k, v in s2[3].items() if k != "txt"}  # caption only in the json member: kept
    s2[4] = {"__key__": s2[4]["__key__"], "txt": b"caption without an image"}
    write_tar(d / "a-2.tar", s2)
    for i, s in enumerate(s2):
        if i not in (1, 2, 4):
            kept[s["__key__"]] = s[_image_ext(s)]
    write_tar(d / "a-3.tar", [])
    s4 = list(toy_samples(30, seed=5, start=300))
    write_tar(d / "a-4.tar", s4)
    kept.update({s["__key__"]: s[_image_ext(s)] for s in s4})
    data = (d / "a-4.tar").read_bytes()
    (d / "a-4.tar").write_bytes(data[: len(data) // 2])
    # a-4 is cut in half: the reader keeps the samples before the cut, so its row count is only bounded
    return d, [40, 25, 9, 0, None], kept


@pytest.fixture(scope="module")
def embedded(ray_local, messy_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "emb"
    return out, run_embed(str(messy_shards[0]), out, _cfg())


def test_embed_counts_skips_alignment_and_store(messy_shards, embedded):
    d, rows, kept = messy_shards
    out, summary = embedded
    assert summary["shards"] == 5 and summary["parts_done"] == 5 and not summary["failed"]
    parts = {p["part"]: p for p in summary["parts"]}
    for i, n in enumerate(rows):
        if n is not None:
            assert parts[i]["samples"] == n, i
    assert 0 < parts[4]["samples"] < 30
    assert parts[2]["skipped"] == {"corrupt_image": 1, "no_caption": 1, "no_image": 1}
    assert parts[3]["samples"] == 0
    assert parts[4]["skipped"].get("unreadable_tar") == 1
    total = summary["counts"]["skipped"]
    assert total["corrupt_image"] == 1 and total["unreadable_tar"] == 1
    assert summary["counts"]["samples"] == sum(p["samples"] for p in summary["parts"])
    assert summary["model"]["name"] == "rdistill-tiny" and summary["model"]["embed_dim"] == 64
    assert summary["this_run"]["samples_per_s"] > 0

    # row alignment: every stored row is the tiny CLIP's embedding of that key's own image and caption
    spec = resolve_clip("rdistill-tiny", "")
    enc, crop = ClipEncoder(spec), crop_transform(spec)
    for i in (0, 2, 4):
        meta = pq.read_table(out / "metadata" / f"metadata_{i}.parquet").to_pandas()
        img = np.load(out / "img_emb" / f"img_emb_{i}.npy")
        txt = np.load(out / "text_emb" / f"text_emb_{i}.npy")
        assert img.dtype == np.float16 and img.shape == (len(meta), 64) == txt.shape
        assert list(meta["index"]) == list(range(len(meta)))
        assert (meta["shard"] == str(d / f"a-{i}.tar")).all()
        ref_img = enc.encode_images(np.stack([crop(decode_image(kept[k])) for k in meta["key"]]))
        ref_txt = enc.encode_texts(list(meta["caption"]))
        np.testing.assert_allclose(img, ref_img, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(txt, ref_txt, rtol=2e-3, atol=2e-3)
    # vectors are raw, not normalised: the decoder needs their norms
    assert not np.allclose(np.linalg.norm(np.load(out / "img_emb" / "img_emb_0.npy").astype(np.float32), axis=1), 1)

    store = EmbeddingStore(str(out))
    assert store.num_rows == summary["counts"]["samples"] and store.dim == 64

    again = run_embed(str(d), out, _cfg())  # nothing left to do
    assert again["parts_this_run"] == 0 and again["counts"] == summary["counts"]


def test_failing_shard_fails_the_run_by_name_and_keeps_the_others(ray_local, messy_shards, tmp_path):
    d, _, _ = messy_shards
    spec = str(d) + "/{a-0,missing,a-1}.tar"
    out = tmp_path / "emb"
    with pytest.raises(RunError, match=r"1 shard\(s\) failed.*missing\.tar: shard not found"):
        run_embed(spec, out, _cfg("embed.shard_retries=1"))
    assert (out / "_done" / "part_0.json").exists() and (out / "_done" / "part_2.json").exists()
    assert not (out / "_done" / "part_1.json").exists() and not (out / "_SUCCESS").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts_done"] == 2 and "missing.tar" in summary["failed"][0]


def test_changed_model_or_shards_refused_without_overwrite(messy_shards, embedded, tmp_path):
    import shutil

    d, _, _ = messy_shards
    out = shutil.copytree(embedded[0], tmp_path / "emb")
    with pytest.raises(RunError, match="pass --overwrite"):
        run_embed(str(d / "a-0.tar"), out, _cfg())
    with pytest.raises(RunError, match="pass --overwrite"):
        run_embed(str(d), out, _cfg("embed.json_caption_field=title"))
    summary = run_embed(str(d / "a-0.tar"), out, _cfg(), overwrite=True)
    assert summary["counts"]["samples"] == 40 and summary["shards"] == 1
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy"]


def test_bad_input_and_model_errors_name_the_value(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        run_embed(str(tmp_path / "nowhere"), tmp_path / "o", _cfg())
    write_tar(tmp_path / "s.tar", toy_samples(2))
    with pytest.raises(InputError, match="unknown open_clip model 'ViT-Q-99'"):
        run_embed(str(tmp_path / "s.tar"), tmp_path / "o", _cfg("embed.model=ViT-Q-99"))
    with pytest.raises(InputError, match="'laion9b' is neither a pretrained tag of ViT-B-32"):
        run_embed(str(tmp_path / "s.tar"), tmp_path / "o", _cfg("embed.model=ViT-B-32", "embed.pretrained=laion9b"))


def _embed_cli(shards, out, *extra):
    return [sys.executable, "-m", "rdistill.embed", "--input", str(shards), "--output", str(out), "--quiet",
            *sum((["--set", s] for s in TINY + list(extra)), [])]  # fmt: skip


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(ray_local, tmp_path):
    d = tmp_path / "shards"
    for k in range(10):
        write_tar(d / f"s-{k:02d}.tar", toy_samples(60, seed=10 + k, start=k * 1000))
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_embed(str(d), full, _cfg())
    # the killed and the resumed run are separate drivers on the same cluster, as jobs resubmitted to one
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}

    killed = subprocess.run(_embed_cli(d, cut), env={**env, "RDISTILL_FAULT_KILL_AFTER": "embed:3"}, cwd=ROOT,
                            timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    done_before = sorted(p.name for p in (cut / "_done").glob("part_*.json"))
    assert len(done_before) == 3 and not (cut / "_SUCCESS").exists()
    stamps = {n: (cut / "_done" / n).stat().st_mtime_ns for n in done_before}
    subprocess.run(_embed_cli(d, cut), check=True, env=env, cwd=ROOT, timeout=300)

    summary = json.loads((cut / "summary.json").read_text())
    assert summary["parts_this_run"] == 10 - len(done_before)
    assert {n: (cut / "_done" / n).stat().st_mtime_ns for n in done_before} == stamps  # finished parts kept
    for k in range(10):
        a = pq.read_table(full / "metadata" / f"metadata_{k}.parquet").to_pydict()
        b = pq.read_table(cut / "metadata" / f"metadata_{k}.parquet").to_pydict()
        assert a == b
        for sub, name in (("img_emb", "img_emb"), ("text_emb", "text_emb")):
            x, y = np.load(full / sub / f"{name}_{k}.npy"), np.load(cut / sub / f"{name}_{k}.npy")
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3)
    assert not list(cut.rglob(".*.tmp"))
    assert not (cut / "_staging").exists()  # what the actors staged for the killed run's unfinished parts is gone
