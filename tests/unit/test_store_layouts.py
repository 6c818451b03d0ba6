"""EmbeddingStore on the layouts published tools really write: clip-retrieval's writer (two- and four-digit padded
part numbers, gaps where a partition came out empty, metadata columns from the samples' JSON), and ours with an
empty part. No Ray; each test writes a few dozen rows."""

import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdistill.dev.planted import make_concepts, write_store
from rdistill.io.store import EmbeddingStore, StoreError
from tests.published import partitions, write_clip_retrieval_store

DIM = 8
# 12 partitions, 3 and 8 empty: clip-retrieval names them 00 .. 11 and writes nothing for 03 and 08
SIZES = [5, 3, 4, None, 6, 2, 1, 4, None, 3, 5, 2]


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, DIM)).astype(np.float16)
    txt = rng.standard_normal((n, DIM)).astype(np.float16)
    captions = [f"caption of row {r}" for r in range(n)]
    metadata = [{"key": f"k{r:05d}", "url": f"https://example.invalid/{r}.jpg", "status": "success"} for r in range(n)]
    return img, txt, captions, metadata


def _clip_retrieval_store(root, sizes, partition_count, metadata=True):
    parts, n = partitions(sizes)
    img, txt, captions, meta = _rows(n)
    write_clip_retrieval_store(root, img, txt, captions, meta if metadata else None, parts, partition_count)
    return img, txt, captions, meta


def _all_vectors(store):
    blocks = list(store.iter_blocks(block_rows=4, prefetch=0))
    assert [b.start for b in blocks] == sorted(b.start for b in blocks)
    return np.concatenate([b.img for b in blocks]), np.concatenate([b.txt for b in blocks])


def test_clip_retrieval_store_with_gaps(tmp_path):
    root = tmp_path / "emb"
    img, txt, captions, meta = _clip_retrieval_store(root, SIZES, 12)
    # what the writer really wrote: two-digit numbers, none for the empty partitions
    assert "clip_retrieval" not in sys.modules  # the writer module was loaded alone, not the package's __init__
    expected = [f"img_emb_{i:02d}.npy" for i, n in enumerate(SIZES) if n is not None]
    assert sorted(os.listdir(root / "img_emb")) == expected
    assert pq.read_schema(root / "metadata" / "metadata_00.parquet").names == [
        "image_path", "caption", "key", "url", "status"
    ]  # fmt: skip

    store = EmbeddingStore(str(root))
    assert [p.index for p in store.parts] == [i for i, n in enumerate(SIZES) if n is not None]
    assert [p.rows for p in store.parts] == [n for n in SIZES if n is not None]
    assert store.num_rows == sum(n or 0 for n in SIZES) == len(captions)
    assert store.empty_parts == []  # a gap is not an empty part: there is nothing to skip
    assert store.dim == DIM and store.key_column == "key" and store.caption_column == "caption"
    # global row order is partition order
    assert [p.start for p in store.parts] == list(np.cumsum([0] + [p.rows for p in store.parts])[:-1])
    got_img, got_txt = _all_vectors(store)
    np.testing.assert_array_equal(got_img, img.astype(np.float32))
    np.testing.assert_array_equal(got_txt, txt.astype(np.float32))
    rows = np.array([34, 0, 17, 5, 20, 11, 33])
    keys, caps = store.lookup(rows)
    assert keys == [meta[r]["key"] for r in rows]
    assert caps == [captions[r] for r in rows]


def test_clip_retrieval_without_metadata_uses_image_path(tmp_path):
    """clip-retrieval run on files, without sample JSON: the metadata is just image_path and caption."""
    root = tmp_path / "emb"
    _, _, captions, _ = _clip_retrieval_store(root, SIZES, 12, metadata=False)
    store = EmbeddingStore(str(root))
    assert store.key_column == "image_path"
    keys, caps = store.lookup(np.array([0, 9, 34]))
    assert keys == ["000000000.jpg", "000000009.jpg", "000000034.jpg"]
    assert caps == [captions[0], captions[9], captions[34]]


