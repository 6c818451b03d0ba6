"""The built-in offline demo: writes a small planted embedding store, runs the prototype engine on it with
``configs/planted.yaml``, and prints how many planted concepts came back as correctly paired prototypes.

    python -m rdistill.demo [--output demo-output] [--config configs/planted.yaml]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rdistill.config import ConfigError, load_config
from rdistill.dev.planted import PlantedConcepts, make_concepts, score_recovery, write_store
from rdistill.engine.driver import RunError, print_summary, run_prototypes

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="demo-output", help="where the demo store and the prototypes go")
    p.add_argument("--config", default="configs/planted.yaml", help="config file (defaults if it does not exist)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    config = args.config if Path(args.config).exists() else None
    try:
        cfg = load_config(config, args.overrides if config else ["cluster.num_pairs=50", *args.overrides])
        store = make_demo_store(out / "embeddings")
        summary = run_prototypes(str(store), out / "prototypes", cfg, overwrite=True)
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = pq.read_table(out / "prototypes" / "prototypes.parquet")
    img = np.stack(table["image_embedding"].to_numpy(zero_copy_only=False))
    txt = np.stack(table["text_embedding"].to_numpy(zero_copy_only=False))
    score = score_recovery(img, txt, demo_concepts())
    print(f"demo store: {store} ({DEMO_ROWS} pairs, {DEMO_DIM}-d, {DEMO_CONCEPTS} planted concepts)")
    print_summary(summary, out / "prototypes")
    print(
        f"planted concepts recovered as correctly paired prototypes: {score['recovered_concepts']}/{DEMO_CONCEPTS}"
        f", mispaired prototypes: {score['mispaired']}"
    )
    print("top prototypes (alignment, shared pairs, retrieved caption):")
    for row in table.slice(0, 5).select(["alignment", "shared_pairs", "caption"]).to_pylist():
        print(f"  {row['alignment']:.3f} {row['shared_pairs']:5d}  {row['caption']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
