"""The synthesis stage on a local Ray instance with the tiny random-init unCLIP pipeline."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rdistill.config import load_config
from rdistill.engine.driver import run_prototypes
from rdistill.errors import RunError
from rdistill.stages.synthesize.driver import run_synthesize

ROOT = Path(__file__).resolve().parents[2]
M = 10
TINY = ["synthesize.model=rdistill-tiny", "synthesize.steps=2", "synthesize.image_size=48",
        "synthesize.shard_size=4", "progress=false"]  # fmt: skip

pytest.importorskip("diffusers")


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def _members(tar_path):
    out = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            out[m.name] = tar.extractfile(m).read()
    return out


def _pixels(out_dir):
    from PIL import Image

    images = {}
    for tar_path in sorted((Path(out_dir) / "shards").glob("*.tar")):
        for name, data in _members(tar_path).items():
            if name.endswith(".png"):
                images[name] = np.asarray(Image.open(io.BytesIO(data))).astype(int)
    return images


@pytest.fixture(scope="module")
def prototypes(planted_store, tmp_path_factory):
    root, _ = planted_store
    out = tmp_path_factory.mktemp("protos") / "p"
    run_prototypes(str(root), out, load_config(None, [f"cluster.num_pairs={M}", "progress=false"]))
    return out


@pytest.fixture(scope="module")
def painted(ray_local, prototypes, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "s"
    return out, run_synthesize(prototypes, out, _cfg("synthesize.batch_size=4", "synthesize.pool.actors=1"))


def test_one_image_per_prototype_with_caption_text_embedding_and_metadata(prototypes, painted):
    out, summary = painted
    protos = pq.read_table(prototypes / "prototypes.parquet").to_pandas()
    assert summary["images"] == M and summary["shards"] == 3 and summary["this_run"]["images_per_s"] > 0
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["distilled-00000.tar", "distilled-00001.tar", "distilled-00002.tar"]
    seen = []
    for name in shards:
        members = _members(out / "shards" / name)
        keys = sorted({m.split(".")[0] for m in members})
        for key in keys:
            pid = int(key)
            seen.append(pid)
            row = protos[protos["id"] == pid].iloc[0]
            assert sorted(m for m in members if m.startswith(key + ".")) == [f"{key}.{e}" for e in
                                                                            ("json", "npy", "png", "txt")]  # fmt: skip
            assert members[f"{key}.txt"].decode() == row["caption"]
            text = np.load(io.BytesIO(members[f"{key}.npy"]))
            np.testing.assert_array_equal(text, np.asarray(row["text_embedding"], dtype=np.float32))
            meta = json.loads(members[f"{key}.json"])
            assert meta["id"] == pid and meta["image_cluster"] == row["image_cluster"]
            assert meta["shared_pairs"] == row["shared_pairs"] and meta["model"] == "rdistill-tiny"
    assert sorted(seen) == list(range(M))  # exactly one image per prototype
    images = _pixels(out)
    assert all(im.shape == (48, 48, 3) and im.std() > 0 for im in images.values())
    assert len({im.tobytes() for im in images.values()}) == M  # each prototype paints its own image
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    assert list(manifest["id"]) == list(range(M)) and manifest["seed"].nunique() == M
    again = run_synthesize(prototypes, out, _cfg("synthesize.batch_size=4"))
    assert again["this_run"]["images"] == 0
    with pytest.raises(RunError, match="other prototypes or settings"):
        run_synthesize(prototypes, out, _cfg("synthesize.negative_prompt=blurry"))


def test_images_do_not_depend_on_batch_size_or_actor_count(prototypes, painted, tmp_path):
    out, _ = painted
    other = tmp_path / "other"
    run_synthesize(prototypes, other, _cfg("synthesize.batch_size=3", "synthesize.pool.actors=2",
                                           "synthesize.pool.cpus_per_actor=0.5"))  # fmt: skip
    a, b = _pixels(out), _pixels(other)
    assert a.keys() == b.keys()
    # same seeds, same draws; batched float32 math may differ in the last bits, so allow one grey level
    assert max(int(np.abs(a[k] - b[k]).max()) for k in a) <= 1


def test_kill_and_resume_paints_only_the_missing_shards(ray_local, prototypes, painted, tmp_path):
    out, _ = painted
    cut = tmp_path / "cut"
    cli = [sys.executable, "-m", "rdistill.synthesize", "--prototypes", str(prototypes), "--output", str(cut),
           "--quiet", *sum((["--set", s] for s in TINY + ["synthesize.batch_size=4"]), [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    killed = subprocess.run(cli, env={**env, "RDISTILL_FAULT_KILL_AFTER": "synthesize:1"}, cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in (cut / "shards").glob("*.tar")] == ["distilled-00000.tar"]
    stamp = (cut / "shards" / "distilled-00000.tar").stat().st_mtime_ns
    subprocess.run(cli, env=env, cwd=ROOT, timeout=300, check=True)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["this_run"]["images"] == M - 4 and summary["this_run"]["shards"] == 2
    assert (cut / "shards" / "distilled-00000.tar").stat().st_mtime_ns == stamp
    a, b = _pixels(out), _pixels(cut)
    assert a.keys() == b.keys() and max(int(np.abs(a[k] - b[k]).max()) for k in a) <= 1
    assert list(pq.read_table(cut / "manifest.parquet").column("id").to_pylist()) == list(range(M))
    assert not list(cut.rglob(".*.tmp"))


def test_dimension_mismatch_and_bad_prototypes_fail_clearly(prototypes, tmp_path):
    import pyarrow as pa

    table = pq.read_table(prototypes / "prototypes.parquet")
    narrow = table.set_column(
        table.schema.get_field_index("image_embedding"),
        "image_embedding",
        pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(table.num_rows * 32, np.float32)), 32),
    )
    pq.write_table(narrow, tmp_path / "narrow.parquet")
    with pytest.raises(RunError, match="prototypes are 32-d but decoder rdistill-tiny takes 64-d"):
        run_synthesize(tmp_path / "narrow.parquet", tmp_path / "o", _cfg())
    pq.write_table(table.drop_columns(["caption"]), tmp_path / "nocap.parquet")
    with pytest.raises(RunError, match="nocap.parquet: missing column caption"):
        run_synthesize(tmp_path / "nocap.parquet", tmp_path / "o", _cfg())
    with pytest.raises(RunError, match="prototypes not found"):
        run_synthesize(tmp_path / "nowhere", tmp_path / "o", _cfg())


def test_prototypes_recomputed_in_place_are_not_resumed_onto(prototypes, painted, tmp_path):
    import shutil

    import pyarrow as pa

    p = shutil.copytree(prototypes, tmp_path / "p")
    out = shutil.copytree(painted[0], tmp_path / "out")
    record = json.loads((out / "synthesize.json").read_text())
    (out / "synthesize.json").write_text(json.dumps({**record, "prototypes": str(p)}))
    assert run_synthesize(p, out, _cfg())["this_run"]["images"] == 0  # same prototypes: complete
    table = pq.read_table(p / "prototypes.parquet")
    captions = table.column("caption").to_pylist()
    captions[3] = "a different caption"
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions))
    pq.write_table(table, p / "prototypes.parquet")
    with pytest.raises(RunError, match="other prototypes or settings"):
        run_synthesize(p, out, _cfg())
