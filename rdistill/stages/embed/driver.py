"""The embedding stage: WebDataset shards -> CLIP embeddings in the clip-retrieval / LAION layout.

    python -m rdistill.embed --input SHARDS --output DIR [--config FILE] [--set key=value ...]

SHARDS is a directory, a glob, a brace pattern (``data/{00000..00099}.tar``) or a URL (anything fsspec opens).
Ray Data reads and decodes the shards in CPU tasks and streams them through a fixed-size pool of open_clip actors
(:mod:`rdistill.stages.embed.worker`); the driver writes one part per shard, atomically, then its done-marker:

    DIR/img_emb/img_emb_{i}.npy      (n, d) float16, raw image embeddings (not normalised)
    DIR/text_emb/text_emb_{i}.npy    (n, d) float16, raw text embeddings
    DIR/metadata/metadata_{i}.parquet key, caption, shard, index (row-aligned with the two arrays)
    DIR/_done/part_{i}.json          the shard's counts and timing; written after the part's files
    DIR/embed.json                   the run record: input shards with their sizes and mtimes, model name, tag, dim,
                                     preprocessing, result-defining config; DIR/summary.json

Part ``i`` holds the samples of the ``i``-th shard of the sorted shard list, in tar order. Vectors are stored raw
so that their norms, which the unCLIP decoder was trained on, survive; the prototype engine normalises on read.
A rerun embeds only the shards without a done-marker; shards changed since the last run (size or mtime), another
model or config are refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rdistill.cli import add_common_args, run_cli
from rdistill.config import Config, dump_config
from rdistill.errors import RunError
from rdistill.io.fingerprint import fingerprint_urls
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
)
from rdistill.io.shards import SampleFormat, resolve_shards
from rdistill.metrics import progress
from rdistill.models.clip import ClipSpec, resolve_clip
from rdistill.stages.embed.worker import ClipEmbedder, read_shards
from rdistill.stages.parts import PartAssembler

log = logging.getLogger(__name__)

RUN_FILE = "embed.json"
FOLDERS = ("img_emb", "text_emb", "metadata")


def _part_paths(out: Path, i: int) -> dict[str, Path]:
    return {
        "img": out / "img_emb" / f"img_emb_{i}.npy",
        "txt": out / "text_emb" / f"text_emb_{i}.npy",
        "meta": out / "metadata" / f"metadata_{i}.parquet",
    }


def _save_npy(path: Path, x: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, x)


_COLUMNS = ("index", "key", "caption", "img_emb", "txt_emb")


class _PartWriter:
    """Turns the pool's output batches into rows per part for the :class:`PartAssembler`, and writes a complete
    part: the two arrays and the metadata, each published atomically."""

    def __init__(self, out: Path, shards: list[str], dim: int, bar):
        self.out, self.shards, self.dim, self.bar = out, shards, dim, bar
        self.info: dict[int, dict] = {}
        self.asm = PartAssembler("embed", DoneMarkers(out, "part"), self.write, lambda p: f"part {p} ({shards[p]})")

    def add(self, batch: dict) -> None:
        end = np.asarray(batch["end"], dtype=bool)
        parts = np.asarray(batch["part"])
        for p in np.unique(parts).tolist():
            m = parts == p
            live = m & ~end
            if live.any():
                cols = {k: np.asarray(batch[k])[live] for k in _COLUMNS}
                self.asm.add(p, {"pos": cols.pop("index"), **cols})
            ends = np.flatnonzero(m & end)
            if len(ends):
                info = json.loads(batch["info"][ends[0]])
                self.info[p] = info
                self.asm.end(p, int(batch["index"][ends[0]]), info["error"])
                self.bar.update(1)
                self.bar.set_postfix(samples=self.asm.rows, refresh=False)

    def write(self, p: int, cols: dict) -> dict:
        n, info = len(cols["pos"]), self.info[p]
        paths = _part_paths(self.out, p)
        key = cols.get("key", np.zeros(0, dtype=object))
        caption = cols.get("caption", np.zeros(0, dtype=object))
        table = pa.table({
            "key": pa.array([str(k) for k in key], pa.string()),
            "caption": pa.array([str(c) for c in caption], pa.string()),
            "shard": pa.array([self.shards[p]] * n, pa.string()),
            "index": pa.array(np.asarray(cols["pos"], dtype=np.int64)),
        })  # fmt: skip
        empty = np.zeros((0, self.dim), np.float16)
        _save_npy(paths["img"], np.ascontiguousarray(cols.get("img_emb", empty), dtype=np.float16))
        _save_npy(paths["txt"], np.ascontiguousarray(cols.get("txt_emb", empty), dtype=np.float16))
        with atomic_path(paths["meta"]) as tmp:
            pq.write_table(table, tmp)
        seconds = max(time.time() - info["started"], 1e-9)
        return {
            "part": p,
            "shard": self.shards[p],
            "samples": n,
            "skipped": info["skipped"],
            "retries": info["retries"],
            "read_seconds": round(info["read_seconds"], 3),
            "seconds": round(seconds, 3),
            "samples_per_s": round(n / seconds, 1),
            "finished": time.time(),
        }


def _clear(out: Path) -> None:
    clear_output(out, (*FOLDERS, "_done"), (SUCCESS, "summary.json", RUN_FILE, "config.yaml"))


def _run_record(input_spec: str, shards: list[str], spec: ClipSpec, cfg: Config) -> dict:
    return {
        "input_spec": input_spec,
        "input": fingerprint_urls(shards),
        "model": {
            "name": spec.model,
            "pretrained": spec.pretrained,
            "embed_dim": spec.embed_dim,
            "image_size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
            "resize_mode": spec.resize_mode,
        },
        "vectors": {"dtype": "float16", "normalized": False},
        "config": yaml.safe_load(dump_config(cfg, "embed")),
    }


def run_embed(input_spec: str, output: str | Path, cfg: Config, *, overwrite: bool = False) -> dict:
    """Embed the shards matched by ``input_spec`` into the store at ``output``; returns the summary dict.

    Parts already done are kept; a store made from other shards (or shards changed since), another model or
    result-defining config is refused unless ``overwrite``, which recomputes it.
    """
    out = Path(output)
    with lock_output(out):
        return _run_embed(input_spec, out, cfg, overwrite)


def _run_embed(input_spec: str, out: Path, cfg: Config, overwrite: bool) -> dict:
    import ray

    from rdistill.ray.pools import actor_pool_args, drain, reader_task_args, start_pool

    shards = resolve_shards(input_spec)
    spec = resolve_clip(cfg.embed.model, cfg.embed.pretrained)
    record = _run_record(input_spec, shards, spec, cfg)
    claim_output(out, RUN_FILE, record, ("input", "model", "config"), overwrite, _clear,
                 "embeddings of other shards, another model or config")  # fmt: skip
    markers = DoneMarkers(out, "part")
    done = markers.load(range(len(shards)), lambda i: _part_paths(out, i).values())
    pending = [i for i in range(len(shards)) if i not in done]
    idle = {"samples": 0, "seconds": 0.0, "samples_per_s": None}
    if not pending and (finished := finished_summary(out, RUN_FILE, idle, parts_this_run=0)):
        return finished
    (out / SUCCESS).unlink(missing_ok=True)
    atomic_write_json(out / RUN_FILE, record)
    atomic_write_text(out / "config.yaml", dump_config(cfg, "embed"))
    log.info("embed: %d shards, %d done, %d to embed with %s/%s (dim %d)", len(shards), len(done), len(pending),
             spec.model, spec.pretrained or "random", spec.embed_dim)  # fmt: skip
    plan, new, failed, wall, steady = None, [], [], 0.0, None
    if pending:
        plan = start_pool(cfg.ray, cfg.embed.pool, "embed")
        fmt = SampleFormat.from_config(cfg.embed)
        items = [{"part": i, "url": shards[i]} for i in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        reader = {"spec": spec, "fmt": fmt, "retries": cfg.embed.shard_retries, "block": cfg.embed.decode_batch}
        ds = ds.map_batches(
            read_shards, batch_size=1, fn_kwargs=reader, **reader_task_args(cfg.embed.decode_cpus, plan)
        )
        ds = ds.map_batches(
            ClipEmbedder,
            fn_constructor_kwargs={
                "spec": spec,
                "device": plan.device,
                "precision": plan.precision,
                "threads": plan.threads,
            },  # fmt: skip
            batch_size=cfg.embed.batch_size,
            **actor_pool_args(plan),
        )
        with progress(len(pending), "embed", cfg.progress, unit="shards") as bar:
            writer = _PartWriter(out, shards, spec.embed_dim, bar)
            wall = drain(ds, writer.add, "embedding")
        asm = writer.asm
        new, failed, steady = asm.done, asm.failed, asm.rate.steady()
        if asm.open:
            raise RuntimeError(f"parts {sorted(asm.open)} never received their end row")
    done.update({r["part"]: r for r in new})
    summary = _summary(input_spec, out, record, len(shards), done, new, failed, wall, plan)
    summary["this_run"]["steady_samples_per_s"] = steady
    atomic_write_json(out / "summary.json", summary)
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise RunError(f"{len(failed)} shard(s) failed, rerun to retry them: {failed[0]}{more}")
    atomic_write_text(out / SUCCESS, "")
    return summary


def _summary(input_spec, out, record, shards, done, new, failed, wall, plan) -> dict:
    skipped = Counter()
    for r in done.values():
        skipped.update(r["skipped"])
    samples_new = sum(r["samples"] for r in new)
    return {
        "stage": "embed",
        "input": input_spec,
        "output": str(out),
        "model": record["model"],
        "vectors": record["vectors"],
        "shards": shards,
        "parts_done": len(done),
        "parts_this_run": len(new),
        "failed": failed,
        "counts": {"samples": sum(r["samples"] for r in done.values()), "skipped": dict(sorted(skipped.items()))},
        "this_run": {
            "samples": samples_new,
            "seconds": round(wall, 3),
            "samples_per_s": round(samples_new / wall, 1) if wall > 0 else None,
        },
        "pool": plan.to_dict() if plan else None,
        "parts": [done[i] for i in sorted(done)],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdistill.embed",
        description="CLIP embeddings of WebDataset shards, in the clip-retrieval / LAION layout.",
    )
    p.add_argument("--input", required=True, help="shards: directory, glob, brace pattern or fsspec URL")
    p.add_argument("--output", required=True, help="output directory (the embedding store)")
    add_common_args(p, upstream=False)
    return p


def print_summary(summary: dict) -> None:
    c, r = summary["counts"], summary["this_run"]
    skipped = ", ".join(f"{k} {v}" for k, v in c["skipped"].items()) or "none"
    print(f"embed: {c['samples']} samples in {summary['parts_done']} parts at {summary['output']}")
    print(f"  model {summary['model']['name']}/{summary['model']['pretrained'] or 'random'}, "
          f"dim {summary['model']['embed_dim']}; skipped: {skipped}")  # fmt: skip
    if r["samples_per_s"]:
        print(f"  this run: {r['samples']} samples in {r['seconds']:.1f} s ({r['samples_per_s']:.0f} samples/s)")


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        argv,
        lambda args, cfg: run_embed(args.input, args.output, cfg, overwrite=args.overwrite),
        print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
