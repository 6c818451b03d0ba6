"""Streaming blocks through reused buffers and the row-range threads (rdistill.io.rowpool): the same values as
fresh arrays, buffers really reused, a truncated file still named, and the thread count from the environment."""

import threading

import numpy as np
import pytest

from rdistill.config import Config
from rdistill.engine import tasks
from rdistill.io import rowpool
from rdistill.io.store import BlockBuffers, EmbeddingStore, StoreError
from tests.published import partitions, write_clip_retrieval_store

DIM = 16


@pytest.fixture
def store(tmp_path):
    sizes = [9000, 0, 5000]  # 9000 rows: blocks of 4096 leave a short last one; an empty partition between
    parts, n = partitions([s or None for s in sizes])
    rng = np.random.default_rng(3)
    img = rng.standard_normal((n, DIM)).astype(np.float16)
    txt = rng.standard_normal((n, DIM)).astype(np.float16)
    write_clip_retrieval_store(tmp_path, img, txt, [f"c{i}" for i in range(n)], None, parts, len(sizes))
    return EmbeddingStore(str(tmp_path)), img, txt


def test_buffered_blocks_equal_fresh_ones_and_reuse_memory(store):
    s, img, txt = store
    buf = BlockBuffers()
    addresses = set()
    for p in s.parts:
        fresh = [(b.img.copy(), b.txt.copy(), b.start) for b in s.part_blocks(p, 4096)]
        for (fi, ft, start), b in zip(fresh, s.part_blocks(p, 4096, buffers=buf), strict=True):
            assert b.start == start and b.img.dtype == np.float32
            np.testing.assert_array_equal(b.img, fi)
            np.testing.assert_array_equal(b.txt, ft)
            np.testing.assert_array_equal(b.img, img[start : start + b.img.shape[0]].astype(np.float32))
            addresses.add(b.img.__array_interface__["data"][0])
    assert len(addresses) == 1  # every block of every part in the same memory


def test_prepared_blocks_stream_and_cache_give_the_same_rows(store):
    s, _, _ = store
    cfg = Config()
    cache = tasks.PartCache(s.parts[0].rows * DIM * 8)  # room for the first part only
    streamed = [[(b.img.copy(), b.txt_norm.copy()) for b in tasks.prepared_blocks(s, p, cfg)] for p in s.parts]
    for _ in range(2):  # the second time the first part comes from the cache
        for p, want in zip(s.parts, streamed, strict=True):
            got = [(b.img.copy(), b.txt_norm.copy()) for b in tasks.prepared_blocks(s, p, cfg, cache=cache)]
            for (gi, gn), (wi, wn) in zip(got, want, strict=True):
                np.testing.assert_array_equal(gi, wi)
                np.testing.assert_array_equal(gn, wn)
    assert list(cache.parts) == [s.parts[0].index]
    np.testing.assert_allclose(np.linalg.norm(streamed[0][0][0], axis=1), 1, rtol=1e-5)


def test_truncated_part_is_named_through_buffers(store, tmp_path):
    s, _, _ = store
    path = s.parts[0].img.path
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(StoreError, match="truncated") as e:
        list(s.part_blocks(s.parts[0], 4096, buffers=BlockBuffers()))
    assert path in str(e.value)


def test_row_ranges_cover_all_rows_once_on_several_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rowpool.row_threads() == 3
    seen, names, ranges = np.zeros(50_000, dtype=np.int64), set(), []

    def work(r0, r1):
        seen[r0:r1] += 1
        names.add(threading.current_thread().name)
        ranges.append((r0, r1))

    rowpool.for_row_ranges(work, seen.size)
    assert (seen == 1).all() and len(ranges) == 3  # a pool thread may take two of the three ranges
    assert threading.current_thread().name not in names
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    names.clear()
    rowpool.for_row_ranges(work, seen.size)
    assert (seen == 2).all() and names == {threading.current_thread().name}  # one CPU: this thread only


def test_row_range_errors_reach_the_caller(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    def work(r0, r1):
        if r0 > 0:
            raise ValueError("second range")

    with pytest.raises(ValueError, match="second range"):
        rowpool.for_row_ranges(work, 20_000)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_float16_conversion_matches_numpy_for_every_bit_pattern(monkeypatch, threads):
    """FAISS's fp16 decoder, split over row threads, gives numpy's cast bit for bit: all 65536 float16 values
    (NaN payloads, infinities, subnormals, -0), from a writable and a read-only buffer (what ``f.read`` returns)."""
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    for rows, dim in ((8192, 8), (256, 256), (5, 768)):  # 8192 rows: split into ranges on two threads
        src = np.resize(every, rows * dim).reshape(rows, dim)
        for s in (src, np.frombuffer(src.tobytes(), dtype=np.float16).reshape(rows, dim)):
            out = rowpool.to_float32(s, np.full((rows, dim), 7.0, dtype=np.float32))
            np.testing.assert_array_equal(out.view(np.uint32), s.astype(np.float32).view(np.uint32))
    f32 = np.random.default_rng(0).standard_normal((100, 3)).astype(np.float32)
    np.testing.assert_array_equal(rowpool.to_float32(f32, np.empty_like(f32)), f32)
    strided = np.resize(every, (64, 512))[:, ::2]  # not contiguous: numpy's cast, same values
    np.testing.assert_array_equal(
        rowpool.to_float32(strided, np.empty((64, 256), np.float32)), strided.astype(np.float32)
    )
    dense = np.ascontiguousarray(strided)
    out_t = np.empty((256, 64), np.float32).T  # a non-contiguous output is written through numpy too
    np.testing.assert_array_equal(rowpool.to_float32(dense, out_t), dense.astype(np.float32))
    with pytest.raises(ValueError, match="needs float32"):
        rowpool.to_float32(strided, np.empty((64, 255), np.float32))
