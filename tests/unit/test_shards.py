import io
import json
import tarfile

import numpy as np
import pytest

import rdistill.io.shards as shards
from rdistill.dev.toydata import toy_samples, write_tar
from rdistill.io.shards import (
    SampleFormat,
    ShardReadError,
    ShardSpecError,
    ShardStats,
    decode_image,
    iter_samples,
    resolve_shards,
)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_resolve_directory_glob_brace_and_errors(tmp_path):
    for k in range(3):
        write_tar(tmp_path / f"s-{k}.tar", toy_samples(1, seed=k))
    (tmp_path / "notes.txt").write_text("not a shard")
    every = [str(tmp_path / f"s-{k}.tar") for k in range(3)]
    assert resolve_shards(str(tmp_path)) == every
    assert resolve_shards(str(tmp_path / "s-*.tar")) == every
    assert resolve_shards(str(tmp_path / "s-{0..1}.tar")) == every[:2]
    assert resolve_shards(every[2]) == every[2:]
    with pytest.raises(ShardSpecError, match="no such file"):
        resolve_shards(str(tmp_path / "missing.tar"))
    with pytest.raises(ShardSpecError, match="matches no"):
        resolve_shards(str(tmp_path / "x-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSpecError, match="no .tar shards"):
        resolve_shards(str(tmp_path / "empty"))


def test_samples_skips_and_counts_each_defect(tmp_path):
    good = list(toy_samples(3, seed=1))
    members = []
    for s in good:
        members += [(f"{s['__key__']}.{ext}", data) for ext, data in s.items() if ext != "__key__"]
    members += [
        ("bad.jpg", b"\xff\xd8 definitely not a jpeg"),  # kept by the reader: decoding is the model side's job
        ("bad.txt", b"a broken image"),
        ("nocap.png", good[0][next(k for k in good[0] if k in ("jpg", "png", "webp"))]),
        ("blank.jpg", good[0][next(k for k in good[0] if k in ("jpg", "png", "webp"))]),
        ("blank.txt", b"   "),
        ("viajson.webp", good[1][next(k for k in good[1] if k in ("jpg", "png", "webp"))]),
        ("viajson.json", json.dumps({"caption": " from json "}).encode()),
        ("textonly.txt", b"no image here"),
        ("README", b"no extension"),
    ]
    path = _tar(tmp_path / "mixed.tar", members)
    stats = ShardStats()
    out = list(iter_samples(path, SampleFormat(), stats))
    assert [s.key for s in out] == [s["__key__"] for s in good] + ["bad", "viajson"]
    assert out[-1].caption == "from json"
    assert out[0].caption == good[0]["txt"].decode()
    assert dict(stats.skipped) == {"no_caption": 2, "no_image": 1, "unnamed_member": 1}
    with pytest.raises(ValueError):
        decode_image(out[3].image)
    assert decode_image(out[0].image).mode == "RGB"


def test_truncated_and_empty_shards_keep_what_was_read(tmp_path):
    path = tmp_path / "full.tar"
    write_tar(path, toy_samples(10, seed=2))
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    stats = ShardStats()
    n = len(list(iter_samples(str(cut), SampleFormat(), stats)))
    assert 0 < n < 10
    assert stats.skipped["unreadable_tar"] == 1
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    stats = ShardStats()
    assert list(iter_samples(str(empty), SampleFormat(), stats)) == []
    assert stats.skipped["empty_shard"] == 1
    no_members = _tar(tmp_path / "none.tar", [])
    stats = ShardStats()
    # a well-formed tar with no members (img2dataset's shard when every download failed) is an empty shard too
    assert list(iter_samples(no_members, SampleFormat(), stats)) == [] and stats.skipped == {"empty_shard": 1}


def test_io_errors_retry_from_where_they_stopped_then_fail_with_the_name(tmp_path, monkeypatch):
    path = _tar(tmp_path / "s.tar", [(f"{k}.txt", b"x") for k in range(6)])
    real = shards._members
    failures = {"left": 2}

    def flaky(url, skip):
        for i, item in enumerate(real(url, skip)):
            if i == 1 and failures["left"]:
                failures["left"] -= 1
                raise OSError("connection reset")
            yield item

    monkeypatch.setattr(shards, "_members", flaky)
    monkeypatch.setattr(shards.time, "sleep", lambda s: None)
    stats = ShardStats()
    names = [name for name, _ in shards.iter_members(path, stats, retries=3)]
    assert names == [f"{k}.txt" for k in range(6)]  # no duplicates, no gaps across the two re-opens
    assert stats.retries == 2
    failures["left"] = 10
    with pytest.raises(ShardReadError, match=r"s\.tar: read failed after 3 retries"):
        list(shards.iter_members(path, ShardStats(), retries=3))
    with pytest.raises(ShardReadError, match="not found"):
        list(shards.iter_members(str(tmp_path / "gone.tar"), ShardStats()))


def test_sample_format_from_config():
    from rdistill.config import load_config

    fmt = SampleFormat.from_config(load_config(None, ["embed.image_keys=PNG, .webp", "embed.caption_key=text"]).embed)
    assert fmt.image_keys == ("png", "webp") and fmt.caption_key == "text"


def test_toy_samples_are_deterministic():
    a, b = list(toy_samples(4, seed=3)), list(toy_samples(4, seed=3))
    assert a == b
    img = np.asarray(decode_image(a[0][next(k for k in a[0] if k in ("jpg", "png", "webp"))]))
    assert img.shape == (96, 96, 3)
