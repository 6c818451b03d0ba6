"""The synthesis stage: PDS prototypes -> the distilled set, one unCLIP-painted image per prototype.

    python -m rdistill.synthesize --prototypes DIR --output DIR [--config FILE] [--set key=value ...]

Ray Data streams the prototypes through a fixed-size pool of decoder actors
(:class:`rdistill.stages.synthesize.worker.Painter`), a batch of prototypes per pipeline call. The driver writes
WebDataset shards of ``synthesize.shard_size`` prototypes, in id order, each atomically and followed by its
done-marker:

    DIR/shards/distilled-{k:05d}.tar   ID.png (or .jpg), ID.txt (caption), ID.npy (text prototype, float32),
                                       ID.json (clusters, shared pairs, alignment, seed, model); ID = 8-digit id
    DIR/manifest.parquet               one row per image: id, key, shard, caption, seed, cluster ids, ...
    DIR/_done/shard_{k}.json           the shard's rows and timing, written after its tar; DIR/summary.json,
                                       config.yaml, _SUCCESS; DIR/synthesize.json, the run record (the
                                       prototypes' content hash, result-defining settings)

A rerun paints only the shards without a done-marker; the final set has exactly one image per prototype.
Prototypes that changed since (content hash) or other settings are refused unless ``--overwrite``; prototypes of
ours whose run has not finished are refused unless ``--allow-incomplete``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rdistill.cli import add_common_args, run_cli
from rdistill.config import Config, dump_config
from rdistill.errors import RunError
from rdistill.io.distilled import write_pds_distilled_json
from rdistill.io.outputs import (
    SUCCESS,
    DoneMarkers,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    claim_output,
    clear_output,
    finished_summary,
    lock_output,
    require_finished,
)
from rdistill.metrics import progress
from rdistill.models.unclip import DecoderError, check_decoder_source, decoder_embed_dim
from rdistill.stages.parts import PartAssembler
from rdistill.stages.synthesize.worker import Painter, PaintSettings, check_dim, fill_norms, plain, sample_json

log = logging.getLogger(__name__)

RUN_FILE = "synthesize.json"
NEEDED = ("id", "image_embedding", "text_embedding", "caption")
CARRIED = ("caption_key", "image_cluster", "text_cluster", "shared_pairs", "alignment", "pairless", "refilled")
MANIFEST = ("id", "key", "shard", "caption", "seed") + CARRIED


def _key(proto_id: int) -> str:
    return f"{proto_id:08d}"


def _shard_name(k: int) -> str:
    return f"distilled-{k:05d}.tar"


def prototypes_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "prototypes.parquet" if path.is_dir() else path


def prototypes_finished(path: str | Path) -> tuple[bool, str]:
    """Whether the prototypes at ``path`` are finished: a prototypes run of ours (its run record beside the
    table) must have its ``_SUCCESS``; a table from elsewhere carries no marker and is taken as it is."""
    table = prototypes_path(path)
    folder = table.parent
    if table.exists() and (folder / "prototypes.json").exists() and not (folder / SUCCESS).exists():
        return False, "the prototypes run that writes it has not finished (no _SUCCESS)"
    return True, ""


def read_prototypes(path: str | Path, cfg: Config) -> pa.Table:
    """The prototypes table with the columns synthesis needs, validated; errors name the file and column."""
    path = prototypes_path(path)
    if not path.exists():
        raise RunError(f"{path}: prototypes not found (run python -m rdistill.prototypes first)")
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise RunError(f"{path}: not a readable parquet file ({e})") from None
    needed = NEEDED + (() if cfg.synthesize.image_norm > 0 else ("image_norm",))
    missing = [c for c in needed if c not in schema.names]
    if missing:
        hint = " (or set synthesize.image_norm to a fixed norm)" if missing == ["image_norm"] else ""
        raise RunError(f"{path}: missing column {missing[0]}{hint}")
    table = pq.read_table(path, columns=[c for c in (*NEEDED, "image_norm", *CARRIED) if c in schema.names])
    ids = table.column("id").to_numpy()
    if not np.array_equal(np.sort(ids), np.arange(len(ids))):
        raise RunError(f"{path}: column id must hold 0 .. {len(ids) - 1} once each")
    if len(ids) == 0:
        raise RunError(f"{path}: no prototypes")
    if "image_norm" not in table.column_names:
        table = table.append_column("image_norm", pa.array(np.zeros(len(ids), np.float32)))
    return table.take(pa.array(np.argsort(ids, kind="stable")))


def _fingerprint(table: pa.Table) -> str:
    """A hash of what the images depend on (embeddings, norms, captions), so that resuming onto prototypes that
    were recomputed in place is refused rather than mixing two sets."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("id", "image_embedding", "image_norm", "caption"):
        for chunk in table.column(name).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()


