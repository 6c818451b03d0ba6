"""The distilled format, set-level: ``distilled.json`` beside a distilled set's shards and ``manifest.parquet``.

A distilled set (PDS synthesis, a coreset, a real subset, another method's output converted) is

    DIR/shards/*.tar          KEY.png|jpg|... (image), KEY.txt (caption), optional KEY.npy (text vector, float32),
                              optional KEY.f32.npy (the image as a ``(3, S, S) float32`` tensor in the students'
                              CLIP-normalised pixel space: an optimised image, of which the PNG is a preview),
                              KEY.json (per-sample provenance)
    DIR/soft_labels.npy       optional ``(M, M) float32`` learned similarity labels, rows in manifest order
    DIR/manifest.parquet      one row per pair, in set order: at least ``key`` and ``shard`` (the tar's file name)
    DIR/distilled.json        what the set is, written by :func:`write_distilled_json`:

    {"format": 1, "method": "pds" | "coreset:herding" | ..., "count": M,
     "text": {"space": "clip:ViT-L-14/openai" | "bert:bert-base-uncased" | "none", "vectors": "npy" | null,
              "normalized": true, "dim": 768},
     "image": {"format": "png", "size": 224, "tensor": null | "f32.npy"},
     "students": {"lr_image": null, "lr_text": null, "soft_labels": null | "soft_labels.npy",
                  "soft_label_loss": null | "wbce"},
     "source": {...}}

``text.space`` names the encoder whose space the ``.npy`` vectors live in (``none``: captions only; the harness
then encodes the captions itself); ``normalized`` says whether they are means of unit vectors (PDS) or raw encoder
outputs (LoRS's BERT features). ``students`` is what a method learned for its students, applied by the evaluation
harness as follows: ``lr_image`` / ``lr_text`` become the SGD learning rates of the image backbone and text head
unless ``evaluate.lr_image`` / ``evaluate.lr_text`` are set; ``soft_labels`` (a file in DIR holding an ``(M, M)``
similarity matrix, as LoRS learns) makes the students train with ``soft_label_loss`` (LoRS's weighted BCE of the
logits against the labels of each batch, :func:`rdistill.eval.train.soft_label_loss`) instead of InfoNCE. With
``image.tensor`` set, the harness trains on the ``KEY.f32.npy`` tensors (no 8-bit rounding), not on the previews.

:func:`read_distilled_info` reads the file, and for a set without one (written before it existed) falls back on
what the synthesis stage's run records say (synthesize.json -> prototypes.json -> the store's embed.json), else on
``text.space = "unknown"``, which the harness accepts only after checking the vectors' dimension.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rdistill.errors import InputError

log = logging.getLogger(__name__)

DISTILLED_JSON = "distilled.json"
FORMAT = 1
TENSOR_EXT = "f32.npy"  # the member of an image stored as a float tensor
SOFT_LABELS = "soft_labels.npy"


class DistilledError(InputError, ValueError):
    """A distilled set that cannot be read; the message names the file."""


def distilled_info(
    *,
    method: str,
    count: int,
    text_space: str = "none",
    text_vectors: bool = False,
    text_normalized: bool = True,
    text_dim: int | None = None,
    image_format: str = "png",
    image_size: int | None = None,
    image_tensor: str | None = None,
    lr_image: float | None = None,
    lr_text: float | None = None,
    soft_labels: str | None = None,
    soft_label_loss: str | None = None,
    source: dict | None = None,
) -> dict:
    """The ``distilled.json`` document (see the module docstring)."""
    return {
        "format": FORMAT,
        "method": method,
        "count": int(count),
        "text": {
            "space": text_space,
            "vectors": "npy" if text_vectors else None,
            "normalized": bool(text_normalized),
            "dim": None if text_dim is None else int(text_dim),
        },
        "image": {"format": image_format, "size": image_size, "tensor": image_tensor},
        "students": {
            "lr_image": lr_image,
            "lr_text": lr_text,
            "soft_labels": soft_labels,
            "soft_label_loss": soft_label_loss if soft_labels else None,
        },
        "source": source or {},
    }


def write_distilled_json(out_dir: str | Path, **fields) -> Path:
    """Write ``out_dir/distilled.json`` atomically from :func:`distilled_info`'s keyword arguments."""
    from rdistill.io.outputs import atomic_write_json

    path = Path(out_dir) / DISTILLED_JSON
    atomic_write_json(path, distilled_info(**fields))
    return path


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prototypes_text_space(prototypes: str | Path) -> tuple[str, bool]:
    """The text space of a prototypes run's vectors and whether they are means of unit vectors, from its run
    record (``prototypes.json``: the store and ``embeddings.normalize``) and the store's ``embed.json`` (the
    model); ``("unknown", True)`` when the records do not say (a store from another writer)."""
    protos = Path(str(prototypes))
    protos = protos if protos.is_dir() else protos.parent
    rec = _json(protos / "prototypes.json") or {}
    normalized = bool(((rec.get("config") or {}).get("embeddings") or {}).get("normalize", True))
    store = rec.get("embeddings")
    embed = _json(Path(store) / "embed.json") if store and "://" not in str(store) else None
    if embed and embed.get("model"):
        from rdistill.models.students import clip_space

        return clip_space(embed["model"]["name"], embed["model"].get("pretrained", "")), normalized
    return "unknown", normalized


