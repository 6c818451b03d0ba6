"""The coreset command on a store laid out as the embedding stage writes it, pointing at real toy shards."""

import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdistill.baselines.driver import main as coreset_main
from rdistill.baselines.driver import run_coreset
from rdistill.baselines.select import herding, kcenter, pair_features, row_priority
from rdistill.config import load_config
from rdistill.dev.toydata import write_toy_shards
from rdistill.eval.sets import read_distilled_set

D = 16


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _members(path):
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3 toy shards of 40 samples and a store of 3 parts (key, caption, shard, index as the embed stage writes
    them); row 17 has a zero image vector. Returns (root, img, txt, shard members by URL)."""
    root = tmp_path_factory.mktemp("coreset")
    shards = write_toy_shards(root / "shards", 3, 40, seed=5, size=24)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(120, D)).astype(np.float32)
    txt = (img + rng.normal(scale=rng.uniform(0.2, 2.0, size=(120, 1)), size=(120, D))).astype(np.float32)
    img[17] = 0
    members = {}
    for p, shard in enumerate(shards):
        m = _members(shard)
        members[str(shard)] = m
        keys = sorted(m)
        rows = slice(40 * p, 40 * (p + 1))
        for sub, name, arr in (("img_emb", "img_emb", img), ("text_emb", "text_emb", txt)):
            (root / "store" / sub).mkdir(parents=True, exist_ok=True)
            np.save(root / "store" / sub / f"{name}_{p}.npy", arr[rows].astype(np.float16))
        (root / "store" / "metadata").mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "key": keys,
                "caption": [m[k]["txt"].decode() for k in keys],
                "shard": [str(shard)] * 40,
                "index": np.arange(40),
            }
        )
        pq.write_table(table, root / "store" / "metadata" / f"metadata_{p}.parquet")
    # what the store holds: float16
    img16, txt16 = img.astype(np.float16).astype(np.float32), txt.astype(np.float16).astype(np.float32)
    return root / "store", img16, txt16, members


def _cfg(method, m=8, pool=100_000):
    return load_config(
        None,
        [
            f"coreset.method={method}",
            f"cluster.num_pairs={m}",
            f"coreset.pool={pool}",
            "embeddings.block_rows=1024",
            "seed=3",
            "coreset.shard_size=5",
        ],
    )


def _expected(method, img, txt, m, pool=100_000, protos=None):
    valid = np.flatnonzero(np.linalg.norm(img, axis=1) > 0)
    rows = np.arange(len(img))[valid]
    iu, tu = _unit(img[valid]), _unit(txt[valid])
    if method == "random":
        return rows[np.lexsort((rows, row_priority(rows, 3)))[:m]]
    if method == "clip-score":
        return rows[np.lexsort((rows, -np.einsum("ij,ij->i", iu, tu)))[:m]]
    if method == "text-prototype":
        return rows[np.argmax(protos @ tu.T, axis=1)]
    cand = np.lexsort((rows, row_priority(rows, 3)))[:pool]
    feats = pair_features(iu, tu)
    if method == "herding":
        return rows[cand][herding(feats[cand], m, target=feats.astype(np.float64).mean(0))]
    return rows[cand][kcenter(feats[cand], m, seed=3)]


@pytest.mark.parametrize(
    "method,pool",
    [("random", 100_000), ("clip-score", 100_000), ("herding", 100_000), ("herding", 30), ("kcenter", 30)],
)
def test_selection_equals_the_in_memory_reference_and_images_are_the_source_ones(store, tmp_path, method, pool):
    root, img, txt, members = store
    out = tmp_path / "cs"
    summary = run_coreset(str(root), out, _cfg(method, pool=pool))
    want = _expected(method, img, txt, 8, pool)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["row"] for r in manifest] == want.tolist()
    assert 17 not in want and summary["counts"]["invalid"] == 1
    assert (
        summary["images_copied"] and json.loads((out / "distilled.json").read_text())["method"] == f"coreset:{method}"
    )
    # every copied image and caption is the one of the source shard and key the store's metadata names
    written = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        written.update(_members(tar))
    for r in manifest:
        src = members[r["source_shard"]][r["source_key"]]
        ext = next(e for e in ("jpg", "png", "webp") if e in src)
        assert written[r["key"]][ext] == src[ext]
        assert written[r["key"]]["txt"] == src["txt"]
    ts = read_distilled_set(out, 16)
    assert ts.num_pairs == 8 and ts.vectors is None and ts.info["text"]["space"] == "none"


def test_text_prototype_retrieval_and_cli_errors(store, tmp_path, capsys):
    root, img, txt, _ = store
    rng = np.random.default_rng(9)
    protos = _unit(rng.normal(size=(5, D))).astype(np.float32)
    (tmp_path / "protos").mkdir()
    pq.write_table(
        pa.table({"id": np.arange(5), "text_embedding": list(protos), "image_embedding": list(protos)}),
        tmp_path / "protos" / "prototypes.parquet",
    )
    run_coreset(str(root), tmp_path / "tp", _cfg("text-prototype", m=5), prototypes=str(tmp_path / "protos"))
    rows = [r["row"] for r in pq.read_table(tmp_path / "tp" / "manifest.parquet").to_pylist()]
    assert rows == _expected("text-prototype", img, txt, 5, protos=protos).tolist()
    code = coreset_main(
        [
            "--method",
            "image-prototype",
            "--embeddings",
            str(root),
            "--num-pairs",
            "4",
            "--output",
            str(tmp_path / "ip"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--prototypes" in err[0]
    code = coreset_main(
        ["--method", "random", "--embeddings", str(root), "--num-pairs", "500", "--output", str(tmp_path / "big")]
    )
    assert code == 2 and "500 is more than the store's 119 valid pairs" in capsys.readouterr().err


def test_store_without_shard_column_gets_a_manifest_of_keys(store, tmp_path):
    root, _, _, _ = store
    laion = tmp_path / "laion"
    for sub in ("img_emb", "text_emb"):
        (laion / sub).mkdir(parents=True)
        for p in range(3):
            (laion / sub / f"{sub}_{p}.npy").write_bytes((root / sub / f"{sub}_{p}.npy").read_bytes())
    (laion / "metadata").mkdir()
    for p in range(3):
        t = pq.read_table(root / "metadata" / f"metadata_{p}.parquet")
        t = pa.table(
            {
                "key": t.column("key"),
                "caption": t.column("caption"),
                "url": [f"http://x/{k}.jpg" for k in t.column("key").to_pylist()],
            }
        )
        pq.write_table(t, laion / "metadata" / f"metadata_{p}.parquet")
    summary = run_coreset(str(laion), tmp_path / "out", _cfg("random"))
    assert not summary["images_copied"] and "no shard column" in summary["message"]
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(manifest) == 8 and all(r["url"].startswith("http://x/") for r in manifest)
    assert not (tmp_path / "out" / "shards").exists()


def test_sample_found_by_position_when_keys_differ(store, tmp_path):
    """A metadata key that is not the tar key (a writer that renames keys) falls back on the ``index``."""
    root, _, _, members = store
    moved = tmp_path / "store"
    import shutil

    shutil.copytree(root, moved)
    path = moved / "metadata" / "metadata_0.parquet"
    t = pq.read_table(path)
    t = t.set_column(0, "key", pa.array([f"renamed-{k}" for k in t.column("key").to_pylist()]))
    pq.write_table(t, path)
    run_coreset(str(moved), tmp_path / "o", _cfg("random", m=30))
    manifest = pq.read_table(tmp_path / "o" / "manifest.parquet").to_pylist()
    written = {}
    for tar in sorted((tmp_path / "o" / "shards").glob("*.tar")):
        written.update(_members(tar))
    firsts = [r for r in manifest if r["source_key"].startswith("renamed-")]
    assert firsts
    for r in firsts:
        src = members[r["source_shard"]][sorted(members[r["source_shard"]])[r["source_index"]]]
        assert written[r["key"]]["txt"] == src["txt"]


def test_a_shard_first_sample_records_index_0(store, tmp_path):
    root, _, _, _ = store
    run_coreset(str(root), tmp_path / "all", _cfg("random", m=119))  # every valid row, the first of each shard too
    manifest = pq.read_table(tmp_path / "all" / "manifest.parquet").to_pylist()
    assert {r["row"] for r in manifest} >= {0, 40, 80}
    assert all(r["source_index"] == r["row"] % 40 for r in manifest)


def test_prototypes_without_the_embedding_column_are_one_line(store, tmp_path, capsys):
    root, _, _, _ = store
    (tmp_path / "p").mkdir()
    pq.write_table(
        pa.table({"id": [0, 1], "image_embedding": [[1.0, 0.0], [0.0, 1.0]]}), tmp_path / "p" / "prototypes.parquet"
    )
    args = ["--embeddings", str(root), "--num-pairs", "2", "--prototypes", str(tmp_path / "p")]
    assert coreset_main(["--method", "text-prototype", *args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prototypes.parquet" in err[0] and "no column 'text_embedding'" in err[0], err
    (tmp_path / "p" / "prototypes.parquet").write_bytes(b"not parquet")
    assert coreset_main(["--method", "image-prototype", *args, "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable parquet file" in err[0], err


def test_fetching_images_holds_only_the_selected_samples(tmp_path):
    """A shard of 30 samples with 300 kB members each: fetching one sample's image never holds the others'."""
    import io
    import tracemalloc

    from rdistill.baselines.driver import _fetch_images

    shard = tmp_path / "big.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(30):
            for ext, data in (("jpg", bytes([i]) * 1000), ("bin", bytes(300_000)), ("txt", b"c")):
                ti = tarfile.TarInfo(f"{i:04d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    tracemalloc.start()
    got = _fetch_images([{"key": "0007", "shard": str(shard), "index": 7}], ("jpg",))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [(bytes([7]) * 1000, "jpg")]
    assert peak < 3_000_000, peak  # the whole shard is 9 MB
