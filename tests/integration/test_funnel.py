"""The embedding stage without the driver funnel: the actors stage what they embed, a task per part writes it, and
the driver receives only fragment rows (issue 10, item 7)."""

import json
import shutil

import numpy as np
import pytest

from rdistill.config import load_config
from rdistill.dev.toydata import toy_samples, write_tar
from rdistill.errors import RunError
from rdistill.stages.embed.driver import run_embed
from rdistill.stages.embed.worker import part_paths, stage_fragments, write_part, write_staged_part
from rdistill.stages.parts import FragmentLedger

TINY = ["embed.model=rdistill-tiny", "embed.pretrained=", "embed.batch_size=32", "embed.decode_batch=16",
        "progress=false"]  # fmt: skip


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def test_ledger_completes_a_unit_once_its_fragments_tile_it():
    led = FragmentLedger(lambda u: f"part {u}")
    assert not led.add(0, 10, 5) and not led.add(0, 0, 10)
    assert not led.add(0, 0, 10)  # the same fragment again (a retried batch) counts once
    assert led.end(0, 15) and led.pop(0) == [0, 10] and not led.open
    assert led.end(1, 0) and led.pop(1) == []  # an empty part is complete at its end
    assert not led.end(2, 8) and led.add(2, 0, 8) and led.pop(2) == [0]  # the end may come first
    led.add(3, 0, 4)
    led.fail(3)
    assert not led.add(3, 4, 4) and 3 not in led.open  # a failed part's late fragments are ignored
    led.add(5, 2, 4)
    assert not led.end(5, 6) and led.open == {5}  # a part missing rows stays open (the driver reports it)
    assert not led.end(4, 9) and not led.add(4, 0, 6)
    with pytest.raises(RuntimeError, match=r"part 4: fragments \[\(0, 6\), \(3, 3\)\] do not tile its 9 rows"):
        led.add(4, 3, 3)


def _cols(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "pos": np.arange(n),
        "key": np.array([f"{i:09d}" for i in range(n)], dtype=object),
        "caption": np.array([f"caption {i} with ünïcode and a trailing nul\x00" for i in range(n)], dtype=object),
        "img_emb": rng.standard_normal((n, d)).astype(np.float16),
        "txt_emb": rng.standard_normal((n, d)).astype(np.float16),
    }


def test_a_part_from_staged_fragments_is_byte_identical_to_writing_it_whole(tmp_path):
    """The same rows, embedded in batches that span parts and staged in pieces, give the bytes the driver wrote
    before (``write_part`` on the whole part); an empty part too."""
    n, d = 50, 8
    cols = _cols(n, d)
    info = {"skipped": {"corrupt_image": 2}, "retries": 1, "read_seconds": 0.5, "started": 0.0}
    write_part(tmp_path / "whole", 3, "s-3.tar", d, cols, info)
    write_part(tmp_path / "whole", 4, "s-4.tar", d, {"pos": np.zeros(0, int)}, info)

    staging = tmp_path / "staging"
    order = np.random.default_rng(1).permutation(n)  # rows reach the actors in any order and grouping
    for batch_rows in np.array_split(order, 4):
        batch = {"part": np.full(len(batch_rows), 3), "index": cols["pos"][batch_rows],
                 "end": np.zeros(len(batch_rows), bool), "info": np.array([""] * len(batch_rows), dtype=object),
                 **{k: cols[k][batch_rows] for k in ("key", "caption", "img_emb", "txt_emb")}}  # fmt: skip
        frags = stage_fragments(batch, staging)
        assert set(frags) == {"part", "first", "rows", "end", "info"} and frags["rows"].sum() == len(batch_rows)
    firsts = sorted(int(p.stem) for p in (staging / "part_3").glob("*.arrow"))
    record = write_staged_part(tmp_path / "staged", 3, "s-3.tar", d, staging, firsts, info)
    assert record["samples"] == n and record["skipped"] == {"corrupt_image": 2}
    assert not (staging / "part_3").exists()  # the fragments are removed once the part is written
    write_staged_part(tmp_path / "staged", 4, "s-4.tar", d, staging, [], info)
    for part in (3, 4):
        for name, path in part_paths(tmp_path / "whole", part).items():
            other = part_paths(tmp_path / "staged", part)[name]
            assert other.read_bytes() == path.read_bytes(), (part, name)

    missing = write_staged_part(tmp_path / "staged", 5, "s-5.tar", d, staging, [0], info)
    assert missing["error"].startswith("s-5.tar: part 5: staged rows not found") and "every node" in missing["error"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("funnel-shards")
    for k, n in enumerate((120, 75, 0, 130)):
        write_tar(d / f"s-{k}.tar", toy_samples(n, seed=70 + k, start=k * 1000))
    return d


def test_vectors_never_reach_the_driver(ray_local, shards, tmp_path):
    out = tmp_path / "emb"
    summary = run_embed(str(shards), out, _cfg())
    assert summary["counts"]["samples"] == 325 and summary["parts_done"] == 4
    vector_bytes = sum(np.load(part_paths(out, i)[k]).nbytes for i in range(4) for k in ("img", "txt"))
    assert vector_bytes == 325 * 64 * 2 * 2
    # what the driver received: a few numbers per fragment and the shards' counts, not the 133 kB of vectors
    fetched = summary["this_run"]["driver_fetched_bytes"]
    assert 0 < fetched < vector_bytes / 20, fetched
    assert not (out / "_staging").exists() and not list(out.rglob(".*.tmp"))
    markers = {i: json.loads((out / "_done" / f"part_{i}.json").read_text()) for i in range(4)}
    assert [markers[i]["samples"] for i in range(4)] == [120, 75, 0, 130]


def test_a_part_its_worker_cannot_write_fails_the_run_by_shard_and_keeps_the_others(ray_local, shards, tmp_path):
    out = tmp_path / "emb"
    (out / "img_emb" / "img_emb_1.npy").mkdir(parents=True)  # the rename of part 1's first file must fail
    with pytest.raises(RunError, match=r"1 shard\(s\) failed, rerun to retry them: .*s-1\.tar: writing part 1 failed"):
        run_embed(str(shards), out, _cfg())
    assert sorted(p.name for p in (out / "_done").iterdir()) == ["part_0.json", "part_2.json", "part_3.json"]
    assert not (out / "_SUCCESS").exists()
    stamp = (out / "_done" / "part_0.json").stat().st_mtime_ns
    shutil.rmtree(out / "img_emb" / "img_emb_1.npy")
    summary = run_embed(str(shards), out, _cfg())
    assert summary["parts_this_run"] == 1 and summary["counts"]["samples"] == 325
    assert (out / "_done" / "part_0.json").stat().st_mtime_ns == stamp and (out / "_SUCCESS").exists()
