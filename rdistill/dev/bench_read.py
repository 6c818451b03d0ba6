"""Benchmark of the store's float16 -> float32 conversion: FAISS's fp16 decoder against numpy's cast.

    python -m rdistill.dev.bench_read --store DIR [--block-rows 65536] [--rounds 3] [--json F]

Every engine pass reads the store's float16 parts into float32 blocks (:meth:`rdistill.io.store.EmbeddingStore.
part_blocks`), and on a CPU node that conversion is a visible share of a pass. This reads each part's raw float16
rows once (memory-mapped, so what is timed is the conversion, not the disk), then converts every block both ways
into one reused float32 buffer, on this process's row threads: ``numpy``
(:func:`rdistill.io.rowpool.cast_float32`, what the store did before) and ``faiss``
(:func:`rdistill.io.rowpool.to_float32`). The two run interleaved ``rounds`` times; each keeps its best total. In
the first round every block's two results are compared bit for bit. The store must be a local directory (the parts
are memory-mapped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from rdistill.io.rowpool import cast_float32, row_threads, to_float32
from rdistill.io.store import EmbeddingStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdistill.dev.bench_read")
    p.add_argument("--store", required=True, help="a local embedding store with float16 parts")
    p.add_argument("--block-rows", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)
    store = EmbeddingStore(args.store)
    arrays = [a for part in store.parts for a in (part.img, part.txt) if a.rows]
    if not arrays or any(a.dtype != np.float16 for a in arrays):
        print(f"error: {args.store}: needs float16 parts", file=sys.stderr)
        return 2
    out = np.empty((args.block_rows, store.dim), dtype=np.float32)
    ways = {"numpy": cast_float32, "faiss": to_float32}
    best = dict.fromkeys(ways, float("inf"))
    elements = 0
    for r in range(args.rounds):
        totals = dict.fromkeys(ways, 0.0)
        for a in arrays:
            raw = np.load(a.path, mmap_mode="r")
            for r0 in range(0, a.rows, args.block_rows):
                block = np.ascontiguousarray(raw[r0 : r0 + args.block_rows])  # read in before any clock starts
                o = out[: block.shape[0]]
                bits = {}
                for name, fn in ways.items():
                    t0 = time.perf_counter()
                    fn(block, o)
                    totals[name] += time.perf_counter() - t0
                    bits[name] = o.view(np.uint32).copy() if r == 0 else None  # every block, in the first round
                if r == 0 and not np.array_equal(bits["numpy"], bits["faiss"]):
                    print(f"error: {a.path}: the two conversions differ", file=sys.stderr)
                    return 1
                elements += block.size if r == 0 else 0
        best = {k: min(best[k], totals[k]) for k in ways}
    result = {
        "store": args.store,
        "elements": elements,
        "gigabytes_float16": elements * 2 / 1e9,
        "threads": row_threads(),
        "seconds": best,
        "speedup": best["numpy"] / best["faiss"],
    }
    print(
        f"float16 -> float32 of {elements / 1e9:.2f} G values ({result['gigabytes_float16']:.1f} GB) on "
        f"{result['threads']} row threads, best of {args.rounds}: numpy {best['numpy']:.2f} s, "
        f"faiss {best['faiss']:.2f} s: {result['speedup']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
