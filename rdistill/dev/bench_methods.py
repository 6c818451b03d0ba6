"""Cost of the optimisation-based methods at real size against PDS's whole cost (issue 12, docs/benchmarks.md).

    python -m rdistill.dev.bench_methods [--student nfnet_l0] [--image-size 224] [--num-pairs 100]
                                         [--methods mtt-vl,tesla-vl,lors,covmatch,mdm] [--threads 2]
                                         [--scratch DIR] [--json FILE] [--skip-pds]

Every measurement runs in a fresh process (its peak RSS is that process's ``VmHWM``), with the real architectures
and random weights: the image student ``--student`` at ``--image-size`` px, 768-d text features (BERT-base CLS,
frozen, as the students use them) and the trainable text head; ``--real-pairs`` random real pairs in memory and
two expert trajectories of random states written to disk and memory-mapped as :mod:`rdistill.methods.experts`
loads them. Measured:

- **one distillation iteration of each method**, through the method's own ``run`` with its published settings
  for ``--num-pairs`` (``distill.preset`` flickr30k) and 2 iterations: the time between the first and the second
  iteration's log line (set-up and the first iteration's warm-up excluded) and the process's peak RSS. The
  trajectory methods at ``R`` = 1 and 2 unrolled steps (the full unroll's memory grows with ``R``; on 24 GB the
  published R = 8 with 100-pair batches does not fit), extrapolated as ``t(R) = t1 + (R - 1)(t2 - t1)``;
- one SGD step of an expert (``distill.experts.batch_size`` real pairs, forward and backward);
- PDS: the frozen BERT-base forward per caption (every method pays it once), open_clip ViT-L-14's image and text
  towers per pair (the embed stage), and one denoising step of the real-size unCLIP UNet (SD 2.1 unCLIP's layout,
  768-d image embedding: ``stable-diffusion-2-1-unclip-small``) at 768 px with classifier-free guidance (batch 2),
  plus one VAE decode; the prototype engine's cost per row is taken from the planted N=100k run of this page.

Then the whole runs of the published settings on Flickr30K (29,000 train images, 145,000 captions, M = 100) are
extrapolated from these per-unit costs and set against PDS's (embedding + prototypes + 100 decoder steps per
prototype) as ratios. All on this machine's CPU: the ratios, not the seconds, are the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLICKR_IMAGES, FLICKR_CAPTIONS = 29_000, 145_000
TEXT_DIM = 768  # BERT-base CLS features
ENGINE_US_PER_ROW = 40.0  # planted N=100k, M=100, whole process 4.0 s (docs/benchmarks.md): per row, generous

# SD 2.1's UNet (stabilityai/stable-diffusion-2-1-unclip-small: the projection class embedding takes the 768-d
# CLIP ViT-L/14 image embedding and its 768-d noise-level embedding)
UNCLIP_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
    class_embed_type="projection", projection_class_embeddings_input_dim=1536,
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _config(args, method: str | None, syn_steps: int | None, batch: int = 0):
    from rdistill.config import load_config

    sets = ["progress=false", f"distill.student={args.student}", "distill.image_weights=random",
            f"distill.image_size={args.image_size}", "distill.log_every=1", "distill.checkpoint_every=1000000",
            "distill.experts.num_experts=2"]  # fmt: skip
    if method:
        sec = method.replace("-", "_")
        sets.append(f"distill.{sec}.iterations=2")
        if method in ("covmatch", "mdm"):  # their own log_every (the trajectory methods use distill.log_every)
            sets.append(f"distill.{sec}.log_every=1")
        if syn_steps:
            sets.append(f"distill.{sec}.syn_steps={syn_steps}")
        if batch:  # the trajectory methods' synthetic mini-batch, CovMatch's real batch
            sets.append(f"distill.{sec}.{'batch_real' if method == 'covmatch' else 'mini_batch'}={batch}")
        if method == "mdm":
            sets.append("distill.mdm.init=given")  # its k-means init is a one-off forward pass, counted apart
    return load_config(None, sets)


class _TimedContext:
    """Mixed into :class:`rdistill.methods.common.MethodContext`: the time of every log line."""

    def log(self, iteration, total, **metrics):
        self.stamps.append((int(iteration), time.perf_counter()))
        super().log(iteration, total, **metrics)


def _context(args, cfg, method: str, work: Path):
    import torch

    from rdistill.methods.common import MethodContext, RealData, Synthetic
    from rdistill.methods.experts import load_experts

    class Ctx(_TimedContext, MethodContext):
        pass

    gen = torch.Generator().manual_seed(0)
    n, s, m = args.real_pairs, args.image_size, args.num_pairs
    real = RealData(
        images=torch.randn(n, 3, s, s, generator=gen),
        text=torch.randn(n, TEXT_DIM, generator=gen) * 0.5,
        captions=[f"caption {i}" for i in range(n)],
        pair_image=torch.arange(n),
    )
    init = Synthetic(images=real.images[:m].clone(), text=real.text[:m].clone(), captions=real.captions[:m],
                     source_index=list(range(m)))  # fmt: skip
    experts = Path(args.scratch) / "experts"
    ctx = Ctx(cfg, method, real, init, num_pairs=m, seed=0, device="cpu", text_space="bert:bert-base-uncased",
              image_size=s, work_dir=work, experts_fn=lambda: load_experts(experts, 2))  # fmt: skip
    ctx.stamps = []
    return ctx


def child_method(args, method: str, syn_steps: int | None, batch: int = 0) -> dict:
    from rdistill.methods.common import load_method

    cfg = _config(args, method, syn_steps, batch)
    work = Path(args.scratch) / f"work-{method}-{syn_steps}-{batch}"
    work.mkdir(parents=True, exist_ok=True)
    ctx = _context(args, cfg, method, work)
    t0 = time.perf_counter()
    load_method(method)(ctx)
    total = time.perf_counter() - t0
    stamps = dict(ctx.stamps)
    return {"iteration_s": stamps[2] - stamps[1], "first_s": stamps[1] - t0, "total_s": total,
            "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


def write_experts(args) -> None:
    """Two trajectories of ``epochs + 1`` random states (each epoch's weights a small step from the last)."""
    import torch

    from rdistill.methods.experts import _save_expert, expert_path

    root = Path(args.scratch) / "experts"
    if expert_path(root, 1).exists():
        return
    cfg = _config(args, None, None)
    ctx = _context(args, cfg, "mdm", Path(args.scratch) / "work-experts")  # only for its student builders
    epochs_needed = max(cfg.distill.mdm.max_start_epoch, 3) + 1
    for k in range(2):
        torch.manual_seed(k)
        state = {"image": ctx.image_student().state_dict(), "text": ctx.text_head().state_dict()}
        epochs = []
        for _ in range(epochs_needed):
            epochs.append({part: {n: t.detach().clone() for n, t in sd.items()} for part, sd in state.items()})
            for sd in state.values():
                for t in sd.values():
                    if t.is_floating_point():
                        t.add_(torch.randn_like(t) * 1e-3)
        _save_expert(expert_path(root, k), k, k, epochs, [0.0] * (epochs_needed - 1))


def child_expert_step(args) -> dict:
    import torch

    from rdistill.methods.experts import info_nce

    cfg = _config(args, None, None)
    ctx = _context(args, cfg, "mtt-vl", Path(args.scratch) / "work-expert")
    image, head = ctx.image_student().train(), ctx.text_head().train()
    opt = torch.optim.SGD([*image.parameters(), *head.parameters()], lr=0.1)
    b = cfg.distill.experts.batch_size
    times = []
    for _ in range(2):
        idx = torch.randint(args.real_pairs, (b,))
        t0 = time.perf_counter()
        loss = info_nce(image(ctx.real.images[idx]).float(), head(ctx.real.text[idx]).float(), 0.07)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step_s": times[-1], "batch": b, "peak_rss_mb": _peak_rss_mb()}


def child_encoders(args) -> dict:
    """Per-item forward costs: BERT-base per caption, open_clip ViT-L-14 per image and per caption."""
    import open_clip
    import torch
    from transformers import BertConfig, BertModel

    out = {}
    with torch.no_grad():
        bert = BertModel(BertConfig()).eval()
        ids = torch.randint(1000, 30000, (32, 40))
        bert(input_ids=ids)
        t0 = time.perf_counter()
        bert(input_ids=ids)
        out["bert_per_caption_s"] = (time.perf_counter() - t0) / 32
        del bert
        model = open_clip.create_model("ViT-L-14", pretrained=None).eval()
        x = torch.randn(8, 3, 224, 224)
        model.encode_image(x[:2])
        t0 = time.perf_counter()
        model.encode_image(x)
        out["clip_l_per_image_s"] = (time.perf_counter() - t0) / 8
        tok = torch.randint(1, 40000, (32, 77))
        model.encode_text(tok[:2])
        t0 = time.perf_counter()
        model.encode_text(tok)
        out["clip_l_per_caption_s"] = (time.perf_counter() - t0) / 32
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def child_decoder(args) -> dict:
    """One denoising step of the real-size unCLIP UNet at 768 px with guidance (batch 2), and one VAE decode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = {}
    with torch.no_grad():
        unet = UNet2DConditionModel(**UNCLIP_UNET).eval()
        out["unet_params_m"] = sum(p.numel() for p in unet.parameters()) / 1e6
        lat = torch.randn(2, 4, 96, 96)
        cond = torch.randn(2, 77, 1024)
        cls = torch.randn(2, 1536)
        t = torch.tensor([500, 500])
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            unet(lat, t, encoder_hidden_states=cond, class_labels=cls)
            times.append(time.perf_counter() - t0)
        out["unet_step_s"] = times[-1]
        del unet
        vae = AutoencoderKL(**SD_VAE).eval()
        t0 = time.perf_counter()
        vae.decode(torch.randn(1, 4, 96, 96))
        out["vae_decode_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _run_child(args, *what) -> dict:
    cmd = [sys.executable, "-m", "rdistill.dev.bench_methods", "--child", *what, "--scratch", args.scratch,
           "--student", args.student, "--image-size", str(args.image_size), "--num-pairs", str(args.num_pairs),
           "--real-pairs", str(args.real_pairs), "--threads", str(args.threads),
           "--memory-limit-gb", str(args.memory_limit_gb)]  # fmt: skip
    print("  " + " ".join(what), "...", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-1500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


TRAJECTORY = ("mtt-vl", "tesla-vl", "lors")


def variants(args, method: str) -> list[tuple[str, int, int]]:
    """(key, unrolled steps R (0: n/a), batch override (0: the published one)) of each measurement of ``method``."""
    if method in TRAJECTORY:
        b = args.mtt_batch if method == "mtt-vl" else 0
        return [(f"R{r}" + (f"-b{b}" if b else ""), r, b) for r in (1, 2)]
    if method == "covmatch":
        return [(f"b{b}", 0, b) for b in args.covmatch_batches]
    return [("published", 0, 0)]


def _line(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    """The line through (x1, y1), (x2, y2) at x."""
    return y1 + (x - x1) * (y2 - y1) / (x2 - x1)


def published(cfg, method: str, m: int) -> tuple[int, int | None, int]:
    """(iterations, unrolled steps R or None, batch) of ``method``'s published settings for ``m`` pairs; the batch
    is the trajectory methods' synthetic mini-batch, the others' real batch."""
    if method in TRAJECTORY:
        from rdistill.methods.trajectory import resolve_settings

        st = resolve_settings(cfg, method, m)
        return st.iterations, st.syn_steps, st.mini_batch
    if method == "covmatch":
        from rdistill.methods.covmatch import CovMatchSettings

        st = CovMatchSettings.from_config(cfg).resolved(m)
        return st.iterations, None, st.batch_real
    from rdistill.methods.mdm import MDMSettings

    st = MDMSettings.from_config(cfg)
    return st.iterations, None, st.batch_real


def iteration_cost(args, method: str, got: dict, r_pub: int | None, b_pub: int) -> tuple[float, float, str] | None:
    """(seconds, peak RSS MB, how it was found) of one iteration at the published settings, from the measurements
    ``got`` (key -> result); None when one it needs is missing."""
    (k1, _, b1), *rest = variants(args, method)
    if k1 not in got:
        return None
    a = got[k1]
    if method in TRAJECTORY:
        scale = b_pub / b1 if b1 else 1.0  # a step's cost grows with its batch: scale the per-step increment
        if rest[0][0] not in got:  # R=2 did not fit (the full unroll): R steps at R=1's cost each
            how = f"R=1 at batch {b1 or b_pub} x {r_pub} steps x {scale:g}; R=2 did not fit in "
            how += f"{args.memory_limit_gb:g} GB"
            return r_pub * a["iteration_s"] * scale, float("nan"), how
        c = got[rest[0][0]]
        step_s, step_mb = c["iteration_s"] - a["iteration_s"], c["peak_rss_mb"] - a["peak_rss_mb"]
        per_it = a["iteration_s"] + (r_pub - 1) * step_s * scale
        peak = a["peak_rss_mb"] - step_mb + r_pub * step_mb * scale
        return per_it, peak, f"R=1,2 at batch {b1 or b_pub} -> R={r_pub}, batch {b_pub}"
    if method == "covmatch":
        (k2, _, b2) = rest[0]
        if k2 not in got:
            return None
        c = got[k2]
        per_it = _line(b1, a["iteration_s"], b2, c["iteration_s"], b_pub)
        return per_it, _line(b1, a["peak_rss_mb"], b2, c["peak_rss_mb"], b_pub), f"real batch {b1},{b2} -> {b_pub}"
    return a["iteration_s"], a["peak_rss_mb"], "measured"


def summarise(args, res: dict) -> dict:
    """Whole runs on Flickr30K at the published settings, from the per-unit costs."""
    from rdistill.config import load_config

    cfg = load_config(None, [f"distill.student={args.student}"])
    m, ex = args.num_pairs, cfg.distill.experts
    enc, dec = res.get("encoders", {}), res.get("decoder", {})
    text_once = FLICKR_CAPTIONS * enc.get("bert_per_caption_s", float("nan"))
    expert_steps = ex.num_experts * ex.epochs * math.ceil(FLICKR_CAPTIONS / ex.batch_size)
    experts_s = expert_steps * res.get("expert_step", {}).get("step_s", float("nan"))
    embed_s = FLICKR_IMAGES * enc.get("clip_l_per_image_s", float("nan")) + FLICKR_CAPTIONS * enc.get(
        "clip_l_per_caption_s", float("nan")
    )
    engine_s = FLICKR_CAPTIONS * ENGINE_US_PER_ROW * 1e-6
    steps = cfg.synthesize.steps
    decode_s = m * (steps * dec.get("unet_step_s", float("nan")) + dec.get("vae_decode_s", float("nan")))
    pds_s = embed_s + engine_s + decode_s
    rows = {}
    for method, runs in res.get("methods", {}).items():
        iters, r_pub, b_pub = published(cfg, method, m)
        cost = iteration_cost(args, method, {k: v for k, v in runs.items() if "iteration_s" in v}, r_pub, b_pub)
        if cost is None:
            continue
        per_it, peak, how = cost
        experts = experts_s if method != "covmatch" else 0.0  # CovMatch trains no experts
        total = text_once + iters * per_it + experts
        rows[method] = {
            "iterations": iters, "syn_steps": r_pub, "iteration_s": per_it, "extrapolated": how, "peak_rss_mb": peak,
            "distill_s": iters * per_it, "experts_s": experts, "total_s": total, "vs_pds": total / pds_s,
            "distill_only_vs_pds": iters * per_it / pds_s,
        }  # fmt: skip
    pds = {"embed_s": embed_s, "engine_s": engine_s, "decode_s": decode_s, "total_s": pds_s}
    return {"pds": pds, "text_features_s": text_once, "expert_steps": expert_steps, "experts_s": experts_s,
            "methods": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.dev.bench_methods")
    p.add_argument("--student", default="nfnet_l0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-pairs", type=int, default=100)
    p.add_argument("--real-pairs", type=int, default=512, help="random real pairs held in memory")
    p.add_argument("--methods", default="mtt-vl,tesla-vl,lors,covmatch,mdm")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--mtt-batch",
        type=int,
        default=20,
        help="MTT-VL measured at this mini-batch (its published 100 needs more than 24 GB), scaled up",
    )
    p.add_argument(
        "--covmatch-batches",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[32, 64],
        help="CovMatch measured at these two real batches, extrapolated to its 256",
    )
    p.add_argument("--memory-limit-gb", type=float, default=20.0, help="address-space limit of each measurement")
    p.add_argument("--skip-pds", action="store_true", help="skip the encoders and the decoder")
    p.add_argument("--scratch")
    p.add_argument("--json")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        import resource

        limit = int(args.memory_limit_gb * 2**30)  # a step that does not fit fails here, not through the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        kind = args.child[0]
        if kind == "method":
            steps, batch = int(args.child[2]) or None, int(args.child[3])
            print(json.dumps(child_method(args, args.child[1], steps, batch)))
        else:
            print(json.dumps({"expert-step": child_expert_step, "encoders": child_encoders,
                              "decoder": child_decoder}[kind](args)))  # fmt: skip
        return 0
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="rdistill-bench-methods-")
    os.makedirs(args.scratch, exist_ok=True)
    t0 = time.perf_counter()
    write_experts(args)
    res: dict = {"settings": {k: getattr(args, k) for k in ("student", "image_size", "num_pairs", "real_pairs")},
                 "methods": {}}  # fmt: skip
    if args.json and Path(args.json).exists():  # a rerun measures only what is missing or failed
        prev = json.loads(Path(args.json).read_text())
        if prev.get("settings") == res["settings"]:
            res = prev

    def measure(slot: dict, key: str, *what: str) -> None:
        if "error" in slot.get(key, {"error": ""}):
            slot[key] = _run_child(args, *what)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))

    for method in [x for x in args.methods.split(",") if x]:
        slot = res["methods"].setdefault(method, {})
        for key, r, batch in variants(args, method):
            measure(slot, key, "method", method, str(r), str(batch))
    measure(res, "expert_step", "expert-step")
    if not args.skip_pds:
        measure(res, "encoders", "encoders")
        measure(res, "decoder", "decoder")
    res["summary"] = summarise(args, res)
    res["bench_seconds"] = time.perf_counter() - t0
    _print(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def _print(res: dict) -> None:
    s = res["summary"]
    print(f"\nper unit (CPU, {res['settings']['student']} at {res['settings']['image_size']} px, "
          f"{res['settings']['num_pairs']} pairs)")  # fmt: skip
    for method, runs in res["methods"].items():
        for r, v in runs.items():
            what = r
            if "error" in v:
                print(f"  {method} {what}: failed: {v['error'].strip().splitlines()[-1]}")
            else:
                print(f"  {method} {what}: iteration {v['iteration_s']:.2f} s, peak RSS {v['peak_rss_mb']:.0f} MB")
    for key in ("expert_step", "encoders", "decoder"):
        if key in res:
            print(f"  {key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in res[key].items()))  # fmt: skip
    pds = s["pds"]
    print(f"\nwhole runs, Flickr30K, M={res['settings']['num_pairs']} (extrapolated, hours of this CPU)")
    print(f"  PDS: embedding {pds['embed_s'] / 3600:.2f} h + prototypes {pds['engine_s'] / 3600:.3f} h + decoder "
          f"{pds['decode_s'] / 3600:.2f} h = {pds['total_s'] / 3600:.2f} h")  # fmt: skip
    print(f"  experts: {s['expert_steps']} SGD steps = {s['experts_s'] / 3600:.1f} h; text features once "
          f"{s['text_features_s'] / 3600:.2f} h")  # fmt: skip
    for method, r in s["methods"].items():
        print(
            f"  {method}: {r['iterations']} iterations x {r['iteration_s']:.2f} s = {r['distill_s'] / 3600:.1f} h"
            f" (+ experts {r['experts_s'] / 3600:.1f} h) = {r['total_s'] / 3600:.1f} h: {r['vs_pds']:.1f}x PDS "
            f"({r['distill_only_vs_pds']:.1f}x without experts); peak RSS {r['peak_rss_mb'] / 1024:.1f} GB"
            f" [{r['extrapolated']}]"
        )


if __name__ == "__main__":
    raise SystemExit(main())
