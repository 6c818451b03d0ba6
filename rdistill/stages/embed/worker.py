"""The worker side of the embedding stage, as plain callables that know nothing of Ray:

* :func:`read_shards` (CPU tasks): shard URLs in, blocks of decoded, cropped ``uint8`` images and captions out,
  then one *end row* per shard carrying its counts, so the driver knows when a part is complete.
* :class:`ClipEmbedder`: loads the CLIP once, turns those blocks into raw float16 embeddings.
* :class:`PartStager` (the model actors): a :class:`ClipEmbedder` whose output is written where it is made, as
  *fragment* files of consecutive rows of one part in the run's staging folder; it returns one small row per
  fragment, so the vectors never travel to the driver.
* :class:`StagedPartWriter` (writer actors, one per node, no model): once a part's fragments tile it, the driver
  hands the part to one of them, which turns the fragments into the part's files (:func:`write_staged_part`,
  published atomically); the driver then writes its marker.

Rows: ``part`` (int), ``index`` (position in the part), ``key``, ``caption``, ``end`` (bool), ``info`` (JSON of
the shard's :class:`~rdistill.io.shards.ShardStats` on end rows), and ``image`` or ``img_emb``/``txt_emb``.
Fragment rows (what the driver gets): ``part``, ``first`` (its first index), ``rows``, ``end``, ``info``; an end
row has ``first`` = the part's row count and ``rows`` = 0.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rdistill.errors import RunError
from rdistill.io.outputs import atomic_path
from rdistill.io.shards import SampleFormat, ShardReadError, ShardStats, decode_image, iter_samples
from rdistill.models.clip import ClipEncoder, ClipSpec, crop_transform

_PASS = ("part", "index", "key", "caption", "end", "info")


@functools.lru_cache(maxsize=4)
def _crop(spec: ClipSpec):
    return crop_transform(spec)


def _rows(part: int, first: int, keys: list, captions: list, images: list, end: bool = False, info: str = ""):
    n = len(keys)
    return {
        "part": np.full(n, part, dtype=np.int64),
        "index": np.arange(first, first + n, dtype=np.int64),
        "key": np.array(keys, dtype=object),
        "caption": np.array(captions, dtype=object),
        "end": np.full(n, end),
        "info": np.array([info] * n, dtype=object),
        "image": np.stack(images),
    }


def read_shards(batch: dict, spec: ClipSpec, fmt: SampleFormat, retries: int = 3, block: int = 64) -> Iterator[dict]:
    """``batch`` of ``part``/``url`` rows -> blocks of at most ``block`` samples per shard, then its end row.

    A shard that fails after its retries still ends with an end row, whose ``info`` holds the error; the driver
    then drops that part's rows and fails the run naming the shard.
    """
    crop = _crop(spec)
    blank = np.zeros((spec.image_size, spec.image_size, 3), dtype=np.uint8)
    for part, url in zip(batch["part"].tolist(), batch["url"].tolist()):
        stats, t0, first = ShardStats(), time.time(), 0
        keys, captions, images = [], [], []
        try:
            for s in iter_samples(url, fmt, stats, retries):
                try:
                    images.append(crop(decode_image(s.image)))
                except ValueError:
                    stats.skipped["corrupt_image"] += 1
                    continue
                keys.append(s.key)
                captions.append(s.caption)
                if len(keys) == block:
                    yield _rows(part, first, keys, captions, images)
                    first += len(keys)
                    keys, captions, images = [], [], []
        except ShardReadError as e:
            stats.error = str(e)
        if keys:
            yield _rows(part, first, keys, captions, images)
            first += len(keys)
        stats.samples = first
        info = json.dumps({**stats.to_dict(), "url": url, "started": t0, "read_seconds": time.time() - t0})
        yield _rows(part, first, [""], [""], [blank], end=True, info=info)


class ClipEmbedder:
    """Actor body: ``__init__`` loads the model once; ``__call__`` embeds a block (end rows pass through)."""

    def __init__(self, spec: ClipSpec, device: str = "cpu", precision: str = "auto", threads: int = 0):
        import torch

        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RunError("embed.pool.device is cuda but torch on this worker sees no GPU")
        self.encoder = ClipEncoder(spec, device, precision)
        self.dim = spec.embed_dim

    def __call__(self, batch: dict) -> dict:
        end = np.asarray(batch["end"], dtype=bool)
        live = np.flatnonzero(~end)
        img = np.zeros((len(end), self.dim), dtype=np.float16)
        txt = np.zeros((len(end), self.dim), dtype=np.float16)
        if len(live):
            img[live] = self.encoder.encode_images(batch["image"][live])
            txt[live] = self.encoder.encode_texts([str(c) for c in batch["caption"][live]])
        return {**{k: batch[k] for k in _PASS}, "img_emb": img, "txt_emb": txt}


def part_paths(out: Path, i: int) -> dict[str, Path]:
    """The three files of part ``i`` of the store at ``out``."""
    return {
        "img": out / "img_emb" / f"img_emb_{i}.npy",
        "txt": out / "text_emb" / f"text_emb_{i}.npy",
        "meta": out / "metadata" / f"metadata_{i}.parquet",
    }


def _save_npy(path: Path, x: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, x)


def write_part(out: Path, part: int, shard: str, dim: int, cols: dict, info: dict) -> dict:
    """Publish part ``part`` of the store at ``out`` (each file atomically) from ``cols``: ``pos`` (its rows'
    places, 0 .. n-1 in order), ``key``, ``caption`` and ``img_emb``/``txt_emb`` ``(n, dim)`` float16 (all absent
    for an empty part; ``key`` and ``caption`` may be Arrow string arrays); ``info`` is the reader's end-row JSON
    of the shard. Returns the part's done-marker record.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    def strings(v):  # Arrow strings as they are (staged fragments), anything else as its str
        return v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array([str(x) for x in v], pa.string())

    n = len(cols["pos"])
    paths = part_paths(out, part)
    table = pa.table({
        "key": strings(cols.get("key", ())),
        "caption": strings(cols.get("caption", ())),
        "shard": pa.array([shard] * n, pa.string()),
        "index": pa.array(np.asarray(cols["pos"], dtype=np.int64)),
    })  # fmt: skip
    empty = np.zeros((0, dim), np.float16)
    _save_npy(paths["img"], np.ascontiguousarray(cols.get("img_emb", empty), dtype=np.float16))
    _save_npy(paths["txt"], np.ascontiguousarray(cols.get("txt_emb", empty), dtype=np.float16))
    with atomic_path(paths["meta"]) as tmp:
        pq.write_table(table, tmp)
    seconds = max(time.time() - info["started"], 1e-9)
    return {
        "part": part,
        "shard": shard,
        "samples": n,
        "skipped": info["skipped"],
        "retries": info["retries"],
        "read_seconds": round(info["read_seconds"], 3),
        "seconds": round(seconds, 3),
        "samples_per_s": round(n / seconds, 1),
        "finished": time.time(),
    }


