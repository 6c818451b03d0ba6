"""Benchmarks of the evaluation harness (docs/benchmarks.md, "Evaluation harness").

    python -m rdistill.eval.bench flickr-sized [--students nf_resnet50,vit_tiny_patch16_224] [--epochs 10]
                                               [--threads 2] [--scratch DIR]
    python -m rdistill.eval.bench ray-parallel [--student vit_tiny_patch16_224] [--epochs 2] [--eval-size 1000]
                                               [--scratch DIR]

``flickr-sized``: one evaluation of the size of a Flickr30K table cell, on toy images written at 224 px: 100
distilled pairs (with text vectors), 1k val and 1k test images with 5 captions each, the real student
architectures with random weights, trainable backbone, ``--epochs`` passes (+1, as the reference counts), evaluated
every 10. The run itself encodes text with the tiny CLIP; the cost of ViT-L/14's text tower (random weights, same
compute) is measured on ``--text-sample`` captions and extrapolated to the 10k val + test captions.

``ray-parallel``: the same kind of cell for one student (``--eval-size`` val and test images), two runs (seeds)
through Ray Train on a local 2-CPU instance, 1 CPU per worker: both trainers submitted at once, then one after the
other; prints both wall times and their ratio.

``coreset-pool``: the coresets' candidate pool (:class:`rdistill.baselines.select.BottomK`) of ``--pool`` rows of
``--dim`` float32 fed ``--blocks`` blocks of ``--block-rows`` rows, the payload built for the entering rows only as
the coreset pass does; then herding and k-center picking ``--m`` on it. Prints wall and CPU seconds, the peak RSS
above the input block and the memory herding and k-center allocate (tracemalloc).

    python -m rdistill.eval.bench coreset-pool [--pool 100000] [--dim 1536] [--block-rows 65536] [--blocks 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _data(scratch: Path, pairs: int, n_val: int, n_test: int, size: int = 224):
    from rdistill.eval.toy import real_pair_samples, write_toy_karpathy
    from rdistill.io.distilled import write_distilled_set

    kj = scratch / "karpathy" / "dataset_toy.json"
    if not kj.exists():
        write_toy_karpathy(kj.parent, {"train": pairs, "val": n_val, "test": n_test}, seed=11, size=size)
    subset = scratch / "set"
    if not (subset / "distilled.json").exists():
        samples = real_pair_samples(kj, pairs)
        write_distilled_set(subset, samples, method="bench", text_space="clip:rdistill-tiny", text_vectors=True)
    return kj, subset


def _overrides(students: str, epochs: int, threads: int, executor: str) -> list[str]:
    return [
        f"evaluate.students={students}",
        "evaluate.image_weights=random",
        "evaluate.text_encoder=clip:rdistill-tiny",
        f"evaluate.epochs={epochs}",
        "evaluate.eval_every=10",
        "evaluate.runs=1",
        "evaluate.random_subset=false",
        f"evaluate.executor={executor}",
        f"evaluate.cpus_per_worker={threads}",
        "progress=false",
    ]


def flickr_sized(args) -> dict:
    import torch

    from rdistill.config import load_config
    from rdistill.eval.driver import run_evaluate
    from rdistill.models.students import TextEncoder, parse_text_encoder

    scratch = Path(args.scratch)
    kj, subset = _data(scratch, 100, 1000, 1000)
    cfg = load_config(None, _overrides(args.students, args.epochs, args.threads, "local"))
    out = scratch / f"eval-{args.epochs}"
    t0 = time.perf_counter()
    summary = run_evaluate([str(subset)], str(kj), out, cfg, overwrite=True)
    wall = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    enc = TextEncoder(parse_text_encoder("clip:ViT-L-14"))  # random weights: the compute of the real tower
    caps = [f"a photo of a red circle number {i} on a blue background" for i in range(args.text_sample)]
    enc.encode(caps[:8])
    t1 = time.perf_counter()
    enc.encode(caps, batch_size=64)
    per_caption = (time.perf_counter() - t1) / len(caps)
    cells = {r["student"]: {"wall": r["seconds"], "cpu": r["cpu_seconds"]} for r in summary["results"]}
    return {
        "bench": "flickr-sized",
        "epochs": args.epochs,
        "passes": args.epochs + 1,
        "evaluations": len(summary["results"][0]["curve"]),
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "wall_s": round(wall, 1),
        "per_student_s": cells,
        "eval_images_decode_s": summary["seconds"]["eval_images"],
        "tiny_text_features_s": summary["seconds"]["text_features"],
        "vit_l14_text_s_per_caption": round(per_caption, 4),
        "vit_l14_text_10k_captions_s": round(per_caption * 10_000, 1),
    }


def ray_parallel(args) -> dict:
    import dataclasses

    from rdistill.config import load_config
    from rdistill.eval.driver import FeatureCache, _text_side, resolve_protocol, run_seed
    from rdistill.eval.runner import run_ray
    from rdistill.eval.sets import read_distilled_set
    from rdistill.eval.train import RunJob, TrainSettings
    from rdistill.io.karpathy import load_eval_data
    from rdistill.models.students import StudentSpec
    from rdistill.ray.pools import init_ray

    scratch = Path(args.scratch) / f"ray-{args.eval_size}"
    kj, subset = _data(scratch, 100, args.eval_size, args.eval_size)
    cfg = load_config(None, _overrides(args.student, args.epochs, 1, "ray") + ["ray.num_cpus=2"])
    protocol = resolve_protocol(cfg)
    cache = FeatureCache(scratch / "cache", cfg, protocol)
    data = load_eval_data(str(kj))
    ts = read_distilled_set(subset, 224, "set")
    feats, unit, _ = _text_side(ts, cache, cfg, protocol)
    evals = {
        "unit": {
            k: {
                "images": cache.images(data.splits[k]),
                "text": cache.text(data.splits[k].captions),
                "txt2img": data.splits[k].txt2img,
            }
            for k in ("val", "test")
        }
    }
    for v in evals["unit"].values():
        v["text"] = (v["text"] / np.linalg.norm(v["text"], axis=1, keepdims=True)).astype(np.float32)
    sets = {"set": {"train_images": ts.images, "pair_image": ts.pair_image, "train_text": feats}}
    settings = TrainSettings(epochs=args.epochs, eval_every=10, decay_epoch=args.epochs // 2 + 1)
    spec = StudentSpec(args.student, "random", "logits", 224)
    jobs = [RunJob(f"r{r}", "set", spec, settings, run_seed(0, args.student, r), r, 1, "cpu", 1) for r in range(2)]
    init_ray(cfg.ray)
    runs = scratch / "ray-runs"
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_ray(jobs, sets, evals, {"set": "unit"}, runs, scratch / "ray-train", 1.0, 0.0)
    together = time.perf_counter() - t0
    t0 = time.perf_counter()
    for job in jobs:
        run_ray(
            [dataclasses.replace(job, run_id=job.run_id + "s")],
            sets,
            evals,
            {"set": "unit"},
            runs,
            scratch / "ray-train",
            1.0,
            0.0,
        )
    apart = time.perf_counter() - t0
    return {
        "bench": "ray-parallel",
        "student": args.student,
        "epochs": args.epochs,
        "load_average": os.getloadavg(),
        "two_runs_together_s": round(together, 1),
        "two_runs_one_after_the_other_s": round(apart, 1),
        "ratio": round(apart / together, 2),
    }


def coreset_pool(args) -> dict:
    import resource
    import tracemalloc

    from rdistill.baselines.select import BottomK, herding, kcenter, row_priority

    block = np.ones((args.block_rows, args.dim), np.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pool = BottomK(args.pool)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in range(args.blocks):
        rows = np.arange(b * args.block_rows, (b + 1) * args.block_rows)
        pool.add(row_priority(rows, 0), rows, lambda idx: block[idx])
    _, _, feats = pool.result()
    out = {
        "stream_wall_s": round(time.perf_counter() - t0, 2),
        "stream_cpu_s": round(time.process_time() - c0, 2),
        "pool_mb": round(feats.nbytes / 2**20),
        "peak_rss_above_block_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024),
    }
    for name, fn in (("herding", lambda: herding(feats, args.m)), ("kcenter", lambda: kcenter(feats, args.m))):
        tracemalloc.start()
        t0 = time.perf_counter()
        fn()
        out[f"{name}_wall_s"] = round(time.perf_counter() - t0, 2)
        out[f"{name}_alloc_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.eval.bench")
    sub = p.add_subparsers(dest="bench", required=True)
    a = sub.add_parser("flickr-sized")
    a.add_argument("--students", default="nf_resnet50,vit_tiny_patch16_224")
    a.add_argument("--epochs", type=int, default=10)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--text-sample", type=int, default=256)
    a.add_argument("--scratch", default="/tmp/rdistill-eval-bench")
    b = sub.add_parser("ray-parallel")
    b.add_argument("--student", default="vit_tiny_patch16_224")
    b.add_argument("--epochs", type=int, default=2)
    b.add_argument("--eval-size", type=int, default=1000, help="images in each of the val and test splits")
    b.add_argument("--scratch", default="/tmp/rdistill-eval-bench")
    c = sub.add_parser("coreset-pool")
    c.add_argument("--pool", type=int, default=100_000)
    c.add_argument("--dim", type=int, default=1536, help="pair-feature width, 2d (1536 for ViT-L/14)")
    c.add_argument("--block-rows", type=int, default=65536)
    c.add_argument("--blocks", type=int, default=30)
    c.add_argument("--m", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    benches = {"flickr-sized": flickr_sized, "ray-parallel": ray_parallel, "coreset-pool": coreset_pool}
    result = benches[args.bench](args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
