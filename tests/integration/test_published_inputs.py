"""The engine and the full job on inputs written by the tools that publish image-text data: embedding stores from
clip-retrieval's writer (LAION's layout: padded part numbers, gaps, extra metadata columns) and WebDataset shards
from img2dataset's writer (failed downloads, empty captions, undecodable images, a shard where nothing downloaded).
"""

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rdistill.config import load_config
from rdistill.dev.planted import make_concepts, sample_pairs, score_recovery, write_store
from rdistill.dev.toydata import toy_samples
from rdistill.engine import run_prototypes
from rdistill.io.store import EmbeddingStore
from rdistill.stages.pds import main as pds_main
from tests.conftest import read_vectors
from tests.published import img2dataset_key, partitions, write_clip_retrieval_store, write_img2dataset_shards

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
SMALL_SYNTH = ["synthesize.shard_size=4", "synthesize.batch_size=4"]


def _argv(source, path, out, *overrides):
    sets = [x for s in [*overrides, *SMALL_SYNTH] for x in ("--set", s)]
    return ["--config", DEMO, source, str(path), "--output", str(out), "--quiet", *sets]


def _read_own_store(root, num_parts):
    img = np.concatenate([np.load(root / "img_emb" / f"img_emb_{i}.npy") for i in range(num_parts)])
    txt = np.concatenate([np.load(root / "text_emb" / f"text_emb_{i}.npy") for i in range(num_parts)])
    tables = [pq.read_table(root / "metadata" / f"metadata_{i}.parquet") for i in range(num_parts)]
    cols = {c: sum((t[c].to_pylist() for t in tables), []) for c in tables[0].column_names}
    return img, txt, cols


def test_engine_on_clip_retrieval_store_equals_own_layout(tmp_path):
    concepts = make_concepts(20, 64, noise=0.6, seed=11)
    own = tmp_path / "own"
    write_store(own, concepts, 6000, rows_per_part=2000, seed=12)
    img, txt, cols = _read_own_store(own, 3)
    # the same rows, in the same order, through clip-retrieval's writer: 12 partitions of other sizes, 2 of them
    # empty (no files: gaps in 00 .. 11), metadata from the samples' JSON with more columns than key
    parts, n = partitions([700, 450, 600, None, 520, 480, 610, 530, None, 700, 750, 660])
    assert n == len(img)
    metadata = [
        {"key": k, "url": f"https://example.invalid/{k}.jpg", "status": "success", "error_message": None,
         "width": 256, "height": 256, "concept": c}
        for k, c in zip(cols["key"], cols["concept"])
    ]  # fmt: skip
    published = tmp_path / "published"
    write_clip_retrieval_store(published, img, txt, cols["caption"], metadata, parts, 12,
                               image_paths=[f"{k}.jpg" for k in cols["key"]])  # fmt: skip
    assert (
        not (published / "img_emb" / "img_emb_03.npy").exists() and (published / "img_emb" / "img_emb_11.npy").exists()
    )

    cfg = load_config(None, ["progress=false", "cluster.num_pairs=20"])
    s_own = run_prototypes(str(own), tmp_path / "out-own", cfg)
    s_pub = run_prototypes(str(published), tmp_path / "out-pub", cfg)
    t_own = pq.read_table(tmp_path / "out-own" / "prototypes.parquet")
    t_pub = pq.read_table(tmp_path / "out-pub" / "prototypes.parquet")

    score_own = score_recovery(read_vectors(t_own, "image_embedding"), read_vectors(t_own, "text_embedding"), concepts)
    score_pub = score_recovery(read_vectors(t_pub, "image_embedding"), read_vectors(t_pub, "text_embedding"), concepts)
    assert score_pub["recovered"] == 1.0 and score_pub["mispaired"] == 0
    assert score_pub == pytest.approx(score_own, abs=1e-6)

    # Same rows in the same global order: the prune cut, the k-means sample (drawn by global row id), the clusters,
    # the matching and the retrieved captions are identical. The prototypes are not bit-identical: they are sums
    # over blocks, and blocks follow part boundaries, which differ between the layouts (seen: 7e-8 apart).
    assert s_pub["input"]["parts"] == 10 and s_own["input"]["parts"] == 3
    assert s_pub["counts"] == s_own["counts"]  # rows, pruned, kept, k-means sample
    assert s_pub["match"]["lap_objective"] == s_own["match"]["lap_objective"]
    exact = ["id", "image_cluster", "text_cluster", "image_cluster_size", "text_cluster_size", "shared_pairs",
             "pairless", "refilled", "caption_row", "caption", "caption_key"]  # fmt: skip
    assert t_pub.select(exact).equals(t_own.select(exact))
    for col in ("image_embedding", "text_embedding"):
        np.testing.assert_allclose(read_vectors(t_pub, col), read_vectors(t_own, col), rtol=0, atol=1e-6)
    for col in ("alignment", "caption_similarity", "image_norm", "text_norm"):
        np.testing.assert_allclose(t_pub[col].to_numpy(), t_own[col].to_numpy(), rtol=0, atol=1e-6)

    # captions and keys come from the clip-retrieval store's columns: "key" (detected before image_path), "caption"
    keys, captions = EmbeddingStore(str(published)).lookup(t_pub["caption_row"].to_numpy())
    assert t_pub["caption_key"].to_pylist() == keys and t_pub["caption"].to_pylist() == captions
    assert not any(k.endswith(".jpg") for k in keys)


