"""Benchmarks of the model stages against a plain single-process loop measured in the same run.

    python -m rdistill.dev.bench embed [--shards 8] [--per-shard 256] [--model ViT-B-32] [--actors 1,2]
    python -m rdistill.dev.bench synthesize [--prototypes 48] [--steps 10] [--batch-size 16] [--actors 1]

``embed``: toy WebDataset shards (:mod:`rdistill.dev.toydata`) embedded by (a) a plain loop in this process:
read, decode, crop, embed in batches, one shard after another, with the same code and model; (b) the stage,
:func:`rdistill.stages.embed.driver.run_embed`, on a fresh local Ray instance, for each pool size in
``--actors``. Model weights are random (seeded): the work is the same as with trained ones.

``synthesize``: prototypes from a planted store painted by (a) the authors' loop: one
``StableUnCLIPImg2ImgPipeline`` call per prototype, then the LANCZOS resize; (b) the same batched in this process
(:class:`rdistill.stages.synthesize.worker.Painter`, no Ray); (c) the stage,
:func:`rdistill.stages.synthesize.driver.run_synthesize`.

Each prints seconds, throughput and the ratio to the loop. Stage times include starting Ray's workers and loading
the model in each actor (seconds, paid once per run); ``steady`` counts from the first batch's arrival at the
driver on, so it excludes that start-up.
"""

from __future__ import annotations

import shutil
import tempfile
import time
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
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")


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


def add_parsers(sub) -> None:
    import os

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
