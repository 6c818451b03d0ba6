"""A tiny Karpathy-style retrieval dataset made on the spot: the toy shapes of :mod:`rdistill.dev.toydata` with
five captions per image, written as image files and a ``dataset_toy.json`` in Karpathy's layout. It feeds the
evaluation tests, the demo's ``--eval-data`` and the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rdistill.dev.toydata import COLORS, SHAPES, _draw

CAPTIONS = (
    "a {c} {s} on a {b} background",
    "a photo of a {c} {s}",
    "{c} {s}, {b} backdrop",
    "a drawing of a {c} {s} over {b}",
    "the {s} is {c}",
)


def write_toy_karpathy(
    root: str | Path, splits: dict[str, int], seed: int = 0, size: int = 48, captions: int = 5
) -> Path:
    """Write ``root/images/*.png`` and ``root/dataset_toy.json``: ``splits`` maps a split name (train, val,
    test) to its number of images, each with ``captions`` captions naming its shape, colour and background.
    Deterministic in ``seed``; returns the JSON file's path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    images, n = [], 0
    for split, count in splits.items():
        for _ in range(count):
            shape = SHAPES[rng.integers(len(SHAPES))]
            c, b = rng.choice(len(names), 2, replace=False)
            img = _draw(rng, shape, COLORS[names[c]], COLORS[names[b]], size)
            fname = f"{n:06d}.png"
            img.save(root / "images" / fname)
            sents = [
                {"raw": t.format(c=names[c], s=shape, b=names[b]), "sentid": n * captions + j}
                for j, t in enumerate(CAPTIONS[:captions])
            ]
            images.append(
                {
                    "filename": fname,
                    "filepath": "images",
                    "split": split,
                    "imgid": n,
                    "sentences": sents,
                    "concept": f"{names[c]} {shape}",
                }
            )
            n += 1
    path = root / "dataset_toy.json"
    path.write_text(json.dumps({"dataset": "toy", "images": images}))
    return path


def real_pair_samples(karpathy_json: Path, pairs: int, text_encoder: str = "clip:rdistill-tiny") -> list[dict]:
    """The first ``pairs`` images of a Karpathy file's train split as distilled-format samples (png bytes, their
    first caption, and that caption's unit text embedding under ``text_encoder`` as ``npy``): a real subset to train
    students on, for tests and benchmarks (:func:`rdistill.io.distilled.write_distilled_set`)."""
    from rdistill.io.karpathy import read_karpathy
    from rdistill.models.students import TextEncoder, parse_text_encoder

    split = read_karpathy(karpathy_json).splits["train"]
    caps = [split.captions[split.img2txt[i][0]] for i in range(pairs)]
    vec = TextEncoder(parse_text_encoder(text_encoder)).encode(caps)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    return [
        {
            "key": f"{i:08d}",
            "image": Path(split.paths[i]).read_bytes(),
            "ext": "png",
            "caption": caps[i],
            "npy": vec[i],
        }
        for i in range(pairs)
    ]