def _dim(table: pa.Table) -> int:
    return table.schema.field("image_embedding").type.list_size


class _ShardWriter:
    """Painted rows -> rows per output shard for the :class:`PartAssembler`; writes a complete shard's tar."""

    def __init__(self, out: Path, shard_size: int, total: int, model: str, image_format: str, bar):
        self.out, self.size, self.model, self.fmt, self.bar = out, shard_size, model, image_format, bar
        expected = {k: min(shard_size, total - k * shard_size) for k in range(math.ceil(total / shard_size))}
        self.asm = PartAssembler("synthesize", DoneMarkers(out, "shard"), self.write, lambda k: f"shard {k}",
                                 expected)  # fmt: skip

    def add(self, batch: dict) -> None:
        ids = np.asarray(batch["id"], dtype=np.int64)
        shard = ids // self.size
        for k in np.unique(shard).tolist():
            m = shard == k
            self.asm.add(k, {"pos": ids[m] - k * self.size, **{c: np.asarray(v)[m] for c, v in batch.items()}})
        self.bar.update(len(ids))

    def write(self, k: int, cols: dict) -> dict:
        rows = [{c: v[i] for c, v in cols.items() if c != "pos"} for i in range(len(cols["pos"]))]
        path = self.out / "shards" / _shard_name(k)
        _write_tar(path, rows, self.model, self.fmt)
        manifest = [{"id": int(r["id"]), "key": _key(int(r["id"])), "shard": path.name,
                     "caption": str(r["caption"]), "seed": int(r["seed"]),
                     **{c: plain(r[c]) for c in CARRIED if c in r}} for r in rows]  # fmt: skip
        return {"shard": path.name, "images": len(rows), "written": time.time(), "rows": manifest}


def _write_tar(path: Path, rows: list[dict], model: str, fmt: str) -> None:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False) as sink:
            for r in rows:
                buf = io.BytesIO()
                np.save(buf, np.asarray(r["text_embedding"], dtype=np.float32))
                sink.write({
                    "__key__": _key(int(r["id"])),
                    fmt: bytes(r["image"]),
                    "txt": str(r["caption"]).encode(),
                    "npy": buf.getvalue(),
                    "json": sample_json(r, model),
                })  # fmt: skip


def _clear(out: Path) -> None:
    clear_output(out, ("shards", "_done"),
                 (SUCCESS, "summary.json", RUN_FILE, "config.yaml", "manifest.parquet", "distilled.json"))  # fmt: skip


def run_synthesize(prototypes: str | Path, output: str | Path, cfg: Config, *, overwrite: bool = False,
                   allow_incomplete: bool = False, painter=Painter) -> dict:  # fmt: skip
    """Paint one image per prototype in ``prototypes`` (a prototypes dir or parquet) into ``output``.

    Unfinished prototypes of ours are refused unless ``allow_incomplete``; see :func:`claim_output` for resume.
    ``painter`` replaces the decoder actor (same rows in and out): the funnel benchmark runs this driver with a
    do-nothing decoder."""
    out = Path(output)
    with lock_output(out):
        return _run_synthesize(prototypes, out, cfg, overwrite, allow_incomplete, painter)


