"""``python -m rdistill.distill``: the optimisation-based distillation methods on one set of real pairs.

    python -m rdistill.distill --method mtt-vl|tesla-vl|lors|covmatch|mdm --input SHARDS_OR_KARPATHY
                               [--images DIR] --num-pairs M --output DIR [--config FILE] [--set k=v ...]

``--input`` is a Karpathy-style ``.json`` (its train split, one pair per caption as the authors train; images
under ``--images``, default the file's folder) or WebDataset shards (directory, glob, brace pattern; one pair per
sample, members as ``embed.image_keys`` / ``embed.caption_key`` say), or ``toy`` (a toy Karpathy set written into
the output, the offline demo's: the world ``rdistill.evaluate --eval-data toy`` evaluates on). The real images are
decoded once, resized to ``distill.image_size`` and CLIP-normalised; the captions (cleaned as the authors'
``pre_caption``) are encoded once by the frozen ``distill.text_encoder``. The initial set is ``M`` real pairs
drawn with the seed. Expert trajectories, for the methods that use them, come from ``distill.experts_dir``
(trained there on first use: :mod:`rdistill.methods.experts`). The method runs
(:data:`rdistill.methods.common.METHODS`) and the result is written in rdistill's distilled format:

    DIR/shards/distilled-*.tar   KEY.f32.npy (the optimised image, (3, S, S) float32, normalised pixel space),
                                 KEY.png (its preview: de-normalised, clipped to [0, 1], 8 bits), KEY.npy (the text
                                 vector in distill.text_encoder's space, raw), KEY.txt (the caption of the real
                                 pair it started from), KEY.json (source index, start caption, nearest caption)
    DIR/manifest.parquet         one row per pair
    DIR/soft_labels.npy          LoRS: the learned (M, M) similarity matrix
    DIR/distilled.json           image.tensor "f32.npy", text.space, students.lr_image / lr_text (learned lrs),
                                 students.soft_labels, source (method, settings, loss history, experts)
    DIR/distill.json             the run record (input fingerprint, claimed config); DIR/summary.json; _SUCCESS
    DIR/init/                    with distill.write_init: the initial set (the real pairs drawn), same format
    DIR/_work/checkpoint.pt      the last checkpoint while running (RNG states included); removed at the end

A rerun of the same input and settings resumes from the checkpoint (a killed run ends as an unkilled one would);
other input or settings are refused unless ``--overwrite``; a finished output is reported, not recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from rdistill.cli import add_common_args, run_cli
from rdistill.config import Config, _result_fields
from rdistill.errors import RunError
from rdistill.io.outputs import (
    SUCCESS,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    claim_output,
    clear_output,
    finished_summary,
    lock_output,
)
from rdistill.methods.common import (
    METHODS,
    TRAJECTORY_METHODS,
    MethodContext,
    RealData,
    Synthetic,
    config_section,
    load_method,
)

log = logging.getLogger(__name__)

RUN_FILE = "distill.json"
SOFT_LABELS = "soft_labels.npy"
# methods that ask for experts only when a setting says so
EXPERTS_WHEN = {"mdm": lambda cfg: cfg.distill.mdm.merge_alpha > 0}


@dataclasses.dataclass
class RealPairs:
    """The real pairs before normalisation: ``images (n_img, S, S, 3) uint8``, ``pair_image (n,)``, captions."""

    source: str
    images: np.ndarray
    pair_image: np.ndarray
    captions: list[str]
    skipped: dict


def _shard_split(spec: str, cfg: Config):
    """WebDataset shards -> an :class:`rdistill.io.karpathy.EvalSplit` of one pair per sample (bytes in memory), and
    the samples the shards' reader skipped, by reason (``no_caption``, ``empty_shard``, ...)."""
    from collections import Counter

    from rdistill.io.karpathy import EvalSplit
    from rdistill.io.shards import SampleFormat, ShardStats, iter_samples, resolve_shards

    urls = resolve_shards(spec)
    fmt = SampleFormat.from_config(cfg.embed)
    names, captions, data = [], [], []
    skipped: Counter = Counter()
    for url in urls:
        stats = ShardStats()
        for s in iter_samples(url, fmt, stats, retries=cfg.embed.shard_retries):
            names.append(f"{Path(url).name}/{s.key}")
            captions.append(s.caption)
            data.append(s.image)
        if stats.skipped:
            log.info("%s: skipped %s", url, dict(stats.skipped))
            skipped.update(stats.skipped)
    if not names:
        raise RunError(f"{spec}: no samples with an image and a caption in {len(urls)} shards")
    return EvalSplit("train", spec, names, captions, np.arange(len(names), dtype=np.int64), data=data), dict(skipped)