# --- staging: the actors write what they embed; the part writers assemble it -------------------------------------


def fragment_path(staging: Path, part: int, first: int) -> Path:
    return staging / f"part_{part}" / f"{first:012d}.arrow"


def write_fragment(path: Path, index: np.ndarray, key, caption, img_emb: np.ndarray, txt_emb: np.ndarray) -> None:
    """Rows ``index[0] ..`` of a part as an Arrow IPC file: ``index``, ``key``, ``caption`` and the two ``(n, d)``
    float16 arrays. Renamed into place when complete (a retried batch rewrites the same file); not fsynced: a
    fragment lives until its part is written, and a run killed before that redoes the part."""
    import pyarrow as pa

    d = img_emb.shape[1]
    table = pa.table({
        "index": pa.array(np.asarray(index, np.int64)),
        "key": pa.array([str(k) for k in key], pa.string()),
        "caption": pa.array([str(c) for c in caption], pa.string()),
        "img_emb": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(img_emb, np.float16).ravel()), d),
        "txt_emb": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(txt_emb, np.float16).ravel()), d),
    })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    os.replace(tmp, path)


def stage_fragments(batch: dict, staging: Path) -> dict:
    """An embedded batch (rows of :class:`ClipEmbedder`) -> its rows written as fragments, one per run of
    consecutive rows of a part; returns the fragment rows (module docstring), end rows passed through."""
    end = np.asarray(batch["end"], dtype=bool)
    parts, index = np.asarray(batch["part"], np.int64), np.asarray(batch["index"], np.int64)
    out = {"part": [], "first": [], "rows": [], "end": [], "info": []}

    def emit(part, first, rows, is_end=False, info=""):
        for k, v in zip(out, (part, first, rows, is_end, info)):
            out[k].append(v)

    live = np.flatnonzero(~end)
    if len(live):
        order = live[np.lexsort((index[live], parts[live]))]
        p, i = parts[order], index[order]
        cuts = np.flatnonzero((np.diff(p) != 0) | (np.diff(i) != 1)) + 1
        for run in np.split(order, cuts):
            part, first = int(parts[run[0]]), int(index[run[0]])
            write_fragment(fragment_path(staging, part, first), index[run], batch["key"][run], batch["caption"][run],
                           batch["img_emb"][run], batch["txt_emb"][run])  # fmt: skip
            emit(part, first, len(run))
    for j in np.flatnonzero(end):
        emit(int(parts[j]), int(index[j]), 0, True, str(batch["info"][j]))
    return {
        "part": np.array(out["part"], np.int64),
        "first": np.array(out["first"], np.int64),
        "rows": np.array(out["rows"], np.int64),
        "end": np.array(out["end"], bool),
        "info": np.array(out["info"], dtype=object),
    }


