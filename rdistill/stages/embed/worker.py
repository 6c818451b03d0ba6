"""The two halves of the embedding stage, as plain callables that know nothing of Ray:

* :func:`read_shards` (CPU tasks): shard URLs in, blocks of decoded, cropped ``uint8`` images and captions out,
  then one *end row* per shard carrying its counts, so the driver knows when a part is complete.
* :class:`ClipEmbedder` (model actors): loads the CLIP once, turns those blocks into raw float16 embeddings.

Rows: ``part`` (int), ``index`` (position in the part), ``key``, ``caption``, ``end`` (bool), ``info`` (JSON of
the shard's :class:`~rdistill.io.shards.ShardStats` on end rows), and ``image`` or ``img_emb``/``txt_emb``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator

import numpy as np

from rdistill.errors import RunError
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