def load_real_pairs(spec: str, images_dir: str | None, cfg: Config) -> RealPairs:
    """The real training pairs of ``--input`` (see the module docstring), at most ``distill.max_real_pairs``."""
    from rdistill.eval.sets import pairs_from_split
    from rdistill.io.karpathy import read_karpathy

    d = cfg.distill
    read_skipped: dict = {}
    if spec.endswith(".json"):
        data = read_karpathy(spec, images_dir)
        split = data.require("train", "the distillation trains on it")
    else:
        split, read_skipped = _shard_split(spec, cfg)
    cap = d.max_real_pairs if 0 < d.max_real_pairs < len(split.captions) else None
    ts = pairs_from_split(split, d.image_size, "real", "real", pairs=cap, seed=cfg.seed)
    return RealPairs(spec, ts.images, ts.pair_image, ts.captions, {**read_skipped, **ts.skipped})


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def encode_text(captions: list[str], cfg: Config, cache: Path) -> tuple[np.ndarray, str]:
    """Raw ``(n, d) float32`` features of the captions under ``distill.text_encoder`` (cached in ``cache``) and
    the text space's name."""
    from rdistill.models.students import TextEncoder, blip_caption, parse_text_encoder

    d = cfg.distill
    spec = parse_text_encoder(d.text_encoder)
    prepped = [blip_caption(c, d.max_words) for c in captions] if d.caption_preprocess == "blip" else captions
    path = cache / f"text-{_digest(spec.name, prepped)}.npy"
    if path.exists():
        return np.load(path), spec.name
    feats = TextEncoder(spec).encode(prepped).astype(np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    return feats, spec.name


def _device(cfg: Config) -> str:
    import torch

    want = cfg.distill.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RunError("distill.device is cuda but this machine has no CUDA device")
    return want if want != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def claimed_config(cfg: Config, method: str) -> dict:
    """What the result depends on: the seed, the shared ``distill`` settings and this method's section (and the
    experts' settings for the methods that use them); runtime settings are not claimed."""
    d = _result_fields(cfg.distill)
    sections = {"mtt_vl", "tesla_vl", "lors", "covmatch", "mdm", "experts"}
    own = {config_section(method)} | ({"experts"} if _uses_experts(cfg, method) else set())
    shared = {k: v for k, v in d.items() if k not in sections}
    shared.pop("method", None)
    return {"seed": cfg.seed, "method": method, "distill": shared, **{k: d[k] for k in sorted(own)}}


def _uses_experts(cfg: Config, method: str) -> bool:
    return method in TRAJECTORY_METHODS or (method in EXPERTS_WHEN and EXPERTS_WHEN[method](cfg))


def _experts_executor(cfg: Config) -> str:
    import os

    ex = cfg.distill.experts.executor
    if ex != "auto":
        return ex
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    return "ray" if address and address != "local" else "local"


def _preview_png(image, size: int) -> bytes:
    """A ``(3, S, S)`` normalised tensor -> PNG bytes: de-normalised, clipped to [0, 1], 8 bits."""
    import torch
    from PIL import Image

    from rdistill.models.students import CLIP_MEAN, CLIP_STD

    x = image.float() * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr)
    if size and size != img.size[0]:
        img = img.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def nearest_captions(text: np.ndarray, real_text: np.ndarray, captions: list[str], block: int = 4096) -> list[str]:
    """The real caption nearest (cosine) each synthetic text vector, as MTT-VL shows its distilled text."""
    q = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    best = np.full(len(q), -np.inf, np.float32)
    arg = np.zeros(len(q), np.int64)
    for i in range(0, len(real_text), block):
        r = real_text[i : i + block]
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        sims = q @ r.T
        j = sims.argmax(1)
        better = sims[np.arange(len(q)), j] > best
        best[better], arg[better] = sims[np.arange(len(q)), j][better], j[better] + i
    return [captions[int(i)] for i in arg]


