"""Training sets for the harness: a distilled set read from its shards, or pairs drawn from an eval train split.

A :class:`TrainSet` holds decoded images once (``(n_img, S, S, 3) uint8``, or, for a set whose ``distilled.json``
says ``image.tensor``, its optimised images as ``(n_img, 3, S, S) float32`` tensors in the students' normalised
pixel space, read from the ``KEY.f32.npy`` members without rounding), the image of each pair, the captions and,
when the set has them, its distilled text vectors (``.npy`` members) and learned soft labels
(``students.soft_labels``), with the set's ``distilled.json``.
An image that cannot be decoded is skipped with its pairs and counted in ``TrainSet.skipped`` (a training set
with a few broken files still trains); anything else unreadable is a :class:`DistilledError` naming the file and
sample.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rdistill.io.distilled import TENSOR_EXT, DistilledError, read_distilled_info
from rdistill.io.karpathy import IMAGE_EXTS, EvalDataError, EvalSplit, load_train_images

log = logging.getLogger(__name__)


@dataclass
class TrainSet:
    """``images (n_img, S, S, 3) uint8`` (or ``(n_img, 3, S, S) float32`` normalised tensors); ``pair_image (n,)
    int64``; ``captions`` n strings; ``vectors (n, d) float32`` or None; ``soft_labels (n, n) float32`` or None;
    ``kind``: distilled | random-subset | full-data; ``skipped``: images that could not be decoded
    (``corrupt_images``) and the pairs left out with them (``pairs``)."""

    name: str
    path: str
    kind: str
    info: dict
    images: np.ndarray
    pair_image: np.ndarray
    captions: list[str]
    vectors: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    soft_labels: np.ndarray | None = None
    skipped: dict = field(default_factory=lambda: {"corrupt_images": 0, "pairs": 0})

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


def _tensor_image(data: bytes, size: int, where: str) -> np.ndarray:
    """A ``KEY.f32.npy`` member -> ``(3, size, size) float32`` (bicubic resize, as the PNGs are, when the size
    differs)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        cause = " ".join(str(e).split())
        raise DistilledError(f"{where}: .{TENSOR_EXT} image tensor cannot be read ({cause})") from None
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.dtype.kind != "f" or not np.isfinite(arr).all():
        raise DistilledError(f"{where}: .{TENSOR_EXT} is not a finite (3, S, S) float image ({arr.shape} {arr.dtype})")
    arr = arr.astype(np.float32)
    if arr.shape[1:] != (size, size):
        import torch

        t = torch.nn.functional.interpolate(torch.from_numpy(arr)[None], size=(size, size), mode="bicubic",
                                            align_corners=False, antialias=True)  # fmt: skip
        arr = t[0].numpy()
    return arr


def _soft_labels(root: Path, info: dict, kept: list[int], total: int) -> np.ndarray | None:
    name = (info.get("students") or {}).get("soft_labels")
    if not name:
        return None
    path = root / Path(str(name)).name
    try:
        sim = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DistilledError(f"{path}: the set's soft labels cannot be read ({' '.join(str(e).split())})") from None
    if sim.shape != (total, total) or sim.dtype.kind != "f" or not np.isfinite(sim).all():
        raise DistilledError(f"{path}: soft labels must be a finite ({total}, {total}) float matrix, got {sim.shape}")
    idx = np.asarray(kept, dtype=np.int64)
    return sim.astype(np.float32)[np.ix_(idx, idx)]


