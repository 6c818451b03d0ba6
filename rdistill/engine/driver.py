"""The prototype engine's driver and its command line.

    python -m rdistill.prototypes --embeddings DIR --output DIR --num-pairs M [--config FILE] [--set key=value ...]

Runs the passes of :mod:`rdistill.engine.passes` in order over the store, holding their results
(:mod:`rdistill.engine.state`) and spilling per-row data to ``OUT/_work/``. Outputs in the output directory, each
written atomically: ``prototypes.parquet``, ``summary.json``, ``config.yaml``, the run record ``prototypes.json``
(the store's part files with their sizes and mtimes, the result-defining config) and the ``_SUCCESS`` marker.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rdistill.blas import faiss_blas_summary
from rdistill.cli import add_common_args, num_pairs_override, run_cli
from rdistill.config import Config, dump_config
from rdistill.engine import passes
from rdistill.engine.executor import make_executor
from rdistill.engine.state import Assigned, Captions, Clusters, Matched, Prototypes, Scanned
from rdistill.io.outputs import (
    DONE,
    SUCCESS,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    claim_output,
    clear_output,
    fault_point,
    finished_summary,
    lock_output,
    require_finished,
)
from rdistill.io.store import EmbeddingStore
from rdistill.metrics import StepRecorder

log = logging.getLogger(__name__)

RUN_FILE = "prototypes.json"
WORK = "_work"
STEPS = ("scan", "prune", "cluster", "assign", "match", "prototypes", "captions")


def store_status(embeddings: str) -> tuple[bool, str, set[int] | None]:
    """Whether a store is complete: one written by our embedding stage (``embed.json`` at its root) must have its
    ``_SUCCESS``; stores from other writers carry no marker of ours and are taken as they are. For an unfinished
    store of ours, also the numbers of its finished parts (those with a done-marker)."""
    fs, root = fsspec.core.url_to_fs(str(embeddings))
    root = root.rstrip("/")
    if not fs.exists(f"{root}/embed.json") or fs.exists(f"{root}/{SUCCESS}"):
        return True, "", None
    done = set()
    for path in fs.glob(f"{root}/{DONE}/part_*.json"):
        m = re.fullmatch(r"part_(\d+)\.json", path.rsplit("/", 1)[-1])
        if m:
            done.add(int(m.group(1)))
    why = f"the embedding run that writes this store has not finished (no _SUCCESS; {len(done)} parts done)"
    return False, why, done


def open_store(embeddings: str, cfg: Config, allow_incomplete: bool = False) -> tuple[EmbeddingStore, bool]:
    """The store, refused when it is an unfinished run of ours unless ``allow_incomplete``, which reads only its
    finished parts; returns (store, whether it was taken incomplete)."""
    finished, why, done = store_status(embeddings)
    incomplete = require_finished(str(embeddings), finished, why, allow_incomplete)
    store = EmbeddingStore(embeddings, cfg.embeddings.key_column, cfg.embeddings.caption_column, done)
    return store, incomplete


def _clear(out: Path) -> None:
    clear_output(out, (WORK,), ("prototypes.parquet", "summary.json", "config.yaml", RUN_FILE, SUCCESS))


def run_prototypes(embeddings: str, output: str | Path, cfg: Config, *, overwrite: bool = False,
                   allow_incomplete: bool = False) -> dict:  # fmt: skip
    """Run the engine from the store at ``embeddings`` into ``output``; returns the summary dict.

    A finished run of the same store content and result-defining config is not redone (``resumed`` in the
    summary); one made from another store content or config is refused unless ``overwrite``. A store of ours
    whose embedding run has not finished is refused unless ``allow_incomplete``.
    """
    out = Path(output)
    with lock_output(out):
        store, incomplete = open_store(embeddings, cfg, allow_incomplete)
        record = {"embeddings": str(embeddings), "input": store.fingerprint(),
                  "config": yaml.safe_load(dump_config(cfg, "prototypes"))}  # fmt: skip
        # a finished k-means (or later pass) is hours of work at scale: a changed config must not wipe it unasked
        protect = tuple(f"{WORK}/{step}.pkl" for step in STEPS[STEPS.index("cluster") :])
        claim_output(out, RUN_FILE, record, ("input", "config"), overwrite, _clear,
                     "prototypes of another store or config", protect)  # fmt: skip
        if finished := finished_summary(out, RUN_FILE, {"seconds": 0.0}, resumed=True):
            return finished
        (out / SUCCESS).unlink(missing_ok=True)
        atomic_write_json(out / RUN_FILE, record)
        summary = _run(store, out, cfg)
        summary["input"]["incomplete"] = incomplete
        atomic_write_text(out / "config.yaml", dump_config(cfg, "prototypes"))
        atomic_write_json(out / "summary.json", summary)
        shutil.rmtree(out / WORK, ignore_errors=True)
        atomic_write_text(out / SUCCESS, "")
        return summary


class Checkpoints:
    """The reduced state of each finished pass in ``_work/{step}.pkl``, so a killed driver resumes after the last
    finished pass (the run record guarantees ``_work/`` belongs to this store content and config)."""

    def __init__(self, work: Path):
        self.work = work

    def load(self, step: str):
        path = self.work / f"{step}.pkl"
        if not path.exists():
            return None
        with open(path, "rb") as f:
            return pickle.load(f)

    def save(self, step: str, value) -> None:
        atomic_write_bytes(self.work / f"{step}.pkl", pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _run(store: EmbeddingStore, out: Path, cfg: Config) -> dict:
    """The passes in order, each resumed from its checkpoint when a killed run finished it; returns the summary."""
    t_start = time.perf_counter()
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    log.info("store %s: %d parts (%d empty skipped), %d rows, dim %d, %s", store.url, len(store.parts),
             len(store.empty_parts), store.num_rows, store.dim, store.dtype)  # fmt: skip
    rec, rng = StepRecorder(), np.random.default_rng(cfg.seed)
    ex = make_executor(cfg)
    ctx = passes.Context(store, cfg, ex, str(work))
    ck = Checkpoints(work)
    log.info("engine: %s executor", ex.name)
    gpu = ex.check_gpu() if cfg.cluster.gpu else None  # before any work: a faiss without GPUs stops the run here
    if gpu:
        log.info("cluster.gpu: %s", gpu)
    done = [step for step in STEPS if (work / f"{step}.pkl").exists()]
    last = max((STEPS.index(step) for step in done), default=-1)

    def step(name: str, compute):
        """Run ``name`` (or load it, when a later pass finished too: its inputs are no longer needed)."""
        if STEPS.index(name) <= last and (value := ck.load(name)) is not None:
            rec.steps[name] = {"seconds": 0.0, "resumed": True}
            return value
        with rec.step(name):
            value = compute()
        ck.save(name, value)
        fault_point(f"prototypes.{name}", 1)
        return value

    scanned, rng_state = step("scan", lambda: (passes.scan(ctx, rng), rng.bit_generator.state))
    rng.bit_generator.state = rng_state
    pruned = step("prune", lambda: passes.prune(ctx, scanned, rng))
    clusters = step("cluster", lambda: passes.cluster(ctx, scanned, pruned))
    assigned = step("assign", lambda: passes.assign(ctx, clusters, pruned))
    matched = step("match", lambda: passes.match(assigned, clusters, cfg))
    protos = step("prototypes", lambda: passes.prototypes(ctx, matched, clusters))
    caps = step("captions", lambda: passes.captions(ctx, protos))
    with rec.step("write"):
        write_table(out / "prototypes.parquet", matched, assigned, protos, caps)
    summary = _summary(out, store, cfg, scanned, pruned.cut, clusters, assigned, matched, protos)
    for step, info in rec.steps.items():  # which node ran how many of each step's tasks, and what they read
        tasks_of = {k: v for k, v in ex.nodes.items() if k == step or k.startswith(f"{step} ")}
        nodes = {}
        for counter in tasks_of.values():
            for node, n in counter.items():
                nodes[node] = nodes.get(node, 0) + n
        if not info.get("resumed"):
            info["nodes"] = nodes
        if step in ctx.bytes_read:
            info["bytes_read"] = ctx.bytes_read[step]
        if step in ctx.resumed_parts:
            info["resumed_parts"] = ctx.resumed_parts[step]
    summary["executor"] = ex.name
    summary["blas"] = {"driver": faiss_blas_summary(), "faiss_kernel_by_node": getattr(ex, "kernels", {})}
    summary["resumed_steps"] = [name for name, info in rec.steps.items() if info.get("resumed")]
    summary["contingency_nonzero_cells"] = matched.contingency_cells
    summary["contingency_bytes"] = matched.contingency_bytes
    summary["steps"] = rec.steps
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    return summary


def write_table(path: Path, matched: Matched, assigned: Assigned, protos: Prototypes, caps: Captions) -> None:
    """prototypes.parquet, sorted by alignment (best first); ids follow that order."""
    order = np.argsort(-protos.alignment, kind="stable")
    plan = matched.plan
    cells = plan.cells[order]
    table = pa.table(
        {
            "id": np.arange(order.size, dtype=np.int64),
            "image_embedding": _vectors(protos.img[order]),
            "text_embedding": _vectors(protos.txt[order]),
            "caption": [caps.texts[i] for i in order],
            "caption_key": [caps.keys[i] for i in order],
            "caption_row": caps.rows[order],
            "caption_similarity": caps.similarity[order],
            "image_cluster": cells[:, 0],
            "text_cluster": cells[:, 1],
            "image_cluster_size": assigned.img_sizes[cells[:, 0]],
            "text_cluster_size": assigned.txt_sizes[cells[:, 1]],
            "shared_pairs": protos.shared[order],
            "alignment": protos.alignment[order],
            "pairless": plan.pairless[order],
            "refilled": plan.refilled[order],
            "image_norm": protos.img_norms[order].astype(np.float32),
            "text_norm": protos.txt_norms[order].astype(np.float32),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _summary(out: Path, store: EmbeddingStore, cfg: Config, scanned: Scanned, cut, clusters: Clusters,
             assigned: Assigned, matched: Matched, protos: Prototypes) -> dict:  # fmt: skip
    matching, plan = matched.matching, matched.plan
    n_kept = scanned.n_valid - cut.n_drop
    return {
        "stage": "prototypes",
        "output": str(out),
        "input": {
            "url": store.url,
            "parts": len(store.parts),
            "empty_parts": store.empty_parts,
            "rows": store.num_rows,
            "dim": store.dim,
            "dtype": store.dtype,
            "key_column": store.key_column,
            "caption_column": store.caption_column,
        },
        "counts": {
            "rows": store.num_rows,
            "invalid": scanned.n_invalid,
            "invalid_per_part": scanned.invalid_per_part,
            "valid": scanned.n_valid,
            "pruned": cut.n_drop,
            "kept": n_kept,
            "kmeans_sample": clusters.sample_size,
        },
        "prune": {"ratio": cfg.prune.ratio, "cosine_cut": cut.sim_cut},
        "kmeans": {"image": asdict(clusters.img_stats), "text": asdict(clusters.txt_stats)},
        "clusters": {
            "empty_image_clusters": int((assigned.img_sizes == 0).sum()),
            "empty_text_clusters": int((assigned.txt_sizes == 0).sum()),
        },
        "match": {
            "solver": matching.solver,
            "lap_objective": matching.objective,
            "shared_pair_share": matching.objective / max(n_kept, 1),
            "pairless_matches": int((matching.shared == 0).sum()),
        },
        "prototypes": {
            "count": int(plan.cells.shape[0]),
            "pairless_policy": cfg.prototypes.pairless,
            "pairless_kept": int(plan.pairless.sum()),
            "refilled": int(plan.refilled.sum()),
            "mean_alignment": float(protos.alignment.mean()),
        },
    }


def _vectors(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdistill.prototypes",
        description="PDS prototypes from CLIP embeddings in the clip-retrieval / LAION layout.",
    )
    p.add_argument("--embeddings", required=True, help="embedding store: local dir or fsspec URL")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--num-pairs", type=int, help="M, the number of prototypes (cluster.num_pairs)")
    add_common_args(p)
    return p


def print_summary(summary: dict) -> None:
    c, pr = summary["counts"], summary["prototypes"]
    print(f"prototypes: {pr['count']} written to {Path(summary['output']) / 'prototypes.parquet'}"
          + (" (finished before: nothing to do)" if summary.get("resumed") else ""))  # fmt: skip
    empty = len(summary["input"].get("empty_parts", []))
    print(f"  rows {c['rows']}, invalid {c['invalid']}, pruned {c['pruned']}, kept {c['kept']}"
          + (f"; {empty} empty parts skipped" if empty else ""))  # fmt: skip
    print(
        f"  matching {summary['match']['solver']}: {summary['match']['lap_objective']} shared pairs "
        f"({summary['match']['shared_pair_share']:.1%} of kept), {summary['match']['pairless_matches']} pairless "
        f"matches, policy {pr['pairless_policy']}"
    )
    print(f"  mean prototype alignment {pr['mean_alignment']:.3f}; {summary['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    def run(args, cfg):
        return run_prototypes(args.embeddings, args.output, cfg, overwrite=args.overwrite,
                              allow_incomplete=args.allow_incomplete)  # fmt: skip

    return run_cli(build_parser(), argv, run, print_summary, num_pairs_override)


if __name__ == "__main__":
    sys.exit(main())