def write_result(out: Path, syn: Synthetic, ctx: MethodContext, cfg: Config, extra_source: dict) -> list[dict]:
    """Write ``syn`` in the distilled format into ``out`` (see the module docstring)."""
    d = cfg.distill
    text = syn.text.detach().cpu().float().numpy()
    near = nearest_captions(text, ctx.real.text.numpy(), ctx.real.captions)
    soft = None
    if syn.soft_labels is not None:
        with atomic_path(out / SOFT_LABELS) as tmp, open(tmp, "wb") as f:
            np.save(f, syn.soft_labels.detach().cpu().float().numpy())
        soft = SOFT_LABELS
    else:
        (out / SOFT_LABELS).unlink(missing_ok=True)
    preview = d.preview_size or ctx.image_size

    def samples():
        for i in range(syn.images.shape[0]):
            yield {
                "key": f"{i:08d}",
                "image": _preview_png(syn.images[i], preview),
                "ext": "png",
                "caption": syn.captions[i],
                "npy": text[i],
                "tensor": syn.images[i].detach().cpu().float().numpy(),
                "meta": {"source_index": int(syn.source_index[i]), "start_caption": syn.captions[i],
                         "nearest_caption": near[i]},
            }  # fmt: skip

    return _write_set(out, samples(), d, ctx, syn, soft, extra_source, text.shape[1])


def _write_set(out, samples, d, ctx, syn, soft, extra_source, dim):
    from rdistill.io.distilled import TENSOR_EXT, write_distilled_set

    source = {**syn.extra, **extra_source}
    return write_distilled_set(
        out,
        samples,
        shard_size=d.shard_size,
        method=ctx.method,
        text_space=ctx.text_space,
        text_vectors=True,
        text_normalized=False,
        text_dim=dim,
        image_format="png",
        image_size=ctx.image_size,
        image_tensor=TENSOR_EXT,
        lr_image=syn.lr_image,
        lr_text=syn.lr_text,
        soft_labels=soft,
        soft_label_loss=(syn.extra.get("soft_label_loss") or "wbce") if soft else None,
        source=source,
    )


def _clear(out: Path) -> None:
    clear_output(out, ("shards", "_work", "init"), (SUCCESS, "manifest.parquet", "distilled.json", SOFT_LABELS,
                                            "summary.json", "config.yaml", RUN_FILE))  # fmt: skip


def run_distill(method: str, input_spec: str, output: str | Path, cfg: Config, *, images: str | None = None,
                overwrite: bool = False) -> dict:  # fmt: skip
    """Distil ``input_spec`` with ``method`` into ``output``; returns the summary."""
    if method not in METHODS:
        raise RunError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    out = Path(output)
    with lock_output(out):
        if input_spec == "toy":
            input_spec = str(_toy_input(out, cfg))
        return _run(method, input_spec, out, cfg, images, overwrite)


def _toy_input(out: Path, cfg: Config) -> Path:
    """``--input toy``: a small toy Karpathy set (coloured shapes, 5 captions each) written into the output, for the
    offline demo (the same world as ``rdistill.evaluate --eval-data toy`` with the same seed)."""
    from rdistill.eval.toy import write_toy_karpathy

    path = out / "toy-data" / "dataset_toy.json"
    if not path.exists():
        write_toy_karpathy(path.parent, {"train": 200, "val": 40, "test": 40}, seed=cfg.seed + 1)
    return path