def test_four_digit_laion_style_store(tmp_path):
    root = tmp_path / "laion"
    sizes = [4, None, 3, None, None, 6, 2, None, 5]
    img, _, captions, meta = _clip_retrieval_store(root, sizes, 2314)  # LAION-5B's ViT-L/14 parts: 0000 .. 2313
    assert sorted(os.listdir(root / "text_emb")) == [
        "text_emb_0000.npy", "text_emb_0002.npy", "text_emb_0005.npy", "text_emb_0006.npy", "text_emb_0008.npy"
    ]  # fmt: skip
    store = EmbeddingStore(str(root))
    assert [p.index for p in store.parts] == [0, 2, 5, 6, 8]
    assert store.num_rows == 20
    np.testing.assert_array_equal(_all_vectors(store)[0], img.astype(np.float32))
    keys, caps = store.lookup(np.array([19, 4, 7, 3]))
    assert keys == [meta[r]["key"] for r in (19, 4, 7, 3)]
    assert caps == [captions[r] for r in (19, 4, 7, 3)]

    by_path = EmbeddingStore(str(root), key_column="image_path")
    assert by_path.key_column == "image_path"
    assert by_path.lookup(np.array([19, 4]))[0] == ["000000019.jpg", "000000004.jpg"]


def test_a_part_number_written_with_two_paddings_is_refused(tmp_path):
    root = tmp_path / "emb"
    _clip_retrieval_store(root, SIZES, 12)
    shutil.copy(root / "img_emb" / "img_emb_07.npy", root / "img_emb" / "img_emb_7.npy")
    with pytest.raises(StoreError, match="part 7 appears twice") as err:
        EmbeddingStore(str(root))
    assert "img_emb_7.npy" in str(err.value) and "img_emb_07.npy" in str(err.value)


def _write_empty_part(root, i):
    """An empty part as rdistill's embed stage writes it for a shard with no usable sample."""
    np.save(root / "img_emb" / f"img_emb_{i}.npy", np.zeros((0, DIM), np.float16))
    np.save(root / "text_emb" / f"text_emb_{i}.npy", np.zeros((0, DIM), np.float16))
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("shard", pa.string()), ("index", pa.int64())])
    pq.write_table(schema.empty_table(), root / "metadata" / f"metadata_{i}.parquet")


def test_every_part_empty(tmp_path):
    root = tmp_path / "emb"
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        _write_empty_part(root, i)
    with pytest.raises(StoreError, match=r"holds no rows \(all 3 parts are empty\)"):
        EmbeddingStore(str(root))


@pytest.fixture
def own_store(tmp_path):
    """Our own layout: 3 parts of 10 rows (unpadded numbers, metadata key / caption / concept ids)."""
    root = tmp_path / "own"
    write_store(root, make_concepts(5, DIM, seed=1), 30, rows_per_part=10, seed=2, dtype="float32")
    return root


@pytest.mark.parametrize(
    ("rename", "config_key"),
    [({"key": "sample_id"}, "embeddings.key_column"), ({"caption": "title"}, "embeddings.caption_column")],
)
def test_metadata_without_a_known_column_names_file_and_config_key(own_store, rename, config_key):
    for i in range(3):
        path = own_store / "metadata" / f"metadata_{i}.parquet"
        table = pq.read_table(path)
        pq.write_table(table.rename_columns([rename.get(c, c) for c in table.column_names]), path)
    with pytest.raises(StoreError) as err:
        EmbeddingStore(str(own_store))
    message = str(err.value)
    assert str(own_store / "metadata" / "metadata_0.parquet") in message
    assert config_key in message and next(iter(rename.values())) in message  # the columns it does have


def test_empty_part_in_the_middle_is_skipped(own_store):
    full = EmbeddingStore(str(own_store))
    before = [np.load(own_store / "img_emb" / f"img_emb_{i}.npy") for i in range(3)]
    keys_before, _ = full.lookup(np.arange(30))
    _write_empty_part(own_store, 1)

    store = EmbeddingStore(str(own_store))
    assert [p.index for p in store.parts] == [0, 2]
    assert store.empty_parts == [str(own_store / "img_emb" / "img_emb_1.npy")]
    assert store.num_rows == 20 and [p.start for p in store.parts] == [0, 10]
    np.testing.assert_array_equal(_all_vectors(store)[0], np.concatenate([before[0], before[2]]))
    keys, _ = store.lookup(np.arange(20))
    assert keys == keys_before[:10] + keys_before[20:]


def test_fingerprint_notices_a_part_rewritten_in_place(own_store):
    _write_empty_part(own_store, 1)
    before = EmbeddingStore(str(own_store)).fingerprint()
    assert EmbeddingStore(str(own_store)).fingerprint() == before
    # same bytes, new modification time: the store cannot tell the content is the same without reading it
    for rel in ("text_emb/text_emb_2.npy", "metadata/metadata_1.parquet"):  # a part with rows and an empty one
        path = own_store / rel
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        after = EmbeddingStore(str(own_store)).fingerprint()
        assert after != before
        assert {k for k in after if after[k] != before.get(k)} == {rel}
        before = after
