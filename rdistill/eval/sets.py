"""Training sets for the harness: a distilled set read from its shards, or pairs drawn from an eval train split.

A :class:`TrainSet` holds decoded images once (``(n_img, S, S, 3) uint8``), the image of each pair, the captions
and, when the set has them, its distilled text vectors (``.npy`` members), with the set's ``distilled.json``.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rdistill.io.distilled import DistilledError, read_distilled_info
from rdistill.io.karpathy import IMAGE_EXTS, EvalSplit, load_images

log = logging.getLogger(__name__)


@dataclass
class TrainSet:
    """``images (n_img, S, S, 3) uint8``; ``pair_image (n,) int64``; ``captions`` n strings; ``vectors (n, d)
    float32`` or None; ``kind``: distilled | random-subset | full-data."""

    name: str
    path: str
    kind: str
    info: dict
    images: np.ndarray
    pair_image: np.ndarray
    captions: list[str]
    vectors: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_image)


def _resize(data: bytes, size: int, where: str) -> np.ndarray:
    from PIL import Image

    from rdistill.io.shards import decode_image

    try:
        img = decode_image(data)
    except ValueError as e:
        raise DistilledError(f"{where}: image cannot be decoded ({e})") from None
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def read_distilled_set(path: str | Path, image_size: int, name: str | None = None) -> TrainSet:
    """The set at ``path`` (shards + ``manifest.parquet``) with images resized to ``image_size``, in manifest
    order. Errors name the file and key."""
    import pyarrow.parquet as pq

    root = Path(path)
    manifest = root / "manifest.parquet"
    if not manifest.exists():
        raise DistilledError(f"{root}: no manifest.parquet: not a distilled set (shards + manifest.parquet)")
    try:
        table = pq.read_table(manifest)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DistilledError(f"{manifest}: not a readable parquet file ({e})") from None
    for col in ("key", "shard"):
        if col not in table.column_names:
            raise DistilledError(f"{manifest}: no column {col!r} (columns: {', '.join(table.column_names)})")
    keys = [str(k) for k in table.column("key").to_pylist()]
    shards = [str(s) for s in table.column("shard").to_pylist()]
    if not keys:
        raise DistilledError(f"{manifest}: the set has no pairs")
    info = read_distilled_info(root)
    wanted: dict[str, set] = {}
    for k, s in zip(keys, shards):
        wanted.setdefault(s, set()).add(k)
    found: dict[str, dict] = {}
    for shard, ks in wanted.items():
        tar_path = root / "shards" / Path(shard).name
        if not tar_path.exists():
            raise DistilledError(f"{manifest}: shard {shard} not found in {root / 'shards'}")
        try:
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = Path(m.name).name.partition(".")
                    if key in ks:
                        found.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            raise DistilledError(f"{tar_path}: not a readable tar ({e})") from None
    images, captions, vectors = [], [], []
    for k, s in zip(keys, shards):
        members = found.get(k)
        where = f"{root / 'shards' / Path(s).name}: sample {k}"
        if members is None:
            raise DistilledError(f"{where}: not in the shard")
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise DistilledError(f"{where}: no image member ({', '.join(IMAGE_EXTS)})")
        images.append(_resize(members[ext], image_size, where))
        captions.append(members.get("txt", b"").decode("utf-8", errors="replace").strip())
        if "npy" in members:
            vectors.append(np.load(io.BytesIO(members["npy"])).astype(np.float32).reshape(-1))
    if vectors and len(vectors) != len(keys):
        raise DistilledError(f"{root}: {len(vectors)} of {len(keys)} samples carry a .npy text vector")
    if len({v.shape for v in vectors}) > 1:
        raise DistilledError(f"{root}: the .npy text vectors differ in length")
    return TrainSet(
        name or root.name,
        str(root),
        "distilled",
        info,
        np.stack(images),
        np.arange(len(keys), dtype=np.int64),
        captions,
        np.stack(vectors) if vectors else None,
    )


def pairs_from_split(
    split: EvalSplit, image_size: int, name: str, kind: str, pairs: int | None = None, seed: int = 0
) -> TrainSet:
    """Pairs (one per caption, as the authors' training split) from ``split``: all of them (``pairs`` None: the
    full-data row) or a uniform random sample of ``pairs`` (the random-subset row), seeded. Only the images used
    are decoded."""
    n = len(split.captions)
    rows = np.arange(n) if pairs is None else np.sort(np.random.default_rng(seed).choice(n, min(pairs, n), False))
    used, pair_image = np.unique(split.txt2img[rows], return_inverse=True)
    images = load_images(split, image_size, rows=used)
    info = {
        "method": kind,
        "count": len(rows),
        "text": {"space": "none", "vectors": None, "normalized": True},
        "source": {"eval_data": split.source, "split": split.name, "seed": seed},
    }
    return TrainSet(
        name, split.source, kind, info, images, pair_image.astype(np.int64), [split.captions[r] for r in rows]
    )