def _input_fingerprint(spec: str, images: str | None) -> dict:
    from rdistill.io.fingerprint import fingerprint_urls
    from rdistill.io.shards import resolve_shards

    urls = [spec] if spec.endswith(".json") else resolve_shards(spec)
    return {"spec": spec, "images": images, "files": fingerprint_urls(urls)}


def _run(method: str, spec: str, out: Path, cfg: Config, images_dir: str | None, overwrite: bool) -> dict:
    import torch

    t0 = time.perf_counter()
    d = cfg.distill
    record = {"input": _input_fingerprint(spec, images_dir), "config": claimed_config(cfg, method)}
    claim_output(out, RUN_FILE, record, ("input", "config"), overwrite, _clear, "a distillation of other input or "
                 "settings")  # fmt: skip
    if finished := finished_summary(out, RUN_FILE, {"seconds": 0.0}, resumed=True):
        return finished
    atomic_write_text(out / "config.yaml", yaml.safe_dump(_result_fields(cfg), sort_keys=False))
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if d.threads:
        torch.set_num_threads(d.threads)
    try:
        return _distill(method, spec, out, work, cfg, images_dir, t0)
    finally:
        torch.set_num_threads(threads_before)


def _distill(method, spec, out, work, cfg, images_dir, t0) -> dict:
    import torch

    from rdistill.methods.experts import ExpertSettings, default_experts_dir, load_or_train_experts
    from rdistill.models.students import build_image_model, normalize_images

    d = cfg.distill
    pairs = load_real_pairs(spec, images_dir, cfg)
    m = d.num_pairs
    if m > len(pairs.pair_image):
        raise RunError(f"--num-pairs {m}: the input has only {len(pairs.pair_image)} pairs")
    text, space = encode_text(pairs.captions, cfg, work)
    t_data = time.perf_counter() - t0
    real = RealData(
        images=normalize_images(torch.from_numpy(pairs.images)),
        text=torch.from_numpy(text),
        captions=list(pairs.captions),
        pair_image=torch.from_numpy(pairs.pair_image.astype(np.int64)),
    )
    rows = np.sort(np.random.default_rng([cfg.seed, 11]).choice(len(pairs.pair_image), m, replace=False))
    rows_t = torch.from_numpy(rows)
    init = Synthetic(
        images=real.pair_images(rows_t).clone(),
        text=real.text[rows_t].clone(),
        captions=[real.captions[i] for i in rows],
        source_index=[int(i) for i in rows],
    )
    device = _device(cfg)
    ctx_holder = {}
    experts_info = {}

    def experts_fn():
        ctx = ctx_holder["ctx"]
        spec = ctx.student_spec()
        es = ExpertSettings.from_config(d.experts)
        rec = {
            "data": _digest(pairs.images, pairs.pair_image, pairs.captions),
            "pairs": int(len(pairs.pair_image)),
            "student": dataclasses.asdict(spec),
            "text_space": space,
            "caption_preprocess": [d.caption_preprocess, d.max_words],
            "head_dropout": d.head_dropout,
            "settings": dataclasses.asdict(es),
            "seed": int(d.experts.seed),
        }
        trajectories, info = load_or_train_experts(
            default_experts_dir(d.experts_dir), rec, {"images": real.images, "text": real.text,
                                                       "pair_image": real.pair_image},
            spec, text_dim=real.text.shape[1], head_dropout=d.head_dropout, settings=es, seed=d.experts.seed,
            executor=_experts_executor(cfg), device=device, cpus_per_expert=d.experts.cpus_per_expert,
            gpus_per_expert=d.experts.gpus_per_expert,
        )  # fmt: skip
        experts_info.update(info)
        return trajectories

    if _experts_executor(cfg) == "ray" and _uses_experts(cfg, method):
        from rdistill.ray.pools import init_ray

        init_ray(cfg.ray)
    _, image_dim = build_image_model(dataclasses.replace(
        MethodContext.student_spec_of(cfg, d.image_size), weights="random"))  # fmt: skip
    ctx = MethodContext(
        cfg, method, real, init, num_pairs=m, seed=cfg.seed, device=device, text_space=space,
        image_size=d.image_size, work_dir=work, experts_fn=experts_fn, image_dim=image_dim, progress=cfg.progress,
    )  # fmt: skip
    ctx_holder["ctx"] = ctx
    t1 = time.perf_counter()
    syn = load_method(method)(ctx)
    ctx.close()
    t_method = time.perf_counter() - t1
    if tuple(syn.images.shape) != tuple(init.images.shape) or tuple(syn.text.shape) != tuple(init.text.shape):
        raise RuntimeError(f"{method} returned a set of another shape than its initial set")
    if not (torch.isfinite(syn.images).all() and torch.isfinite(syn.text).all()):
        raise RunError(f"{method}: the distilled set has non-finite values; lower its learning rates")
    source = {
        "input": spec,
        "seed": cfg.seed,
        "real_pairs": int(len(pairs.pair_image)),
        "skipped": pairs.skipped,
        "history": ctx.history,
        "resumed_from": ctx.resumed_from,
        "experts": experts_info or None,
    }
    rows_written = write_result(out, syn, ctx, cfg, source)
    if d.write_init:
        # the initial set as the method starts it: its pairs, and its learnable lrs at their initial values
        lrs = syn.extra.get("initial_lrs") or (None, None)
        start = dataclasses.replace(init, lr_image=lrs[0], lr_text=lrs[1], extra={"method": f"init:{method}"})
        write_result(out / "init", start, ctx, cfg, {"input": spec, "seed": cfg.seed, "initial_set_of": method})
    summary = {
        "method": method,
        "output": str(out),
        "pairs": len(rows_written),
        "real_pairs": int(len(pairs.pair_image)),
        "skipped": pairs.skipped,
        "text_space": space,
        "device": device,
        "lr_image": syn.lr_image,
        "lr_text": syn.lr_text,
        "soft_labels": syn.soft_labels is not None,
        "loss_first": ctx.history[0] if ctx.history else None,
        "loss_last": ctx.history[-1] if ctx.history else None,
        "experts": experts_info or None,
        "resumed_from": ctx.resumed_from,
        "seconds": {"data": round(t_data, 3), "method": round(t_method, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    }  # fmt: skip
    atomic_write_json(out / "summary.json", summary)
    clear_output(out, ("_work",), ())
    atomic_write_text(out / SUCCESS, "")
    return summary


def print_summary(summary: dict) -> None:
    first, last = summary.get("loss_first") or {}, summary.get("loss_last") or {}
    loss = ""
    if "loss" in first and "loss" in last:
        loss = f", loss {first['loss']:.4g} (iteration {first['iteration']}) -> {last['loss']:.4g} " \
               f"(iteration {last['iteration']})"  # fmt: skip
    print(f"{summary['method']}: {summary['pairs']} pairs from {summary['real_pairs']} real ones{loss}")
    skipped = {k: v for k, v in (summary.get("skipped") or {}).items() if v}
    if skipped:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    print(f"distilled set: {summary['output']} ({summary['seconds']['total']:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rdistill.distill",
                                description="Distil image-text pairs with an optimisation-based method.")  # fmt: skip
    p.add_argument("--method", choices=tuple(METHODS), help="distill.method (default mtt-vl)")
    p.add_argument("--input", required=True, help="Karpathy-style .json (its train split), WebDataset shards, or toy")
    p.add_argument("--images", help="image root of a Karpathy-style file (default: its folder)")
    p.add_argument("--num-pairs", type=int, help="distill.num_pairs: M, the distilled set's size")
    p.add_argument("--output", required=True, help="output directory")
    add_common_args(p, upstream=False)
    return p


def _overrides(args) -> list[str]:
    out = []
    if args.method:
        out.append(f"distill.method={args.method}")
    if args.num_pairs is not None:
        out.append(f"distill.num_pairs={args.num_pairs}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        argv,
        lambda args, cfg: run_distill(
            cfg.distill.method, args.input, args.output, cfg, images=args.images, overwrite=args.overwrite
        ),  # fmt: skip
        print_summary,
        _overrides,
    )


if __name__ == "__main__":
    sys.exit(main())
