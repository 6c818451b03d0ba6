"""The full PDS job: embed, then prototypes, then synthesize, then the report.

    python -m rdistill.pds --config FILE [--input SHARDS | --embeddings DIR] --output DIR [--num-pairs M]
                           [--eval-data SPEC [--eval-images DIR]]
                           [--set key=value ...] [--overwrite] [--allow-incomplete] [--quiet]

    OUT/embeddings/   the embedding store (only with --input; --embeddings points at an existing one)
    OUT/prototypes/   prototypes.parquet and the engine's summary
    OUT/distilled/    WebDataset shards of the distilled pairs and manifest.parquet
    OUT/eval/         with --eval-data: the evaluation harness's eval.json and eval.html (rdistill.evaluate)
    OUT/summary.json  every stage's summary; OUT/report.html: plots and a contact sheet

Every stage keeps its own done-markers, so a resubmitted job skips the stages (and the parts of a stage) that
are complete and continues where the last one stopped. With no Ray address it starts a local Ray instance; with
``ray.address``, ``RAY_ADDRESS`` or under ``ray job submit`` it joins that cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rdistill.cli import add_common_args, num_pairs_override, run_cli
from rdistill.config import Config
from rdistill.errors import RunError
from rdistill.io.outputs import atomic_write_json, atomic_write_text, lock_output

log = logging.getLogger(__name__)


def _stage(name: str, fn, what) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    summary = fn()
    seconds = time.perf_counter() - t0
    info = {"status": what(summary)[0], "what": what(summary)[1], "seconds": round(seconds, 3)}
    log.info("%s: %s (%s), %.1f s", name, info["status"], info["what"], seconds)
    return summary, info


def run_pds(cfg: Config, output: str | Path, *, input_spec: str = "", embeddings: str = "",
            overwrite: bool = False, allow_incomplete: bool = False, eval_data: str = "",
            eval_images: str = "") -> dict:  # fmt: skip
    """Run the job into ``output``; returns the job summary (also written to ``output/summary.json``).

    ``overwrite`` and ``allow_incomplete`` apply to every stage (:func:`rdistill.io.outputs.claim_output`).
    ``eval_data`` (a Karpathy-style file with ``eval_images`` its image root, eval shards, or ``toy``) adds the
    evaluation harness after synthesis (:mod:`rdistill.eval.driver`) and its table to the report."""
    out = Path(output)
    with lock_output(out):
        return _run_pds(cfg, out, input_spec, embeddings, overwrite, allow_incomplete, eval_data, eval_images)


def _run_pds(cfg: Config, out: Path, input_spec: str, embeddings: str, overwrite: bool,
             allow_incomplete: bool, eval_data: str = "", eval_images: str = "") -> dict:  # fmt: skip
    from rdistill.engine import run_prototypes
    from rdistill.stages.embed.driver import run_embed
    from rdistill.stages.report import write_report
    from rdistill.stages.synthesize.driver import run_synthesize

    input_spec = input_spec or cfg.job.input
    embeddings = embeddings or cfg.job.embeddings
    if eval_data and not cfg.job.synthesize:
        raise RunError("--eval-data evaluates the distilled set: it needs the synthesis stage (job.synthesize)")
    if eval_images and not eval_data:
        raise RunError("--eval-images is the image root of --eval-data: give both")
    if input_spec and embeddings:
        raise RunError("give --input (shards to embed) or --embeddings (an existing store), not both")
    if not input_spec and not embeddings:
        if not cfg.job.toy_shards:
            raise RunError("nothing to distil: give --input SHARDS or --embeddings DIR (or job.toy_shards)")
        input_spec = str(_toy_input(out, cfg))
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    summary: dict = {"output": str(out), "stages": stages}
    if input_spec:
        emb, stages["embed"] = _stage("embed", lambda: run_embed(input_spec, out / "embeddings", cfg,
                                                                 overwrite=overwrite), _embed_what)  # fmt: skip
        summary["embed"] = emb
        embeddings = str(out / "embeddings")
    protos, stages["prototypes"] = _stage(
        "prototypes",
        lambda: run_prototypes(
            embeddings, out / "prototypes", cfg, overwrite=overwrite, allow_incomplete=allow_incomplete
        ),
        _prototypes_what,
    )
    summary["prototypes"] = protos
    distilled = None
    if cfg.job.synthesize:
        syn, stages["synthesize"] = _stage(
            "synthesize",
            lambda: run_synthesize(out / "prototypes", out / "distilled", cfg, overwrite=overwrite,
                                   allow_incomplete=allow_incomplete),
            lambda s: ("skipped (done)" if not s["this_run"]["images"] else "ran",
                       f"{s['images']} images, {s['this_run']['images']} this run"
                       + (f" at {s['this_run']['images_per_s']:.2f} images/s" if s["this_run"]["images_per_s"]
                          else "")),
        )  # fmt: skip
        summary["synthesize"] = syn
        distilled = out / "distilled"
    evaluation = None
    if eval_data:
        from rdistill.eval.driver import run_evaluate

        evaluation, stages["evaluate"] = _stage(
            "evaluate",
            lambda: run_evaluate([str(distilled)], eval_data, out / "eval", cfg, eval_images=eval_images or None,
                                 overwrite=overwrite),
            lambda s: ("skipped (done)" if not s["runs_this_time"] else "ran",
                       f"{len(s['results'])} rows, {s['runs_this_time']} runs this time, select on {s['select']}"),
        )  # fmt: skip
        summary["evaluate"] = {k: evaluation[k] for k in ("protocol", "select", "results", "seconds")}
    report = write_report(out, summary, out / "prototypes", distilled, cfg.job.report_images, evaluation)
    summary["report"] = str(report)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _embed_what(s: dict) -> tuple[str, str]:
    skipped = ", ".join(f"{v} {k}" for k, v in s["counts"]["skipped"].items())
    status = "ran" if s["parts_this_run"] else "skipped (done)"
    rate = f" at {s['this_run']['samples_per_s']:.0f} samples/s" if s["this_run"]["samples_per_s"] else ""
    return status, f"{s['counts']['samples']} samples, skipped: {skipped or 'none'}{rate}"


def _prototypes_what(s: dict) -> tuple[str, str]:
    empty = len(s["input"].get("empty_parts", []))
    what = f"{s['prototypes']['count']} prototypes" + (f", {empty} empty parts skipped" if empty else "")
    return ("skipped (done)" if s.get("resumed") else "ran"), what


def _toy_input(out: Path, cfg: Config) -> Path:
    """The demo's shards of real images, generated once into ``out/toy-shards`` (deterministic in the seed)."""
    from rdistill.dev.toydata import write_toy_shards

    root = out / "toy-shards"
    if not (root / "_SUCCESS").exists():
        log.info("writing %d toy shards of %d samples to %s", cfg.job.toy_shards, cfg.job.toy_per_shard, root)
        write_toy_shards(root, cfg.job.toy_shards, cfg.job.toy_per_shard, seed=cfg.seed)
        atomic_write_text(root / "_SUCCESS", "")
    return root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rdistill.pds", description="PDS dataset distillation, end to end.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", default="", help="WebDataset shards: directory, glob, brace pattern or URL")
    src.add_argument("--embeddings", default="", help="an existing embedding store (skips the embed stage)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--num-pairs", type=int, help="M, the number of distilled pairs (cluster.num_pairs)")
    p.add_argument("--eval-data", default="", help="evaluate the distilled set on this Karpathy-style .json, "
                   "WebDataset eval shards, or toy (rdistill.evaluate); the table goes into the report")  # fmt: skip
    p.add_argument("--eval-images", default="", help="image root of a Karpathy-style --eval-data file")
    add_common_args(p)
    return p


def print_summary(summary: dict) -> None:
    for name, s in summary["stages"].items():
        print(f"{name:11} {s['status']:15} {s['what']} ({s['seconds']:.1f} s)")
    print(f"report: {summary['report']}")


def main(argv: list[str] | None = None) -> int:
    def run(args, cfg):
        return run_pds(cfg, args.output, input_spec=args.input, embeddings=args.embeddings, overwrite=args.overwrite,
                       allow_incomplete=args.allow_incomplete, eval_data=args.eval_data,
                       eval_images=args.eval_images)  # fmt: skip

    return run_cli(build_parser(), argv, run, print_summary, num_pairs_override)


if __name__ == "__main__":
    sys.exit(main())