class PartStager:
    """Actor body: ``embedder(**kwargs)`` (a :class:`ClipEmbedder`, loaded once) embeds each block, whose rows
    are then written to ``staging`` (:func:`stage_fragments`); returns fragment rows only."""

    def __init__(self, staging: str, embedder=ClipEmbedder, **kwargs):
        self.embedder = embedder(**kwargs)
        self.staging = Path(staging)

    def __call__(self, batch: dict) -> dict:
        return stage_fragments(self.embedder(batch), self.staging)


def write_staged_part(out: Path, part: int, shard: str, dim: int, staging: Path, firsts: list[int],
                      info: dict) -> dict:  # fmt: skip
    """Part ``part`` of the store at ``out`` from its fragments (``firsts``, which the driver checked tile the
    part), published by :func:`write_part`; the fragments are removed. Returns the done-marker record, or
    ``{"error": message naming the shard}`` when a fragment is missing (the output is not on storage this node
    shares with the actors) or the part cannot be written."""
    import pyarrow as pa

    try:
        tables = []
        for first in firsts:
            with pa.OSFile(str(fragment_path(staging, part, first))) as f:
                tables.append(pa.ipc.open_file(f).read_all())
    except FileNotFoundError as e:
        return {"error": f"{shard}: part {part}: staged rows not found ({e.filename}): the output directory must be "
                         "on storage that every node of the cluster reaches"}  # fmt: skip
    except (OSError, pa.ArrowInvalid) as e:
        return {"error": f"{shard}: part {part}: cannot read its staged rows: {e}"}
    cols = {"pos": np.zeros(0, np.int64)}
    if tables:
        t = pa.concat_tables(tables).combine_chunks()
        cols = {
            "pos": t.column("index").to_numpy(),
            "key": t.column("key"),
            "caption": t.column("caption"),
            **{c: t.column(c).chunk(0).flatten().to_numpy().reshape(-1, dim) for c in ("img_emb", "txt_emb")},
        }
    if not np.array_equal(cols["pos"], np.arange(len(cols["pos"]))):
        raise RuntimeError(f"part {part} ({shard}): staged rows are not 0 .. {len(cols['pos']) - 1} in order")
    try:
        record = write_part(out, part, shard, dim, cols, info)
    except OSError as e:
        return {"error": f"{shard}: writing part {part} failed: {e}"}
    shutil.rmtree(staging / f"part_{part}", ignore_errors=True)
    return record


class StagedPartWriter:
    """Actor body of the part writers: :func:`write_staged_part` in a process that stays up for the run (a task per
    part would start a worker process per part on a node whose CPUs the pool holds)."""

    def write(self, out: Path, part: int, shard: str, dim: int, staging: Path, firsts: list[int], info: dict) -> dict:
        return write_staged_part(out, part, shard, dim, staging, firsts, info)