def read_distilled_set(path: str | Path, image_size: int, name: str | None = None) -> TrainSet:
    """The set at ``path`` (shards + ``manifest.parquet``) with images resized to ``image_size``, in manifest
    order; samples whose image cannot be decoded are skipped and counted (logged with their shard and key). Errors
    name the file and key."""
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
    tensors = bool((info.get("image") or {}).get("tensor"))
    images, captions, vectors, corrupt, kept = [], [], [], [], []
    for row, (k, s) in enumerate(zip(keys, shards)):
        members = found.get(k)
        where = f"{root / 'shards' / Path(s).name}: sample {k}"
        if members is None:
            raise DistilledError(f"{where}: not in the shard")
        if tensors:
            if TENSOR_EXT not in members:
                raise DistilledError(f"{where}: no .{TENSOR_EXT} image tensor (distilled.json says image.tensor)")
            image = _tensor_image(members[TENSOR_EXT], image_size, where)
        else:
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                raise DistilledError(f"{where}: no image member ({', '.join(IMAGE_EXTS)})")
            try:
                image = _resize(members[ext], image_size, where)
            except DistilledError as e:
                corrupt.append(str(e))
                continue
        images.append(image)
        kept.append(row)
        captions.append(members.get("txt", b"").decode("utf-8", errors="replace").strip())
        if "npy" in members:
            try:
                vec = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                cause = " ".join(str(e).split())
                raise DistilledError(f"{where}: .npy text vector cannot be read ({cause})") from None
            if vec.dtype.kind not in "fiu" or vec.size == 0:
                raise DistilledError(f"{where}: .npy text vector is not a non-empty numeric array ({vec.dtype})")
            vectors.append(vec.astype(np.float32).reshape(-1))
    if corrupt:
        shown = "; ".join(corrupt[:3]) + (" ..." if len(corrupt) > 3 else "")
        log.warning(
            "%s: %d of %d images cannot be decoded, skipped with their pairs: %s", root, len(corrupt), len(keys), shown
        )
    if not images:
        raise DistilledError(f"{root}: none of its {len(keys)} images can be decoded ({corrupt[0]})")
    if vectors and len(vectors) != len(images):
        raise DistilledError(f"{root}: {len(vectors)} of {len(images)} samples carry a .npy text vector")
    if len({v.shape for v in vectors}) > 1:
        raise DistilledError(f"{root}: the .npy text vectors differ in length")
    return TrainSet(
        name or root.name,
        str(root),
        "distilled",
        info,
        np.stack(images),
        np.arange(len(images), dtype=np.int64),
        captions,
        np.stack(vectors) if vectors else None,
        soft_labels=_soft_labels(root, info, kept, len(keys)),
        skipped={"corrupt_images": len(corrupt), "pairs": len(corrupt)},
    )


def pairs_from_split(
    split: EvalSplit, image_size: int, name: str, kind: str, pairs: int | None = None, seed: int = 0
) -> TrainSet:
    """Pairs (one per caption, as the authors' training split) from ``split``: all of them (``pairs`` None: the
    full-data row) or a uniform random sample of ``pairs`` (the random-subset row), seeded. Only the images used
    are decoded; one that cannot be is skipped with its pairs and counted (``TrainSet.skipped``)."""
    n = len(split.captions)
    rows = np.arange(n) if pairs is None else np.sort(np.random.default_rng(seed).choice(n, min(pairs, n), False))
    used, pair_image = np.unique(split.txt2img[rows], return_inverse=True)
    images, ok = load_train_images(split, image_size, rows=used)
    keep = ok[pair_image]
    if not keep.any():
        raise EvalDataError(f"{split.source}: none of the {len(used)} {split.name} images drawn can be decoded")
    rows, pair_image = rows[keep], (np.cumsum(ok) - 1)[pair_image[keep]]
    skipped = {"corrupt_images": int((~ok).sum()), "pairs": int((~keep).sum())}
    info = {
        "method": kind,
        "count": len(rows),
        "text": {"space": "none", "vectors": None, "normalized": True},
        "source": {"eval_data": split.source, "split": split.name, "seed": seed},
    }
    return TrainSet(
        name,
        split.source,
        kind,
        info,
        images,
        pair_image.astype(np.int64),
        [split.captions[r] for r in rows],
        skipped=skipped,
    )
