"""The embedding stage: WebDataset shards -> CLIP embeddings in the clip-retrieval / LAION layout.

    python -m rdistill.embed --input SHARDS --output DIR [--config FILE] [--set key=value ...]

SHARDS is a directory, a glob, a brace pattern (``data/{00000..00099}.tar``) or a URL (anything fsspec opens).
Ray Data reads and decodes the shards in CPU tasks and streams them through a fixed-size pool of open_clip actors
(:mod:`rdistill.stages.embed.worker`). The actors write what they embed to ``DIR/_staging/`` and tell the driver
only which rows of which part they wrote; once a part's rows are all staged, a part writer (an actor per node)
writes the part, each file atomically, and the driver writes its done-marker. No vector passes through the
driver, which could not take in and write the output of many GPUs (see "Driver funnel in the model stages" in
docs/benchmarks.md). One part per shard:

    DIR/img_emb/img_emb_{i}.npy      (n, d) float16, raw image embeddings (not normalised)
    DIR/text_emb/text_emb_{i}.npy    (n, d) float16, raw text embeddings
    DIR/metadata/metadata_{i}.parquet key, caption, shard, index (row-aligned with the two arrays)
    DIR/_done/part_{i}.json          the shard's counts and timing; written after the part's files
    DIR/embed.json                   the run record: input shards with their sizes and mtimes, model name, tag, dim,
                                     preprocessing, result-defining config; DIR/summary.json

Part ``i`` holds the samples of the ``i``-th shard of the sorted shard list, in tar order. Vectors are stored raw
so that their norms, which the unCLIP decoder was trained on, survive; the prototype engine normalises on read.
A rerun embeds only the shards without a done-marker (what a killed run staged is removed first); shards changed
since the last run (size or mtime), another model or config are refused unless ``--overwrite``. Workers write into
DIR: on a cluster it must be on storage every node reaches, as the input shards must.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import uuid
from collections import Counter, deque
from pathlib import Path

import numpy as np
import yaml

from rdistill.cli import add_common_args, run_cli
from rdistill.config import Config, dump_config
from rdistill.errors import RunError
from rdistill.io.fingerprint import fingerprint_urls
from rdistill.io.outputs import (
    SUCCESS,
    DoneMarkers,
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
from rdistill.stages.embed.worker import ClipEmbedder, PartStager, StagedPartWriter, part_paths, read_shards
from rdistill.stages.parts import FragmentLedger, mark_unit

log = logging.getLogger(__name__)

RUN_FILE = "embed.json"
FOLDERS = ("img_emb", "text_emb", "metadata")


STAGING = "_staging"
# part writers: one actor per node of the cluster, at least two (one part's fsyncs overlap another's reading), at
# most this many (a candidate for a config key, embed.part_writers); each has one part in hand and one queued
# before the driver waits for the oldest
MAX_PART_WRITERS = 16


class _PartSink:
    """The driver's end of the pool. It receives fragment rows (a few numbers per batch of embedded samples, see
    :mod:`rdistill.stages.embed.worker`), hands each part whose fragments tile it to a part writer (round robin),
    and writes the done-marker of each part a writer published, in the order the parts completed (so
    ``RDISTILL_FAULT_KILL_AFTER`` counts them in stream order). ``fetched_bytes`` counts what reached the driver."""

    def __init__(self, out: Path, shards: list[str], dim: int, staging: Path, bar, writers: list):
        self.out, self.shards, self.dim, self.staging, self.bar = out, shards, dim, staging, bar
        self.writers, self.started = writers, 0
        self.ledger = FragmentLedger(lambda p: f"part {p} ({shards[p]})")
        self.markers = DoneMarkers(out, "part")
        self.info: dict[int, dict] = {}
        self.writes: deque = deque()
        self.done: list[dict] = []
        self.failed: list[str] = []
        self.samples = 0
        self.fetched_bytes = 0

    def add(self, batch: dict) -> None:
        self.fetched_bytes += sum(_nbytes(v) for v in batch.values())
        rows = zip(*(batch[k].tolist() for k in ("part", "first", "rows", "end", "info")))
        for p, first, n, end, info in rows:
            if not end:
                complete = self.ledger.add(p, first, n)
            else:
                info = json.loads(info)
                if info["error"]:
                    self.ledger.fail(p)
                    self.failed.append(info["error"])
                    log.error("embed part %d (%s): %s", p, self.shards[p], info["error"])
                    continue
                self.info[p] = info
                complete = self.ledger.end(p, first)
            if complete:
                writer = self.writers[self.started % len(self.writers)]
                self.started += 1
                ref = writer.write.remote(self.out, p, self.shards[p], self.dim, self.staging, self.ledger.pop(p),
                                          self.info.pop(p))  # fmt: skip
                self.writes.append((p, ref))
        self.collect(2 * len(self.writers))

    def collect(self, in_flight: int | None = None) -> None:
        """Mark the finished writes at the head of the queue; with ``in_flight``, first wait for the oldest until
        at most that many are left (0: all)."""
        import ray

        while self.writes:
            p, ref = self.writes[0]
            if in_flight is not None and len(self.writes) > in_flight:
                record = ray.get(ref)
            elif ray.wait([ref], timeout=0)[0]:
                record = ray.get(ref)
            else:
                return
            self.writes.popleft()
            if "error" in record:
                self.failed.append(record["error"])
                log.error("embed part %d (%s): %s", p, self.shards[p], record["error"])
                continue
            mark_unit("embed", self.markers, p, record, self.done)
            self.samples += record["samples"]
            self.bar.update(1)
            self.bar.set_postfix(samples=self.samples, refresh=False)


def _nbytes(v) -> int:
    a = np.asarray(v)
    return a.nbytes + (sum(len(x) for x in a.ravel() if isinstance(x, (str, bytes))) if a.dtype == object else 0)


def _clear_staging(out: Path) -> None:
    """Remove what an unfinished run left: its staged fragments and any temporary file of a part being written
    when it was killed (the output lock says no other run writes here)."""
    shutil.rmtree(out / STAGING, ignore_errors=True)
    for folder in FOLDERS:
        for tmp in (out / folder).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _clear(out: Path) -> None:
    clear_output(out, (*FOLDERS, "_done", STAGING), (SUCCESS, "summary.json", RUN_FILE, "config.yaml"))


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


def run_embed(input_spec: str, output: str | Path, cfg: Config, *, overwrite: bool = False, reader=read_shards,
              embedder=ClipEmbedder) -> dict:  # fmt: skip
    """Embed the shards matched by ``input_spec`` into the store at ``output``; returns the summary dict.

    Parts already done are kept; a store made from other shards (or shards changed since), another model or
    result-defining config is refused unless ``overwrite``, which recomputes it. ``reader`` and ``embedder``
    replace the shard reader and the model actor (same rows in and out): the funnel benchmark runs this driver
    with a do-nothing model.
    """
    out = Path(output)
    with lock_output(out):
        return _run_embed(input_spec, out, cfg, overwrite, reader, embedder)


def _run_embed(input_spec: str, out: Path, cfg: Config, overwrite: bool, reader_fn, embedder) -> dict:
    import ray

    from rdistill.ray.pools import actor_pool_args, drain, reader_task_args, start_pool

    shards = resolve_shards(input_spec)
    spec = resolve_clip(cfg.embed.model, cfg.embed.pretrained)
    record = _run_record(input_spec, shards, spec, cfg)
    claim_output(out, RUN_FILE, record, ("input", "model", "config"), overwrite, _clear,
                 "embeddings of other shards, another model or config")  # fmt: skip
    markers = DoneMarkers(out, "part")
    done = markers.load(range(len(shards)), lambda i: part_paths(out, i).values())
    pending = [i for i in range(len(shards)) if i not in done]
    idle = {"samples": 0, "seconds": 0.0, "samples_per_s": None}
    if not pending and (finished := finished_summary(out, RUN_FILE, idle, parts_this_run=0)):
        return finished
    (out / SUCCESS).unlink(missing_ok=True)
    atomic_write_json(out / RUN_FILE, record)
    atomic_write_text(out / "config.yaml", dump_config(cfg, "embed"))
    log.info("embed: %d shards, %d done, %d to embed with %s/%s (dim %d)", len(shards), len(done), len(pending),
             spec.model, spec.pretrained or "random", spec.embed_dim)  # fmt: skip
    plan, new, failed, wall, steady, fetched = None, [], [], 0.0, None, 0
    if pending:
        plan = start_pool(cfg.ray, cfg.embed.pool, "embed")
        _clear_staging(out)
        staging = out / STAGING / uuid.uuid4().hex[:12]  # this run's: a killed run's late writes cannot mix in
        fmt = SampleFormat.from_config(cfg.embed)
        items = [{"part": i, "url": shards[i]} for i in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        reader = {"spec": spec, "fmt": fmt, "retries": cfg.embed.shard_retries, "block": cfg.embed.decode_batch}
        ds = ds.map_batches(reader_fn, batch_size=1, fn_kwargs=reader, **reader_task_args(cfg.embed.decode_cpus, plan))
        ds = ds.map_batches(
            PartStager,
            fn_constructor_kwargs={
                "staging": str(staging),
                "embedder": embedder,
                "spec": spec,
                "device": plan.device,
                "precision": plan.precision,
                "threads": plan.threads,
            },  # fmt: skip
            batch_size=cfg.embed.batch_size,
            **actor_pool_args(plan),
        )
        # no CPU reserved: the pool and its readers may hold every CPU, and a part's write must not wait for them
        writer = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(StagedPartWriter)
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        count = min(max(nodes, 2), MAX_PART_WRITERS)
        writers = [writer.options(scheduling_strategy="SPREAD").remote() for _ in range(count)]
        with progress(len(pending), "embed", cfg.progress, unit="shards") as bar:
            sink = _PartSink(out, shards, spec.embed_dim, staging, bar, writers)
            wall = drain(ds, sink.add, "embedding")
            t0 = time.perf_counter()
            sink.collect(0)  # the last parts' writes
            wall += time.perf_counter() - t0
        for w in writers:
            ray.kill(w)
        new, failed, steady, fetched = sink.done, sink.failed, sink.ledger.rate.steady(), sink.fetched_bytes
        if sink.ledger.open:
            raise RuntimeError(f"parts {sorted(sink.ledger.open)} never received all their rows and end row")
        shutil.rmtree(out / STAGING, ignore_errors=True)
    done.update({r["part"]: r for r in new})
    summary = _summary(input_spec, out, record, len(shards), done, new, failed, wall, plan)
    summary["this_run"]["steady_samples_per_s"] = steady
    summary["this_run"]["driver_fetched_bytes"] = fetched
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