def _run_synthesize(prototypes, out: Path, cfg: Config, overwrite: bool, allow_incomplete: bool, painter) -> dict:
    import ray

    from rdistill.ray.pools import actor_pool_args, drain, start_pool

    sc = cfg.synthesize
    finished, why = prototypes_finished(prototypes)
    incomplete = require_finished(str(prototypes), finished, why, allow_incomplete)
    table = read_prototypes(prototypes, cfg)
    total, dim = table.num_rows, _dim(table)
    check_decoder_source(sc.model)
    want = decoder_embed_dim(sc.model)
    if want is not None:
        try:
            check_dim(dim, sc.model, want)
        except DecoderError as e:
            raise RunError(f"{prototypes}: {e}") from None
    record = {"prototypes": str(prototypes), "input": {"count": total, "dim": dim, "fingerprint": _fingerprint(table)},
              "config": yaml.safe_load(dump_config(cfg, "synthesize"))}  # fmt: skip
    claim_output(out, RUN_FILE, record, ("input", "config"), overwrite, _clear,
                 "images of other prototypes or settings")  # fmt: skip
    shards = math.ceil(total / sc.shard_size)
    markers = DoneMarkers(out, "shard")
    done = markers.load(range(shards), lambda k: [out / "shards" / _shard_name(k)])
    pending = [k for k in range(shards) if k not in done]
    idle = {"images": 0, "shards": 0, "seconds": 0.0, "images_per_s": None}
    if not pending and (finished := finished_summary(out, RUN_FILE, idle)):
        return finished
    (out / SUCCESS).unlink(missing_ok=True)
    atomic_write_json(out / RUN_FILE, record)
    atomic_write_text(out / "config.yaml", dump_config(cfg, "synthesize"))
    norms_filled = 0
    if sc.image_norm == 0:
        try:
            norms, norms_filled = fill_norms(table.column("image_norm").to_numpy(zero_copy_only=False))
        except DecoderError as e:
            raise RunError(f"{prototypes}: {e}") from None
        table = table.set_column(table.schema.get_field_index("image_norm"), "image_norm", pa.array(norms))
        if norms_filled:
            log.info("%d prototypes without a recorded image norm (pairless) get the median norm", norms_filled)
    norms = table.column("image_norm").to_numpy()
    if sc.image_norm == 0 and np.allclose(norms, 1.0, atol=0.05):
        log.warning("the prototypes' recorded image norms are all about 1: the store held normalised vectors. "
                    "The decoder expects raw CLIP norms; set synthesize.image_norm")  # fmt: skip
    log.info("synthesize: %d prototypes in %d shards, %d done, %d to paint with %s", total, shards, len(done),
             len(pending), sc.model)  # fmt: skip
    new, wall, plan, steady = [], 0.0, None, None
    if pending:
        plan = start_pool(cfg.ray, sc.pool, "synthesize")
        shard_of = table.column("id").to_numpy() // sc.shard_size
        todo = table.filter(pa.array(np.isin(shard_of, pending)))
        n_todo = todo.num_rows
        step = max(sc.batch_size, 1)
        ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, n_todo, step)])
        ds = ds.map_batches(
            painter,
            fn_constructor_kwargs={
                "model": sc.model,
                "settings": PaintSettings.from_config(sc),
                "seed": cfg.seed,
                "device": plan.device,
                "precision": plan.precision,
                "threads": plan.threads,
                "expect_dim": dim,
            },  # fmt: skip
            batch_size=sc.batch_size,
            **actor_pool_args(plan),
        )
        with progress(n_todo, "synthesize", cfg.progress, unit="images") as bar:
            writer = _ShardWriter(out, sc.shard_size, total, sc.model, sc.image_format, bar)
            wall = drain(ds, writer.add, "synthesis")
        asm = writer.asm
        new, steady = asm.done, asm.rate.steady()
        if asm.open:
            raise RuntimeError(f"shards {sorted(asm.open)} did not receive all their images")
    done.update({int(r["shard"].split("-")[1].split(".")[0]): r for r in new})
    manifest = [row for k in sorted(done) for row in done[k]["rows"]]
    if [r["id"] for r in manifest] != list(range(total)):
        raise RunError(f"{out}: the shards do not hold exactly one image per prototype; rerun with --overwrite")
    with atomic_path(out / "manifest.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(manifest), tmp)
    # what the evaluation harness reads: the text space of the .npy vectors, the image format (rdistill.io.distilled)
    write_pds_distilled_json(out, prototypes, count=total, dim=dim, image_format=sc.image_format,
                             image_size=sc.image_size)  # fmt: skip
    images_new = sum(r["images"] for r in new)
    summary = {
        "stage": "synthesize",
        "prototypes": str(prototypes),
        "prototypes_incomplete": incomplete,
        "output": str(out),
        "model": sc.model,
        "settings": PaintSettings.from_config(sc).__dict__,
        "images": total,
        "shards": shards,
        "norms_filled": norms_filled,
        "this_run": {
            "images": images_new,
            "shards": len(new),
            "seconds": round(wall, 3),
            "images_per_s": round(images_new / wall, 3) if wall > 0 else None,
            "steady_images_per_s": steady,
        },
        "pool": plan.to_dict() if plan else None,
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / SUCCESS, "")
    return summary


def print_summary(summary: dict) -> None:
    r = summary["this_run"]
    print(f"synthesize: {summary['images']} images in {summary['shards']} shards at {summary['output']}")
    if r["images_per_s"]:
        print(f"  this run: {r['images']} images in {r['seconds']:.1f} s ({r['images_per_s']:.2f} images/s) "
              f"with {summary['model']}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rdistill.synthesize",
                                description="Paint one image per PDS prototype with an unCLIP decoder.")  # fmt: skip
    p.add_argument("--prototypes", required=True, help="prototypes directory (or its prototypes.parquet)")
    p.add_argument("--output", required=True, help="output directory of the distilled set")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        argv,
        lambda args, cfg: run_synthesize(
            args.prototypes, args.output, cfg, overwrite=args.overwrite, allow_incomplete=args.allow_incomplete
        ),
        print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
