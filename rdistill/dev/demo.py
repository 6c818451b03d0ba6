"""The built-in offline demo: writes a small planted embedding store, runs the prototype engine on it with
``configs/planted.yaml``, and prints how many planted concepts came back as correctly paired prototypes.

    python -m rdistill.dev.demo [--output planted-demo-output] [--config configs/planted.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rdistill.cli import add_common_args, run_cli
from rdistill.dev.planted import PlantedConcepts, make_concepts, score_recovery, write_store
from rdistill.engine.driver import print_summary, run_prototypes

DEMO_ROWS, DEMO_DIM, DEMO_CONCEPTS = 20_000, 64, 50


def demo_concepts(seed: int = 0) -> PlantedConcepts:
    return make_concepts(DEMO_CONCEPTS, DEMO_DIM, noise=0.6, seed=seed)


def make_demo_store(root: str | Path, seed: int = 0) -> Path:
    """Write the planted demo store (clip-retrieval layout, float16, 4 parts) unless it is already there."""
    root = Path(root)
    if not (root / "_SUCCESS").exists():
        write_store(root, demo_concepts(seed), DEMO_ROWS, rows_per_part=DEMO_ROWS // 4, seed=seed)
        (root / "_SUCCESS").write_text("")
    return root


def run_demo(args, cfg) -> dict:
    out = Path(args.output)
    store = make_demo_store(out / "embeddings")
    summary = run_prototypes(str(store), out / "prototypes", cfg, overwrite=args.overwrite)
    table = pq.read_table(out / "prototypes" / "prototypes.parquet")
    img = np.stack(table["image_embedding"].to_numpy(zero_copy_only=False))
    txt = np.stack(table["text_embedding"].to_numpy(zero_copy_only=False))
    top = table.slice(0, 5).select(["alignment", "shared_pairs", "caption"]).to_pylist()
    return {**summary, "demo_store": str(store), "score": score_recovery(img, txt, demo_concepts()), "top": top}


def report(summary: dict) -> None:
    score = summary["score"]
    print(f"demo store: {summary['demo_store']} ({DEMO_ROWS} pairs, {DEMO_DIM}-d, {DEMO_CONCEPTS} planted concepts)")
    print_summary(summary)
    print(
        f"planted concepts recovered as correctly paired prototypes: {score['recovered_concepts']}/{DEMO_CONCEPTS}"
        f", mispaired prototypes: {score['mispaired']}"
    )
    print("top prototypes (alignment, shared pairs, retrieved caption):")
    for row in summary["top"]:
        print(f"  {row['alignment']:.3f} {row['shared_pairs']:5d}  {row['caption']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.dev.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="planted-demo-output",
                   help="where the demo store and the prototypes go (never make demo's demo-output)")  # fmt: skip
    add_common_args(p, upstream=False)
    p.set_defaults(config="configs/planted.yaml" if Path("configs/planted.yaml").exists() else None)
    defaults = lambda args: [] if args.config else [f"cluster.num_pairs={DEMO_CONCEPTS}"]  # noqa: E731
    return run_cli(p, argv, run_demo, report, defaults)


if __name__ == "__main__":
    sys.exit(main())
