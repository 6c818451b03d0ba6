"""Karpathy-style data -> WebDataset shards, so a user with Flickr30K or COCO on disk can run the whole job.

    python -m rdistill.eval.convert --karpathy dataset_flickr30k.json --images DIR --output DIR
                                    [--splits train] [--per-image] [--shard-size 1000]

* default, **one pair per caption** (as the authors' training split is laid out): ``{split}-{k:05d}.tar`` with
  ``KEY.jpg`` (the original file's bytes and extension), ``KEY.txt`` (the caption) and ``KEY.json`` (image file,
  split, image and sentence index); the training shards for ``rdistill.pds --input 'DIR/train-*.tar'``.
* ``--per-image``: **one sample per image** with all its captions (``json`` ``captions`` list and ``split``; ``txt``
  one caption per line): evaluation shards for ``--eval-data 'DIR/*.tar'`` (default splits: val and test).

Shards are written atomically, then ``_SUCCESS``; bad input (a missing image, a malformed entry) stops the run
with one line naming the file and entry.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tarfile
from pathlib import Path

from rdistill.cli import run_cli
from rdistill.io.karpathy import EvalDataError, read_karpathy
from rdistill.io.outputs import SUCCESS, atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: list) -> str:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            for ext, blob in members.items():
                _add(tar, f"{key}.{ext}", blob)
    return path.name


def _ext(filename: str) -> str:
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return "jpg" if ext in ("", "jpeg") else ext


def _samples(split, per_image: bool):
    """(key, members) of a split, in file order."""
    captions = split.img2txt
    for i, (name, path) in enumerate(zip(split.names, split.paths)):
        try:
            image = Path(path).read_bytes()
        except OSError as e:
            raise EvalDataError(f"{split.source}: image {path}: {e.strerror}") from None
        ext = _ext(name)
        caps = [split.captions[t] for t in captions[i]]
        if per_image:
            meta = {"image": name, "split": split.name, "image_index": i, "captions": caps}
            yield f"{i:08d}", {ext: image, "txt": "\n".join(caps).encode(), "json": json.dumps(meta).encode()}
        else:
            for j, cap in enumerate(caps):
                meta = {"image": name, "split": split.name, "image_index": i, "sentence": j, "caption": cap}
                yield f"{i:08d}_{j}", {ext: image, "txt": cap.encode(), "json": json.dumps(meta).encode()}


def convert_karpathy(
    karpathy: str | Path,
    images: str | Path | None,
    output: str | Path,
    splits=("train",),
    per_image: bool = False,
    shard_size: int = 1000,
) -> dict:
    """Write the ``splits`` of a Karpathy-style file as WebDataset shards into ``output``; returns a summary."""
    if shard_size < 1:
        raise EvalDataError(f"--shard-size must be at least 1, got {shard_size}")
    data = read_karpathy(karpathy, images)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUCCESS).unlink(missing_ok=True)
    written: dict[str, dict] = {}
    for name in splits:
        split = data.require(name, "asked for with --splits")
        n, shards, pending = 0, [], []
        for sample in _samples(split, per_image):
            pending.append(sample)
            n += 1
            if len(pending) == shard_size:
                shards.append(_write_shard(out / f"{name}-{len(shards):05d}.tar", pending))
                pending = []
        if pending:
            shards.append(_write_shard(out / f"{name}-{len(shards):05d}.tar", pending))
        written[name] = {"samples": n, "images": split.num_images, "captions": len(split.captions), "shards": shards}
        log.info("%s: %d samples in %d shards", name, n, len(shards))
    summary = {
        "karpathy": str(karpathy),
        "output": str(out),
        "layout": "per-image" if per_image else "per-caption",
        "splits": written,
    }
    atomic_write_json(out / "convert.json", summary)
    atomic_write_text(out / SUCCESS, "")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdistill.eval.convert", description="Karpathy-style retrieval data -> WebDataset shards."
    )
    p.add_argument("--karpathy", required=True, help="dataset_flickr30k.json, dataset_coco.json or alike")
    p.add_argument("--images", help="image root of the file (default: its folder)")
    p.add_argument("--output", required=True, help="output directory of the shards")
    p.add_argument("--splits", help="comma-separated splits (default: train; with --per-image: val,test)")
    p.add_argument("--per-image", action="store_true", help="one sample per image with all captions (eval shards)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.set_defaults(config=None, overrides=[])
    return p


def main(argv: list[str] | None = None) -> int:
    def run(args, cfg):
        splits = args.splits or ("val,test" if args.per_image else "train")
        return convert_karpathy(
            args.karpathy,
            args.images,
            args.output,
            tuple(s.strip() for s in splits.split(",")),
            args.per_image,
            args.shard_size,
        )

    def report(s):
        for name, d in s["splits"].items():
            print(
                f"{name}: {d['samples']} samples ({d['images']} images, {d['captions']} captions) in "
                f"{len(d['shards'])} shards at {s['output']}"
            )

    return run_cli(build_parser(), argv, run, report)


if __name__ == "__main__":
    sys.exit(main())
