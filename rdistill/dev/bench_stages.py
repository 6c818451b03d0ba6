"""Benchmarks of the model stages against a plain single-process loop measured in the same run.

    python -m rdistill.dev.bench embed [--shards 8] [--per-shard 256] [--model ViT-B-32] [--actors 1,2]
    python -m rdistill.dev.bench synthesize [--prototypes 48] [--steps 10] [--batch-size 16] [--actors 1]
    python -m rdistill.dev.bench embed-funnel [--shards 100] [--per-shard 2000] [--actors 2,4] [--decode]
    python -m rdistill.dev.bench synthesize-funnel [--prototypes 20000] [--shard-size 1000] [--actors 2,4]

``embed``: toy WebDataset shards (:mod:`rdistill.dev.toydata`) embedded by (a) a plain loop in this process:
read, decode, crop, embed in batches, one shard after another, with the same code and model; (b) the stage,
:func:`rdistill.stages.embed.driver.run_embed`, on a fresh local Ray instance, for each pool size in
``--actors``. Model weights are random (seeded): the work is the same as with trained ones.

``synthesize``: prototypes from a planted store painted by (a) the authors' loop: one
``StableUnCLIPImg2ImgPipeline`` call per prototype, then the LANCZOS resize; (b) the same batched in this process
(:class:`rdistill.stages.synthesize.worker.Painter`, no Ray); (c) the stage,
:func:`rdistill.stages.synthesize.driver.run_synthesize`.

``embed-funnel`` / ``synthesize-funnel``: the driver's ceiling. The stage drivers as they run, with a do-nothing
model (:class:`NullEmbedder`, :class:`NullPainter`) and several actors, on many synthetic inputs read without
decoding (:func:`synthetic_shards`; ``--decode`` adds a run of the real reader on toy shards), against the part
(shard) writer alone and, for embed, Ray Data's bare delivery of the vectors to the driver ("fetch only"). Printed:
the driver's CPU seconds, its time in its own handling of the batches (:func:`_sink_clock`), the bytes it
received and its peak RSS.

Each prints seconds, throughput and the ratio to the loop (the funnels: to the writer alone). Stage times include
starting Ray's workers and loading the model in each actor (seconds, paid once per run); ``steady`` counts from the
first batch's arrival at the driver on, so it excludes that start-up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _print_table(results: dict, unit: str) -> None:
    base = results["loop"][f"{unit}_per_s"]
    print(f"{'run':10} {unit:>8} {'seconds':>8} {unit + '/s':>10} {'vs loop':>8} {'steady/s':>9} {'vs loop':>8}")
    for name, r in results.items():
        rate, steady = r[f"{unit}_per_s"], r.get("steady_per_s")
        print(f"{name:10} {r[unit]:8d} {r['seconds']:8.2f} {rate:10.2f} {rate / base:7.2f}x "
              + (f"{steady:9.2f} {steady / base:7.2f}x" if steady else f"{'':>9} {'':>8}"))  # fmt: skip


def _ray_fresh(num_cpus: int | None):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # "local": a new instance of our own, even when another (a `ray start` head) runs on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")


def bench_embed(args) -> dict:
    import torch

    from rdistill.config import load_config
    from rdistill.dev.toydata import write_toy_shards
    from rdistill.io.shards import SampleFormat, resolve_shards
    from rdistill.models.clip import resolve_clip
    from rdistill.stages.embed.driver import run_embed
    from rdistill.stages.embed.worker import ClipEmbedder, read_shards

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="rdistill-bench-embed-"))
    write_toy_shards(scratch / "shards", args.shards, args.per_shard, size=args.image_size)
    urls = resolve_shards(str(scratch / "shards"))
    spec = resolve_clip(args.model, args.pretrained)
    total = args.shards * args.per_shard
    print(f"embed benchmark: {args.shards} shards x {args.per_shard} samples ({args.image_size} px), model "
          f"{args.model}/{args.pretrained or 'random'}, batch {args.batch_size}")  # fmt: skip
    results = {}

    torch.set_num_threads(args.cpus)
    model = ClipEmbedder(spec, "cpu", "fp32", threads=args.cpus)
    t0 = time.perf_counter()
    n = 0
    for i, url in enumerate(urls):
        batch = {"part": np.array([i]), "url": np.array([url], dtype=object)}
        for block in read_shards(batch, spec, SampleFormat(), block=args.batch_size):
            n += int((~block["end"]).sum())
            model(block)
    seconds = time.perf_counter() - t0
    results["loop"] = {"samples": n, "seconds": seconds, "samples_per_s": n / seconds}
    del model

    for actors in args.actors:
        _ray_fresh(args.cpus)
        out = scratch / f"out-{actors}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(None, [f"embed.model={args.model}", f"embed.pretrained={args.pretrained}",
                                 f"embed.batch_size={args.batch_size}", f"embed.pool.actors={actors}",
                                 f"embed.pool.cpus_per_actor={args.cpus / actors / 2:g}",
                                 f"embed.decode_cpus={args.decode_cpus}", "progress=false"])  # fmt: skip
        s = run_embed(str(scratch / "shards"), out, cfg)
        r = s["this_run"]
        results[f"stage x{actors}"] = {"samples": r["samples"], "seconds": r["seconds"],
                                       "samples_per_s": r["samples_per_s"],
                                       "steady_per_s": r["steady_samples_per_s"]}  # fmt: skip
        assert r["samples"] == total
    import ray

    ray.shutdown()
    _print_table(results, "samples")
    return results


def bench_synthesize(args) -> dict:
    import torch
    from PIL import Image

    from rdistill.config import load_config
    from rdistill.dev.planted import make_concepts, write_store
    from rdistill.engine.driver import run_prototypes
    from rdistill.stages.synthesize.driver import read_prototypes, run_synthesize
    from rdistill.stages.synthesize.worker import Painter, PaintSettings, condition, fill_norms, image_seed

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="rdistill-bench-synth-"))
    store = scratch / "store"
    if not store.exists():
        write_store(store, make_concepts(args.prototypes, 64, seed=0), 50 * args.prototypes, seed=0)
    protos = scratch / "protos"
    cfg = load_config(None, [f"cluster.num_pairs={args.prototypes}", "progress=false",
                             "synthesize.model=rdistill-tiny",
                             f"synthesize.steps={args.steps}", f"synthesize.batch_size={args.batch_size}",
                             f"synthesize.shard_size={args.shard_size}", f"synthesize.pool.actors={args.actors}",
                             f"synthesize.pool.cpus_per_actor={(args.cpus - 0.5) / args.actors:g}"])  # fmt: skip
    run_prototypes(str(store), protos, cfg, overwrite=True)
    table = read_prototypes(protos, cfg).to_pydict()
    emb = np.asarray(table["image_embedding"], np.float32)
    norms, captions, ids = fill_norms(np.asarray(table["image_norm"]))[0], table["caption"], np.asarray(table["id"])
    m = len(ids)
    print(f"synthesize benchmark: {m} prototypes, tiny unCLIP pipeline, {args.steps} steps, "
          f"CFG {cfg.synthesize.guidance_scale}, batch {args.batch_size}, {args.cpus} CPU threads")  # fmt: skip
    torch.set_num_threads(args.cpus)
    settings = PaintSettings.from_config(cfg.synthesize)
    painter = Painter("rdistill-tiny", settings, cfg.seed, "cpu", "fp32", threads=args.cpus)
    pipe, results = painter.pipe, {}

    t0 = time.perf_counter()
    for i in range(m):  # the authors' loop: one prototype per call
        gen = torch.Generator().manual_seed(image_seed(cfg.seed, int(ids[i])))
        cond = torch.from_numpy(condition(emb[i : i + 1], norms[i : i + 1]))
        img = pipe(prompt=captions[i], negative_prompt=settings.negative_prompt, image_embeds=cond,
                   num_inference_steps=args.steps, guidance_scale=settings.guidance_scale,
                   noise_level=settings.noise_level, generator=gen).images[0]  # fmt: skip
        img.resize((settings.image_size, settings.image_size), Image.LANCZOS)
    seconds = time.perf_counter() - t0
    results["loop"] = {"images": m, "seconds": seconds, "images_per_s": m / seconds}

    t0 = time.perf_counter()
    for i in range(0, m, args.batch_size):
        painter.paint(ids[i : i + args.batch_size], emb[i : i + args.batch_size], norms[i : i + args.batch_size],
                      captions[i : i + args.batch_size])  # fmt: skip
    seconds = time.perf_counter() - t0
    results["batched"] = {"images": m, "seconds": seconds, "images_per_s": m / seconds}
    del painter, pipe

    _ray_fresh(args.cpus)
    shutil.rmtree(scratch / "out", ignore_errors=True)  # a finished output of the same input would be resumed
    s = run_synthesize(protos, scratch / "out", cfg)
    r = s["this_run"]
    results["stage"] = {"images": r["images"], "seconds": r["seconds"], "images_per_s": r["images_per_s"],
                        "steady_per_s": r["steady_images_per_s"]}  # fmt: skip
    import ray

    ray.shutdown()
    _print_table(results, "images")
    return results


def add_funnel_parsers(sub, cpus: int) -> None:
    actors = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    e = sub.add_parser("embed-funnel", help="the embedding driver's ceiling, with a do-nothing model")
    e.add_argument("--shards", type=int, default=100)
    e.add_argument("--per-shard", type=int, default=2000)
    e.add_argument("--model", default="ViT-L-14", help="open_clip name: only its dimension (and crop) is used")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--decode-batch", type=int, default=64)
    e.add_argument("--actors", type=actors, default=[2, 4])
    e.add_argument("--cpus-per-actor", type=float, default=0.25)
    e.add_argument("--decode-cpus", type=float, default=0.25)
    e.add_argument("--writer-parts", type=int, default=20, help="parts the writer-alone baseline writes")
    e.add_argument("--decode", action="store_true", help="also run on toy shards read and decoded by the real reader")
    e.add_argument("--decode-shards", type=int, default=8)
    e.add_argument("--decode-per-shard", type=int, default=128)
    e.add_argument("--image-size", type=int, default=256, help="side of the toy images (with --decode)")
    e.add_argument("--cpus", type=int, default=cpus)
    e.add_argument("--scratch")
    s = sub.add_parser("synthesize-funnel", help="the synthesis driver's ceiling, with a do-nothing decoder")
    s.add_argument("--prototypes", type=int, default=20000)
    s.add_argument("--dim", type=int, default=768)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--actors", type=actors, default=[2, 4])
    s.add_argument("--cpus-per-actor", type=float, default=0.25)
    s.add_argument("--writer-shards", type=int, default=4, help="shards the writer-alone baseline writes")
    s.add_argument("--cpus", type=int, default=cpus)
    s.add_argument("--scratch")


def add_parsers(sub) -> None:
    cpus = os.cpu_count() or 1
    e = sub.add_parser("embed", help="the embedding stage vs a single-process loop, by pool size")
    e.add_argument("--shards", type=int, default=8)
    e.add_argument("--per-shard", type=int, default=256)
    e.add_argument("--image-size", type=int, default=256, help="side of the toy images in the shards")
    e.add_argument("--model", default="ViT-B-32")
    e.add_argument("--pretrained", default="", help="pretrained tag; empty: seeded random weights (offline)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--actors", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    e.add_argument("--decode-cpus", type=float, default=0.5)
    e.add_argument("--cpus", type=int, default=cpus)
    e.add_argument("--scratch")
    s = sub.add_parser("synthesize", help="the synthesis stage vs the authors' one-at-a-time loop")
    s.add_argument("--prototypes", type=int, default=48)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--shard-size", type=int, default=16)
    s.add_argument("--actors", type=int, default=1)
    s.add_argument("--cpus", type=int, default=cpus)
    s.add_argument("--scratch")
    add_funnel_parsers(sub, cpus)


# --- the driver funnel: the stage drivers with do-nothing models -------------------------------------------------

_CAPTION = "a photo of sample {i} of shard {p}, with enough words around it to be as long as a typical web caption"


class NullEmbedder:
    """A do-nothing model actor for the funnel benchmark: the rows :class:`ClipEmbedder` returns, with fixed
    ``(n, spec.embed_dim)`` float16 vectors and no network run."""

    def __init__(self, spec, device: str = "cpu", precision: str = "auto", threads: int = 0):
        rng = np.random.default_rng(0)
        self.img = rng.standard_normal(spec.embed_dim).astype(np.float16)
        self.txt = rng.standard_normal(spec.embed_dim).astype(np.float16)

    def __call__(self, batch: dict) -> dict:
        from rdistill.stages.embed.worker import _PASS

        n = len(batch["end"])
        return {**{k: batch[k] for k in _PASS}, "img_emb": np.tile(self.img, (n, 1)),
                "txt_emb": np.tile(self.txt, (n, 1))}  # fmt: skip


def synthetic_shards(batch: dict, spec, fmt, retries: int = 3, block: int = 64):
    """The reader of the funnel benchmark, in :func:`read_shards`' row format with nothing decoded: a "shard" is a
    small JSON file ``{"rows": n}``; its ``n`` samples get keys and captions of typical length and a 1 x 1
    placeholder image (the do-nothing model ignores images), then its end row."""
    import json

    from rdistill.io.shards import ShardStats
    from rdistill.stages.embed.worker import _rows

    for part, url in zip(batch["part"].tolist(), batch["url"].tolist()):
        t0 = time.time()
        with open(url) as f:
            n = json.load(f)["rows"]
        px = np.zeros((1, 1, 3), np.uint8)
        for first in range(0, n, block):
            idx = range(first, min(first + block, n))
            yield _rows(part, first, [f"{part:05d}{i:04d}" for i in idx], [_CAPTION.format(i=i, p=part) for i in idx],
                        [px] * len(idx))  # fmt: skip
        stats = ShardStats()
        stats.samples = n
        info = json.dumps({**stats.to_dict(), "url": url, "started": t0, "read_seconds": time.time() - t0})
        yield _rows(part, n, [""], [""], [px], end=True, info=info)


def _write_synthetic_shards(folder: Path, shards: int, rows: int) -> None:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        (folder / f"syn-{k:05d}.tar").write_text(json.dumps({"rows": rows}))


def _timed(fn, *args, **kwargs) -> dict:
    """Run ``fn(*args, **kwargs)``: its wall seconds, this process's CPU seconds (all threads) and peak RSS over the
    call."""
    from rdistill.metrics import StepRecorder

    rec = StepRecorder()
    c0, t0 = time.process_time(), time.perf_counter()
    with rec.step("run"):
        value = fn(*args, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"value": value, "wall": wall, "cpu": cpu, "peak_rss_mb": rec.steps["run"]["peak_rss_mb"]}


@contextmanager
def _sink_clock():
    """While active, the stage drivers' :func:`rdistill.ray.pools.drain` measures the driver's own handling of each
    output batch (assembling, writing, marking: the sink): wall and thread CPU seconds, and the bytes of the batches
    it is handed (what reached the driver), into the yielded dict. Only a stopwatch around the call: the sink itself
    runs unchanged."""
    import rdistill.ray.pools as pools

    clock, drain = {"sink_s": 0.0, "sink_cpu_s": 0.0, "fetched_mb": 0.0}, pools.drain

    def nbytes(v) -> int:
        a = np.asarray(v)
        return a.nbytes + (sum(len(x) for x in a.ravel() if isinstance(x, (str, bytes))) if a.dtype == object else 0)

    def timed_drain(ds, sink, stage):
        def timed(batch):
            clock["fetched_mb"] += sum(nbytes(v) for v in batch.values()) / 2**20
            t0, c0 = time.perf_counter(), time.thread_time()  # this thread's CPU: not Ray's threads meanwhile
            sink(batch)
            clock["sink_s"] += time.perf_counter() - t0
            clock["sink_cpu_s"] += time.thread_time() - c0

        return drain(ds, timed, stage)

    pools.drain = timed_drain
    try:
        yield clock
    finally:
        pools.drain = drain


def _print_funnel(results: dict, unit: str, base: str) -> None:
    """One row per run. ``CPU s``: the driver process's CPU seconds (all threads) over the run, ``/CPU-s``: units per
    second of them, the rate one driver could take with a core to itself; ``sink``: the driver's own handling of the
    batches (CPU, then wall seconds, which include waiting for part writes in flight); ``MB in``: the bytes of the
    batches the driver received."""
    ref = results[base][f"{unit}_per_s"]
    print(f"{'run':26} {unit:>7} {'seconds':>7} {unit + '/s':>9} {'vs base':>8} {'CPU s':>6} {unit + '/CPU-s':>13} "
          f"{'sink CPU s':>10} {unit + '/sink-CPU-s':>19} {'sink s':>6} {'MB in':>7} {'peak MB':>7}")  # fmt: skip

    def num(v, width, fmt):
        return f"{v:{width}{fmt}}" if v else " " * width

    for name, r in results.items():
        rate, cpu, n, wall = r[f"{unit}_per_s"], r.get("driver_cpu_s"), r[unit], r["seconds"]
        sc, mb = r.get("sink_cpu_s"), r.get("fetched_mb")
        print(f"{name:26} {n:7d} {wall:7.2f} {rate:9.0f} {rate / ref:7.2f}x {num(cpu, 6, '.2f')} "
              f"{num(cpu and n / cpu, 13, '.0f')} {num(sc, 10, '.2f')} {num(sc and n / sc, 19, '.0f')} "
              f"{num(r.get('sink_s'), 6, '.1f')} {num(mb, 7, '.1f')} {r.get('peak_rss_mb', 0):7.0f}")  # fmt: skip
    print(f"(base: {base}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")


def bench_embed_funnel(args) -> dict:
    """The embedding driver's ceiling: :func:`run_embed` with :class:`NullEmbedder` actors on synthetic shards
    (:func:`synthetic_shards`, nothing decoded) or, with ``--decode``, on toy WebDataset shards read and decoded by
    the real reader; against the part writer alone and Ray Data's bare delivery of the vectors to the driver."""
    import ray

    from rdistill.config import load_config
    from rdistill.io.outputs import DoneMarkers
    from rdistill.models.clip import resolve_clip
    from rdistill.ray.pools import PoolPlan, actor_pool_args, reader_task_args
    from rdistill.stages.embed.driver import run_embed
    from rdistill.stages.embed.worker import write_part

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="rdistill-bench-funnel-"))
    scratch.mkdir(parents=True, exist_ok=True)
    spec = resolve_clip(args.model, "")  # only its dimension and crop size: no weights are loaded anywhere
    src = scratch / "synthetic"
    shutil.rmtree(src, ignore_errors=True)
    _write_synthetic_shards(src, args.shards, args.per_shard)
    total = args.shards * args.per_shard
    print(f"embed funnel: {args.shards} synthetic shards x {args.per_shard} samples, {spec.embed_dim}-d float16, "
          f"batch {args.batch_size}, reader blocks {args.decode_batch}, {args.cpus} CPUs")  # fmt: skip
    results = {}

    # (a) the part writer alone, in this process: the three files of each part and its done-marker
    out = scratch / "writer"
    shutil.rmtree(out, ignore_errors=True)
    markers, vec = DoneMarkers(out, "part"), np.ones((args.per_shard, spec.embed_dim), np.float16)
    parts = min(args.shards, args.writer_parts)
    info = {"skipped": {}, "retries": 0, "read_seconds": 0.0, "started": time.time()}
    cols = {"pos": np.arange(args.per_shard), "key": np.array([f"{i:09d}" for i in range(args.per_shard)], object),
            "caption": np.array([_CAPTION.format(i=i, p=0) for i in range(args.per_shard)], object),
            "img_emb": vec, "txt_emb": vec}  # fmt: skip

    def write_all():
        for p in range(parts):
            markers.mark(p, write_part(out, p, f"syn-{p:05d}.tar", spec.embed_dim, cols, info))

    r = _timed(write_all)
    n = parts * args.per_shard
    results["part writer alone"] = {"samples": n, "seconds": r["wall"], "samples_per_s": n / r["wall"],
                                    "driver_cpu_s": r["cpu"], "peak_rss_mb": r["peak_rss_mb"]}  # fmt: skip

    def cfg_for(actors):
        return load_config(None, [f"embed.model={args.model}", "embed.pretrained=",
                                  f"embed.batch_size={args.batch_size}", f"embed.decode_batch={args.decode_batch}",
                                  f"embed.pool.actors={actors}",
                                  f"embed.pool.cpus_per_actor={args.cpus_per_actor:g}",
                                  f"embed.decode_cpus={args.decode_cpus}", "progress=false"])  # fmt: skip

    # (b) Ray Data delivering the do-nothing model's vectors to this process, which drops them: the transport part
    # of a driver that writes (the same pipeline as the stage's, built here)
    for actors in args.actors[:1]:
        _ray_fresh(args.cpus)
        plan = PoolPlan(actors, "cpu", 0.0, args.cpus_per_actor, "fp32", 1)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        urls = sorted(str(p) for p in src.iterdir())
        ds = ray.data.from_items([{"part": i, "url": u} for i, u in enumerate(urls)], override_num_blocks=len(urls))
        ds = ds.map_batches(synthetic_shards, batch_size=1, fn_kwargs={"spec": spec, "fmt": None,
                            "block": args.decode_batch}, **reader_task_args(args.decode_cpus, plan))  # fmt: skip
        ds = ds.map_batches(NullEmbedder, fn_constructor_kwargs={"spec": spec}, batch_size=args.batch_size,
                            **actor_pool_args(plan))  # fmt: skip

        def fetch(ds):
            rows, mb = 0, 0.0
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows += int((~batch["end"]).sum())
                mb += sum(np.asarray(v).nbytes for v in batch.values()) / 2**20
            return rows, mb

        r = _timed(fetch, ds)
        assert r["value"][0] == total, r["value"]
        results[f"fetch only x{actors}"] = {"samples": total, "seconds": r["wall"], "samples_per_s": total / r["wall"],
                                            "driver_cpu_s": r["cpu"], "peak_rss_mb": r["peak_rss_mb"],
                                            "fetched_mb": r["value"][1]}  # fmt: skip

    # (c) the stage's driver, as it runs, with the do-nothing model
    runs = [("synthetic", actors, str(src)) for actors in args.actors]
    if args.decode:
        from rdistill.dev.toydata import write_toy_shards

        toy = scratch / "toy"
        if not toy.exists():
            write_toy_shards(toy, args.decode_shards, args.decode_per_shard, size=args.image_size)
        runs.append(("decoded", args.actors[0], str(toy)))
    for kind, actors, inputs in runs:
        _ray_fresh(args.cpus)
        out = scratch / f"out-{kind}-{actors}"
        shutil.rmtree(out, ignore_errors=True)
        kwargs = {"embedder": NullEmbedder} | ({"reader": synthetic_shards} if kind == "synthetic" else {})
        with _sink_clock() as clock:
            r = _timed(run_embed, inputs, out, cfg_for(actors), **kwargs)
        s = r["value"]["this_run"]
        results[f"stage x{actors} ({kind})"] = {**clock, "samples": s["samples"], "seconds": r["wall"],
                                                "samples_per_s": s["samples"] / r["wall"],
                                                "steady_per_s": s["steady_samples_per_s"],
                                                "driver_cpu_s": r["cpu"], "peak_rss_mb": r["peak_rss_mb"]}  # fmt: skip
    ray.shutdown()
    _print_funnel(results, "samples", "part writer alone")
    return results


