"""Retrieval evaluation data: Karpathy-style split files and WebDataset shards with several captions per sample.

Two sources, one result (:class:`EvalData`: named splits of images with several captions each):

* **Karpathy files** (``dataset_flickr30k.json``, ``dataset_coco.json``): ``{"images": [{"filename": ...,
  "filepath": ... (optional, COCO's ``val2014``), "split": "train" | "val" | "test" | "restval", "sentences":
  [{"raw": ...}, ...]}, ...]}``; images are read from ``image_root/filepath/filename``. ``restval`` is part of
  the training split, as in Karpathy's COCO convention.
* **WebDataset shards** (a directory, glob, brace pattern or URL, as everywhere in rdistill): one sample per
  image, the image member (``jpg``, ``jpeg``, ``png``, ``webp``), captions in the ``json`` member's ``captions``
  list (else the ``txt`` member, one caption per line), the split in the ``json`` member's ``split`` (default
  ``test``). :mod:`rdistill.eval.convert` writes this layout from a Karpathy file.

Bad input raises :class:`EvalDataError` naming the file and the entry (``dataset_flickr30k.json: images[12]: no
key 'sentences'``). Images are decoded once per split into ``(n, S, S, 3) uint8`` by :func:`load_images`, with the
evaluation transform of the authors' code: a bicubic resize to ``S x S`` (no crop).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rdistill.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TRAIN_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class EvalDataError(InputError, ValueError):
    """Evaluation data that cannot be used; the message names the file and entry."""


@dataclass
class EvalSplit:
    """One split: ``n_img`` images (paths, or encoded bytes from shards) and ``n_txt`` captions.

    ``txt2img (n_txt,) int64`` is the image of each caption; ``names`` identify the images in messages."""

    name: str
    source: str
    names: list[str]
    captions: list[str]
    txt2img: np.ndarray
    paths: list[str] | None = None
    data: list[bytes] | None = None

    @property
    def num_images(self) -> int:
        return len(self.names)

    @property
    def img2txt(self) -> list[np.ndarray]:
        order = np.argsort(self.txt2img, kind="stable")
        bounds = np.searchsorted(self.txt2img[order], np.arange(self.num_images + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(self.num_images)]


@dataclass
class EvalData:
    """The splits of one evaluation source (``train`` / ``val`` / ``test``, those present)."""

    source: str
    kind: str  # karpathy | shards
    splits: dict[str, EvalSplit] = field(default_factory=dict)

    def require(self, name: str, why: str) -> EvalSplit:
        if name not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise EvalDataError(f"{self.source}: no {name} split ({why}); splits present: {have}")
        return self.splits[name]


def _fail(path, where: str, what: str):
    raise EvalDataError(f"{path}: {where}: {what}")


def read_karpathy(path: str | Path, image_root: str | Path | None = None, check_images: bool = True) -> EvalData:
    """A Karpathy-style split file -> :class:`EvalData` with image paths under ``image_root`` (default: the
    file's folder). ``check_images``: fail now, naming the first missing image file, rather than mid-run."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: cannot read ({e})") from None
    except ValueError as e:
        raise EvalDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise EvalDataError(f"{path}: expected a Karpathy-style file, an object with an 'images' list")
    root = Path(image_root) if image_root else path.parent
    per: dict[str, dict] = {}
    for i, im in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            _fail(path, where, "not an object")
        for key in ("filename", "split", "sentences"):
            if key not in im:
                _fail(path, where, f"no key {key!r}")
        split = TRAIN_SPLITS.get(im["split"])
        if split is None:
            _fail(path, where, f"split {im['split']!r} is not one of {', '.join(TRAIN_SPLITS)}")
        sents = im["sentences"]
        if not isinstance(sents, list) or not sents:
            _fail(path, f"{where}.sentences", "expected a non-empty list")
        caps = []
        for j, s in enumerate(sents):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                _fail(path, f"{where}.sentences[{j}]", "no non-empty 'raw' caption")
            caps.append(raw.strip())
        rel = os.path.join(str(im.get("filepath") or ""), str(im["filename"]))
        d = per.setdefault(split, {"names": [], "paths": [], "captions": [], "txt2img": []})
        d["txt2img"] += [len(d["names"])] * len(caps)
        d["names"].append(rel)
        d["paths"].append(str(root / rel))
        d["captions"] += caps
    if not per:
        raise EvalDataError(f"{path}: no images")
    data = EvalData(str(path), "karpathy")
    for name, d in per.items():
        if check_images:
            missing = [p for p in d["paths"] if not os.path.isfile(p)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise EvalDataError(
                    f"{path}: image file {missing[0]} not found{more}; is --eval-images the image root of this file?"
                )
        data.splits[name] = EvalSplit(
            name, str(path), d["names"], d["captions"], np.asarray(d["txt2img"], np.int64), paths=d["paths"]
        )
    log.info(
        "%s: %s",
        path,
        ", ".join(f"{k} {v.num_images} images / {len(v.captions)} captions" for k, v in data.splits.items()),
    )
    return data


def _sample_captions(url: str, key: str, members: dict) -> tuple[list[str], str]:
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError as e:
            raise EvalDataError(f"{url}: sample {key}: json member is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise EvalDataError(f"{url}: sample {key}: json member is not an object")
    caps = meta.get("captions")
    if caps is None and "txt" in members:
        caps = [c.strip() for c in members["txt"].decode("utf-8", errors="replace").splitlines() if c.strip()]
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise EvalDataError(f"{url}: sample {key}: no captions (a json 'captions' list, or txt lines)")
    split = meta.get("split", "test")
    if split not in TRAIN_SPLITS:
        raise EvalDataError(f"{url}: sample {key}: split {split!r} is not one of {', '.join(TRAIN_SPLITS)}")
    return [c.strip() for c in caps], TRAIN_SPLITS[split]


def read_eval_shards(spec: str) -> EvalData:
    """WebDataset shards with one sample per image and several captions -> :class:`EvalData` (image bytes in
    memory). A sample without an image or captions is an error naming the shard and key."""
    from rdistill.io.shards import _KEY_EXT, ShardReadError, ShardSpecError, ShardStats, iter_members, resolve_shards

    try:
        urls = resolve_shards(spec)
    except ShardSpecError as e:
        raise EvalDataError(str(e)) from None
    per: dict[str, dict] = {}
    for url in urls:
        stats = ShardStats()
        groups: dict[str, dict] = {}
        try:
            for name, data in iter_members(url, stats):
                m = _KEY_EXT.match(name)
                if m is None:
                    continue
                groups.setdefault(m.group(1), {})[m.group(2).lower()] = data
        except ShardReadError as e:
            raise EvalDataError(str(e)) from None
        if stats.skipped.get("unreadable_tar"):
            raise EvalDataError(f"{url}: not a readable tar (or it breaks off)")
        for key, members in groups.items():
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                raise EvalDataError(f"{url}: sample {key}: no image member ({', '.join(IMAGE_EXTS)})")
            caps, split = _sample_captions(url, key, members)
            d = per.setdefault(split, {"names": [], "data": [], "captions": [], "txt2img": []})
            d["txt2img"] += [len(d["names"])] * len(caps)
            d["names"].append(f"{url}#{key}")
            d["data"].append(members[ext])
            d["captions"] += caps
    if not per:
        raise EvalDataError(f"{spec}: the shards hold no samples")
    data = EvalData(spec, "shards")
    for name, d in per.items():
        data.splits[name] = EvalSplit(
            name, spec, d["names"], d["captions"], np.asarray(d["txt2img"], np.int64), data=d["data"]
        )
    return data


def load_eval_data(spec: str, image_root: str | None = None) -> EvalData:
    """``spec``: a Karpathy-style ``.json`` file (images under ``image_root``, default its folder) or WebDataset
    shards with several captions per sample."""
    if str(spec).endswith(".json"):
        return read_karpathy(spec, image_root)
    if image_root:
        raise EvalDataError(f"--eval-images is for Karpathy-style .json files; {spec} is read as WebDataset shards")
    return read_eval_shards(spec)


def _decode_one(split: EvalSplit, i: int, size: int) -> np.ndarray:
    from PIL import Image

    from rdistill.io.shards import decode_image

    try:
        if split.data is not None:
            img = decode_image(split.data[i])
        else:
            with Image.open(split.paths[i]) as im:
                img = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        what = split.paths[i] if split.data is None else split.names[i]
        raise EvalDataError(f"{split.source}: image {what} cannot be decoded ({e})") from None
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def _decode(split: EvalSplit, size: int, threads: int, rows, skip_corrupt: bool) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(split.num_images) if rows is None else np.asarray(rows, np.int64)
    out = np.empty((len(idx), size, size, 3), np.uint8)
    ok = np.ones(len(idx), bool)
    bad: list[str] = []
    workers = threads or min(8, os.cpu_count() or 1)

    def work(k: int) -> None:
        try:
            out[k] = _decode_one(split, int(idx[k]), size)
        except EvalDataError as e:
            if not skip_corrupt:
                raise
            ok[k] = False
            bad.append(str(e))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(len(idx))))
    if bad:
        log.warning("%d images of the %s split skipped, e.g. %s", len(bad), split.name, min(bad))
        j = 0  # compact in place: a full training split's images can be most of the memory
        for k in np.flatnonzero(ok):
            if k != j:
                out[j] = out[k]
            j += 1
        out = out[:j]
    return out, ok


def load_images(split: EvalSplit, size: int, threads: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
    """The split's images (or those at ``rows``) -> ``(n, size, size, 3) uint8``, bicubic-resized to a square
    (the authors' evaluation transform, before normalisation). Decoded in ``threads`` threads (0: CPUs). An image
    that cannot be decoded is an :class:`EvalDataError` naming the file (the val and test splits)."""
    return _decode(split, size, threads, rows, skip_corrupt=False)[0]


def load_train_images(
    split: EvalSplit, size: int, threads: int = 0, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`load_images`, for training: images that cannot be decoded are skipped (logged) rather than
    stopping the run. Returns the decoded ones, ``(k, size, size, 3) uint8`` in order, and which of the split's
    images (or of ``rows``) they are, ``(n,) bool``."""
    return _decode(split, size, threads, rows, skip_corrupt=True)


def caption_counts(split: EvalSplit) -> Counter:
    """How many images have how many captions (for summaries: Flickr30K and COCO have 5 each)."""
    return Counter(np.bincount(split.txt2img, minlength=split.num_images).tolist())