def write_pds_distilled_json(
    out_dir: str | Path, prototypes: str | Path, *, count: int, dim: int, image_format: str, image_size: int
) -> Path:
    """``distilled.json`` of a PDS set painted from ``prototypes`` (the synthesis stage): text vectors are the
    text prototypes (``.npy``), in the space of the CLIP that embedded the store."""
    space, normalized = prototypes_text_space(prototypes)
    return write_distilled_json(
        out_dir,
        method="pds",
        count=count,
        text_space=space,
        text_vectors=True,
        text_normalized=normalized,
        text_dim=dim,
        image_format=image_format,
        image_size=image_size,
        source={"prototypes": str(prototypes)},
    )


def _fallback(root: Path) -> dict:
    """What the synthesis stage's run records say about a set without ``distilled.json``."""
    count = None
    manifest = root / "manifest.parquet"
    if manifest.exists():
        import pyarrow.parquet as pq

        count = pq.ParquetFile(manifest).metadata.num_rows
    space, normalized, vectors = "unknown", True, None
    syn = _json(root / "synthesize.json")
    if syn is not None:
        vectors = "npy"
        space, normalized = prototypes_text_space(syn.get("prototypes", ""))
    info = distilled_info(
        method="pds" if syn is not None else "unknown",
        count=count or 0,
        text_space=space,
        text_vectors=vectors == "npy",
        text_normalized=normalized,
    )
    info["fallback"] = True
    log.info("%s: no %s; taken as text space %s (from the run records)", root, DISTILLED_JSON, space)
    return info


def read_distilled_info(path: str | Path) -> dict:
    """The ``distilled.json`` of the set at ``path`` (its directory), or the fallback described above."""
    root = Path(path)
    file = root / DISTILLED_JSON
    if not file.exists():
        return _fallback(root)
    info = _json(file)
    if not isinstance(info, dict) or "text" not in info:
        raise DistilledError(f"{file}: not a distilled.json of format {FORMAT} (no 'text' section)")
    return info


def write_distilled_set(
    out_dir: str | Path, samples, *, shard_size: int = 1000, prefix: str = "distilled", **info
) -> list[dict]:
    """Write a set in the distilled format into ``out_dir``: ``samples`` is an iterable of dicts with ``key``,
    ``image`` (encoded bytes), ``ext`` (``png``, ``jpg``, ...), ``caption``, optional ``npy`` (``(d,) float32``
    text vector), optional ``tensor`` (the image as ``(3, S, S) float32``, member ``KEY.f32.npy``) and ``meta`` (a
    JSON-able dict: the ``KEY.json`` member and extra manifest columns). Shards of
    ``shard_size`` samples, each written atomically; then ``manifest.parquet`` and ``distilled.json`` (``info``:
    the keyword arguments of :func:`distilled_info`; ``count`` is filled in). Returns the manifest rows."""
    import io
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rdistill.io.outputs import atomic_path

    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    pending: list[dict] = []

    def add(tar, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
        tar.addfile(ti, io.BytesIO(data))

    def flush() -> None:
        name = f"{prefix}-{len(rows) // shard_size:05d}.tar"
        with atomic_path(out / "shards" / name) as tmp, tarfile.open(tmp, "w") as tar:
            for s in pending:
                add(tar, f"{s['key']}.{s['ext']}", bytes(s["image"]))
                add(tar, f"{s['key']}.txt", str(s["caption"]).encode())
                if s.get("npy") is not None:
                    buf = io.BytesIO()
                    np.save(buf, np.asarray(s["npy"], dtype=np.float32))
                    add(tar, f"{s['key']}.npy", buf.getvalue())
                if s.get("tensor") is not None:
                    buf = io.BytesIO()
                    np.save(buf, np.asarray(s["tensor"], dtype=np.float32))
                    add(tar, f"{s['key']}.{TENSOR_EXT}", buf.getvalue())
                add(tar, f"{s['key']}.json", json.dumps(s.get("meta") or {}).encode())
        for s in pending:
            extra = {k: v for k, v in (s.get("meta") or {}).items() if isinstance(v, int | float | str)}
            rows.append({"id": len(rows), "key": s["key"], "shard": name, "caption": str(s["caption"]), **extra})
        pending.clear()

    for s in samples:
        pending.append(s)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not rows:
        raise DistilledError(f"{out}: no samples to write")
    with atomic_path(out / "manifest.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    write_distilled_json(out, count=len(rows), **info)
    return rows