@pytest.fixture(scope="module")
def laion_style_store(tmp_path_factory):
    """A planted 64-d store (the tiny decoder's embedding size) through clip-retrieval's writer with LAION-5B's
    four-digit part numbers and gaps. Returns (root, captions)."""
    root = tmp_path_factory.mktemp("laion") / "store"
    concepts = make_concepts(10, 64, noise=0.6, seed=21)
    parts, n = partitions([300, None, 250, None, None, 400, 350, None, 200])
    pairs = sample_pairs(concepts, n, seed=22)
    keys = [f"{i:09d}" for i in range(n)]
    metadata = [{"key": k, "url": f"https://example.invalid/{k}.jpg", "status": "success"} for k in keys]
    img, txt = pairs.img_emb.astype(np.float16), pairs.txt_emb.astype(np.float16)
    paths = [f"{k}.jpg" for k in keys]
    write_clip_retrieval_store(root, img, txt, pairs.captions, metadata, parts, 2314, image_paths=paths)
    assert (root / "metadata" / "metadata_0005.parquet").exists()
    return root, pairs.captions


def test_job_on_four_digit_laion_style_store(ray_local, laion_style_store, tmp_path):
    root, captions = laion_style_store
    out = tmp_path / "out"
    m = 8
    assert pds_main(_argv("--embeddings", root, out, f"cluster.num_pairs={m}")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["prototypes", "synthesize"]  # no embed stage with --embeddings
    assert summary["prototypes"]["counts"]["rows"] == len(captions)
    manifest = pq.read_table(out / "distilled" / "manifest.parquet")
    assert manifest.num_rows == m == summary["synthesize"]["images"]
    assert manifest["id"].to_pylist() == list(range(m))
    assert set(manifest["caption"].to_pylist()) <= set(captions)


# img2dataset output: shards 0-2 are good but for failed downloads (in the .parquet, not in the tar) and empty
# captions ("" from the input, or a null); in shard 3 every download failed (an empty tar); shard 4's images are all
# undecodable (img2dataset passes bytes on undecoded with --disable_all_reencoding True).
GOOD_SHARDS, PER_SHARD, FAILED, NO_CAPTION = 3, 24, (2, 9, 17), (5, 13)
CORRUPT = 6


@pytest.fixture(scope="module")
def img2dataset_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2dataset") / "shards"
    shards, good_keys = [], []
    for s in range(GOOD_SHARDS):
        samples = []
        for i, toy in enumerate(toy_samples(PER_SHARD, seed=30 + s, formats=("jpg",))):
            key = img2dataset_key(s, i)
            caption = toy["txt"].decode()
            if i in FAILED:
                samples.append((key, None, caption))
                continue
            if i in NO_CAPTION:
                caption = "" if i == NO_CAPTION[0] else None
            else:
                good_keys.append(key)
            samples.append((key, toy["jpg"], caption))
        shards.append(samples)
    shards.append([(img2dataset_key(3, i), None, f"a caption {i}") for i in range(8)])
    rng = np.random.default_rng(5)
    shards.append([(img2dataset_key(4, i), rng.bytes(500), f"a caption {i}") for i in range(CORRUPT)])
    stats = write_img2dataset_shards(root, shards)
    assert [s["successes"] for s in stats] == [PER_SHARD - len(FAILED)] * GOOD_SHARDS + [0, CORRUPT]
    assert sorted(p.name for p in root.iterdir())[:3] == ["00000.parquet", "00000.tar", "00000_stats.json"]
    return root, good_keys


def test_job_on_img2dataset_shards(ray_local, img2dataset_output, tmp_path):
    root, good_keys = img2dataset_output
    out = tmp_path / "out"
    m = 8
    assert pds_main(_argv("--input", root, out, f"cluster.num_pairs={m}", "embed.batch_size=32")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["embed", "prototypes", "synthesize"]
    assert all(s["status"] == "ran" for s in summary["stages"].values())

    embed = summary["embed"]
    assert embed["shards"] == GOOD_SHARDS + 2  # the .parquet and _stats.json beside the tars are not shards
    assert embed["counts"]["samples"] == len(good_keys) == GOOD_SHARDS * (PER_SHARD - len(FAILED) - len(NO_CAPTION))
    # img2dataset's tar for a shard where every download failed is well formed but has no member: "empty_shard"
    skipped = {"corrupt_image": CORRUPT, "no_caption": GOOD_SHARDS * len(NO_CAPTION), "empty_shard": 1}
    assert embed["counts"]["skipped"] == skipped
    parts = {p["part"]: p for p in embed["parts"]}
    assert parts[3]["samples"] == 0 and parts[3]["skipped"] == {"empty_shard": 1}
    assert parts[4]["samples"] == 0 and parts[4]["skipped"] == {"corrupt_image": CORRUPT}

    # the store holds exactly the good samples, under img2dataset's keys; the two shards without any give empty parts
    store = EmbeddingStore(str(out / "embeddings"))
    assert store.num_rows == len(good_keys) and len(store.empty_parts) == 2
    assert store.lookup(np.arange(store.num_rows))[0] == good_keys

    assert summary["prototypes"]["prototypes"]["count"] == m
    manifest = pq.read_table(out / "distilled" / "manifest.parquet")
    assert manifest.num_rows == m == summary["synthesize"]["images"]
    images = []
    for path in sorted((out / "distilled" / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            images += [n for n in tar.getnames() if n.endswith(".png")]
    assert len(images) == m


def test_distill_on_img2dataset_shards(img2dataset_output, tmp_path):
    """``rdistill.distill --input`` on img2dataset's shards: the good samples are the real pairs, and what the shards
    could not give is counted (no caption, the empty tar, the undecodable images) in the summary."""
    from rdistill.methods.driver import main as distill_main

    root, good_keys = img2dataset_output
    out = tmp_path / "distilled"
    argv = ["--config", DEMO, "--method", "covmatch", "--input", str(root), "--num-pairs", "4", "--output", str(out),
            "--quiet", "--set", "distill.covmatch.iterations=2", "--set", "distill.write_init=false"]  # fmt: skip
    assert distill_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"no_caption": GOOD_SHARDS * len(NO_CAPTION), "empty_shard": 1,
                                  "corrupt_images": CORRUPT, "pairs": CORRUPT}, summary["skipped"]  # fmt: skip
    assert summary["real_pairs"] == len(good_keys)
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 4