class NullPainter:
    """A do-nothing decoder actor for the funnel benchmark: the rows :class:`Painter` returns, each image the same
    PNG (or JPEG) of ``settings.image_size`` pixels of seeded noise, encoded once (noise does not compress: about
    as large as such an image gets), and no pipeline run."""

    def __init__(self, model: str, settings, seed: int, device: str = "cpu", precision: str = "auto",
                 threads: int = 0, expect_dim: int | None = None):  # fmt: skip
        from PIL import Image

        from rdistill.stages.synthesize.worker import encode_image

        px = np.random.default_rng(seed).integers(0, 256, (settings.image_size, settings.image_size, 3), np.uint8)
        self.image = encode_image(Image.fromarray(px), settings.image_format, settings.jpeg_quality)
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        from rdistill.stages.synthesize.worker import image_seed

        meta = {k: v for k, v in batch.items() if k != "image_embedding"}
        seeds = np.array([image_seed(self.seed, int(i)) for i in batch["id"]], dtype=np.int64)
        return {**meta, "image": np.array([self.image] * len(seeds), dtype=object), "seed": seeds}


def _synthetic_prototypes(path: Path, m: int, dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    emb = lambda: pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(m * dim, np.float32)), dim)  # noqa: E731
    ids = np.arange(m)
    pq.write_table(pa.table({
        "id": ids, "image_embedding": emb(), "text_embedding": emb(),
        "caption": [_CAPTION.format(i=i, p=0) for i in ids], "caption_key": [f"{i:09d}" for i in ids],
        "image_cluster": ids, "text_cluster": ids, "shared_pairs": np.full(m, 50), "alignment": np.full(m, 0.3),
        "pairless": np.zeros(m, bool), "refilled": np.zeros(m, bool), "image_norm": np.full(m, 20.0, np.float32),
    }), path)  # fmt: skip


