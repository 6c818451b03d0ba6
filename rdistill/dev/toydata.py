"""A small image-text dataset made on the spot, as WebDataset shards of real image files: coloured shapes on
coloured backgrounds, captioned in words ("a red circle on a blue background"). It feeds the offline demo, the
tests and the benchmarks; ``concept`` in each sample's JSON says which (shape, colour) pair it shows.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
TEMPLATES = (
    "a {c} {s} on a {b} background",
    "a photo of a {c} {s}",
    "{c} {s}, {b} backdrop",
    "a drawing of a {c} {s}",
)


def _draw(rng: np.random.Generator, shape: str, color, bg, size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    else:
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    return img


def encode_image(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def toy_samples(n: int, seed: int = 0, size: int = 96, formats=("jpg", "png", "webp"), start: int = 0):
    """``n`` samples as dicts ``{"__key__", ext: bytes, "txt": bytes, "json": bytes}``; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    for i in range(start, start + n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        c, b = rng.choice(len(names), 2, replace=False)
        color, bg = names[c], names[b]
        fmt = formats[i % len(formats)]
        caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(c=color, s=shape, b=bg)
        img = _draw(rng, shape, COLORS[color], COLORS[bg], size)
        meta = {"caption": caption, "concept": f"{color} {shape}", "background": bg}
        yield {"__key__": f"{i:08d}", fmt: encode_image(img, fmt), "txt": caption.encode(),
               "json": json.dumps(meta).encode()}  # fmt: skip


def write_tar(path: str | Path, samples) -> int:
    """Write samples (dicts as from :func:`toy_samples`) to a tar at ``path``; members in key order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def write_toy_shards(
    out_dir: str | Path, num_shards: int, per_shard: int, seed: int = 0, size: int = 96
) -> list[Path]:
    """``num_shards`` shards ``toy-00000.tar`` ... of ``per_shard`` samples each; returns their paths."""
    paths = []
    for k in range(num_shards):
        path = Path(out_dir) / f"toy-{k:05d}.tar"
        write_tar(path, toy_samples(per_shard, seed=seed * 100_003 + k, size=size, start=k * per_shard))
        paths.append(path)
    return paths