def bench_synthesize_funnel(args) -> dict:
    """The synthesis driver's ceiling: :func:`run_synthesize` with :class:`NullPainter` actors on synthetic
    prototypes, against the shard writer alone; the decoder is a directory holding only the configs the driver
    reads (its embedding dimension)."""
    import json

    import pyarrow.parquet as pq

    from rdistill.config import load_config
    from rdistill.io.outputs import DoneMarkers
    from rdistill.stages.synthesize.driver import _ShardWriter, read_prototypes, run_synthesize
    from rdistill.stages.synthesize.worker import PaintSettings

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="rdistill-bench-synth-funnel-"))
    scratch.mkdir(parents=True, exist_ok=True)
    protos = scratch / "prototypes.parquet"
    _synthetic_prototypes(protos, args.prototypes, args.dim)
    decoder = scratch / "null-decoder"
    (decoder / "image_normalizer").mkdir(parents=True, exist_ok=True)
    (decoder / "model_index.json").write_text("{}")
    (decoder / "image_normalizer" / "config.json").write_text(json.dumps({"embedding_dim": args.dim}))

    def cfg_for(actors):
        return load_config(None, [f"synthesize.model={decoder}", f"synthesize.batch_size={args.batch_size}",
                                  f"synthesize.shard_size={args.shard_size}",
                                  f"synthesize.image_size={args.image_size}", f"synthesize.pool.actors={actors}",
                                  f"synthesize.pool.cpus_per_actor={args.cpus_per_actor:g}",
                                  "progress=false"])  # fmt: skip

    cfg = cfg_for(args.actors[0])
    null = NullPainter(str(decoder), PaintSettings.from_config(cfg.synthesize), cfg.seed)
    print(f"synthesize funnel: {args.prototypes} synthetic prototypes, {args.dim}-d, images of "
          f"{len(null.image) / 1024:.0f} KiB ({args.image_size} px noise, {cfg.synthesize.image_format}), "
          f"shards of {args.shard_size}, batch {args.batch_size}, {args.cpus} CPUs")  # fmt: skip
    results = {}

    # (a) the shard writer alone, in this process: tars of pre-made rows and their done-markers
    table = read_prototypes(protos, cfg)
    k_max = min(args.writer_shards, -(-args.prototypes // args.shard_size))
    out = scratch / "writer"
    shutil.rmtree(out, ignore_errors=True)
    writer = _ShardWriter(out, args.shard_size, args.prototypes, str(decoder), cfg.synthesize.image_format, None)
    markers = DoneMarkers(out, "shard")
    shards = []
    for k in range(k_max):
        batch = table.slice(k * args.shard_size, args.shard_size).to_pydict()
        painted = null({c: np.array(v, dtype=object) if c in ("image_embedding", "text_embedding", "caption",
                        "caption_key") else np.asarray(v) for c, v in batch.items()})  # fmt: skip
        painted["text_embedding"] = np.array([np.asarray(v, np.float32) for v in batch["text_embedding"]], object)
        shards.append({"pos": np.arange(len(painted["id"])), **painted})

    def write_all(shards):
        for k, cols in enumerate(shards):
            markers.mark(k, writer.write(k, cols))

    r = _timed(write_all, shards)
    n = sum(len(c["pos"]) for c in shards)
    results["shard writer alone"] = {"images": n, "seconds": r["wall"], "images_per_s": n / r["wall"],
                                     "driver_cpu_s": r["cpu"], "peak_rss_mb": r["peak_rss_mb"]}  # fmt: skip
    del shards

    for actors in args.actors:
        _ray_fresh(args.cpus)
        out = scratch / f"out-{actors}"
        shutil.rmtree(out, ignore_errors=True)
        with _sink_clock() as clock:
            r = _timed(run_synthesize, protos, out, cfg_for(actors), painter=NullPainter)
        s = r["value"]["this_run"]
        assert pq.read_metadata(out / "manifest.parquet").num_rows == args.prototypes
        results[f"stage x{actors}"] = {**clock, "images": s["images"], "seconds": r["wall"],
                                       "images_per_s": s["images"] / r["wall"],
                                       "steady_per_s": s["steady_images_per_s"],
                                       "driver_cpu_s": r["cpu"], "peak_rss_mb": r["peak_rss_mb"]}  # fmt: skip
    import ray

    ray.shutdown()
    _print_funnel(results, "images", "shard writer alone")
    return results
