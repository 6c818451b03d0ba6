"""The coreset baselines: M real pairs chosen from an embedding store, written in the distilled format.

    python -m rdistill.coreset --method random|herding|kcenter|clip-score|text-prototype|image-prototype
                               --embeddings STORE --num-pairs M --output DIR [--prototypes DIR]
                               [--config FILE] [--set key=value ...]

One streaming pass over the store (blocks of ``embeddings.block_rows``, rows with NaN, infinite or zero vectors
skipped as in the prototype engine) selects the rows (:mod:`rdistill.baselines.select`):

* ``random``: a uniform sample of M (the M least row priorities, a seeded hash of the row id);
* ``herding`` / ``kcenter``: from a uniform candidate pool of ``coreset.pool`` rows (the same priorities), on the
  pair features ``[img, txt] / sqrt(2)``; herding's target is the mean pair feature over the *whole* store.
  Memory: the pool's features, ``pool x 2d x 4`` bytes (about 600 MB for 100k ViT-L/14 pairs; herding and
  k-center run on them in float32 in place, with ``O(pool)`` more), besides the blocks in flight (below); time
  ``O(M x pool x 2d)``;
* ``clip-score``: the M pairs of highest image-text cosine (CLIP score filtering at size M);
* ``text-prototype`` / ``image-prototype`` (PDS table 5): for each prototype of ``--prototypes`` the real pair
  whose caption (image) embedding is nearest to its text (image) prototype; a row may be retrieved twice.

The pass holds besides up to four blocks of image and text rows (the store's read-ahead, normalised in place),
``8 x block_rows x d x 4`` bytes (1.6 GB at the default 65536 rows and d = 768; two more blocks' worth while a
block with invalid rows is compacted): lower ``embeddings.block_rows`` to shrink it.

The selected pairs' images and captions are copied from the source shards the store's metadata points to
(``shard``, ``key``, ``index``, as the embedding stage writes them; the sample is found by its key in its shard,
else by its position among the shard's samples). A store without them (LAION's published embeddings) gets a
manifest of keys, captions and URLs and no images, and the summary says so.

    DIR/shards/coreset-{k:05d}.tar   KEY.jpg|png|... (original bytes), KEY.txt, KEY.json (source row, shard, key)
    DIR/manifest.parquet             id, key, shard, caption, row, score, source_shard, source_key, source_index
    DIR/distilled.json               method coreset:METHOD, text space none (captions only)
    DIR/summary.json, coreset.json (the run record), config.yaml, _SUCCESS
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from rdistill.baselines.select import BottomK, herding, kcenter, pair_features, row_priority
from rdistill.cli import add_common_args, num_pairs_override, run_cli
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

log = logging.getLogger(__name__)

RUN_FILE = "coreset.json"
PROTOTYPE_METHODS = ("text-prototype", "image-prototype")


def _normalize(x: np.ndarray, inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(n, d) float32`` rows -> unit rows (in ``x`` itself with ``inplace``) and which were valid ``(n,) bool``
    (finite, non-zero; the others are left as they are)."""
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    scale = np.where(ok, norms, 1.0)[:, None].astype(x.dtype)
    if inplace:
        return np.divide(x, scale, out=x), ok
    return x / scale, ok


def _prototypes(path: str | Path, column: str) -> np.ndarray:
    """The ``column`` (``text_embedding`` or ``image_embedding``) of a ``prototypes.parquet``, L2-normalised,
    ``(M, d) float32``; a missing file or column, or values that are not vectors of one length, are refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table_path = Path(path) / "prototypes.parquet" if Path(path).is_dir() else Path(path)
    if not table_path.exists():
        raise RunError(f"{table_path}: prototypes not found (run python -m rdistill.prototypes first)")
    try:
        names = pq.ParquetFile(table_path).schema_arrow.names
        if column not in names:
            raise RunError(f"{table_path}: no column {column!r} (columns: {', '.join(names) or 'none'})")
        col = pq.read_table(table_path, columns=[column]).column(column).combine_chunks()
    except RunError:
        raise
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise RunError(f"{table_path}: not a readable parquet file ({' '.join(str(e).split())})") from None
    try:
        if pa.types.is_fixed_size_list(col.type) and col.null_count == 0:  # as the prototype engine writes it
            protos = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            protos = np.stack(col.to_numpy(zero_copy_only=False))
        protos = protos.astype(np.float32)
    except (TypeError, ValueError, pa.ArrowException):
        protos = None
    if protos is None or protos.ndim != 2 or protos.size == 0:
        raise RunError(f"{table_path}: column {column!r} does not hold one list of numbers of one length per row")
    unit, ok = _normalize(protos)
    if not ok.all():
        raise RunError(f"{table_path}: {int((~ok).sum())} prototypes with a zero or non-finite {column}")
    return unit


def _take(idx: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    # ``idx`` sorted and distinct (BottomK's entering rows): all of them is the arrays themselves, no copy
    return [a if len(idx) == len(a) else a[idx] for a in arrays]


def select_rows(store, cfg: Config, method: str, m: int, prototypes: str | None = None) -> dict:
    """One streaming pass -> ``rows (k,) int64`` global row ids in selection order, ``score (k,) float64`` (the
    method's: priority, cosine, herding step ...), counts."""
    from rdistill.algo.retrieval import NearestRows

    seed, pool = cfg.seed, cfg.coreset.pool
    n_valid = n_invalid = 0
    keep = BottomK(pool if method in ("herding", "kcenter") else m)
    total = None
    nearest = None
    if method in PROTOTYPE_METHODS:
        if not prototypes:
            raise RunError(f"coreset.method {method} needs --prototypes DIR (the PDS prototypes to retrieve for)")
        protos = _prototypes(prototypes, "text_embedding" if method == "text-prototype" else "image_embedding")
        if protos.shape[1] != store.dim:
            raise RunError(f"{prototypes}: prototypes are {protos.shape[1]}-d but the store is {store.dim}-d")
        nearest = NearestRows(protos)
    for block in store.iter_blocks(cfg.embeddings.block_rows):
        # the block's arrays are its own (read as float32 copies): normalised in place, copied only to drop rows
        img, ok_i = _normalize(block.img, inplace=True)
        txt, ok_t = _normalize(block.txt, inplace=True)
        ok = ok_i & ok_t
        n_valid += int(ok.sum())
        n_invalid += int((~ok).sum())
        rows = block.rows
        if not ok.all():
            rows, img, txt = rows[ok], img[ok], txt[ok]
        if method == "random":
            keep.add(row_priority(rows, seed), rows)
        elif method in ("herding", "kcenter"):
            # pair features are built for the rows that enter the pool only, and for the target mean in slices
            keep.add(row_priority(rows, seed), rows, lambda idx, i=img, t=txt: pair_features(*_take(idx, i, t)))
            s = sum(
                pair_features(img[a : a + 4096], txt[a : a + 4096]).sum(axis=0, dtype=np.float64)
                for a in range(0, len(rows), 4096)
            )
            total = s if total is None else total + s
        elif method == "clip-score":
            keep.add(-np.einsum("ij,ij->i", img, txt).astype(np.float64), rows)
        else:
            nearest.add(txt if method == "text-prototype" else img, rows)
    if n_valid == 0:
        raise RunError(f"{store.url}: no valid rows to select from")
    counts = {"rows": store.num_rows, "valid": n_valid, "invalid": n_invalid}
    if method in PROTOTYPE_METHODS:
        rows, score = nearest.best_row.copy(), nearest.best_score.astype(np.float64)
        counts["distinct"] = int(len(np.unique(rows)))
        return {"rows": rows, "score": score, "counts": counts}
    if m > n_valid:
        raise RunError(f"--num-pairs {m} is more than the store's {n_valid} valid pairs")
    keys, rows, payload = keep.result()
    if method == "random":
        return {"rows": rows, "score": keys, "counts": counts}
    if method == "clip-score":
        return {"rows": rows, "score": -keys, "counts": counts}
    counts["pool"] = len(rows)
    if method == "herding":
        order = herding(payload, m, target=total / n_valid)
    else:
        order = kcenter(payload, m, seed=seed)
    return {"rows": rows[order], "score": np.arange(len(order), dtype=np.float64), "counts": counts}


def _metadata(store, rows: np.ndarray) -> list[dict]:
    """Key, caption, and where the embedding stage read it (``shard``, ``index``; ``url`` if present) per row."""
    import pyarrow.parquet as pq

    out: list[dict | None] = [None] * len(rows)
    starts = np.array([p.start for p in store.parts])
    part_of = np.searchsorted(starts, rows, side="right") - 1
    for pi in np.unique(part_of):
        p = store.parts[pi]
        names = pq.ParquetFile(store.fs.open(p.metadata, "rb")).schema_arrow.names
        cols = [store.key_column, store.caption_column] + [c for c in ("shard", "index", "url") if c in names]
        with store.fs.open(p.metadata, "rb") as f:
            table = pq.read_table(f, columns=list(dict.fromkeys(cols)))
        sel = np.flatnonzero(part_of == pi)
        local = table.take(rows[sel] - p.start).to_pylist()
        for s, rec in zip(sel, local):
            out[s] = {
                "key": str(rec[store.key_column]),
                "caption": str(rec[store.caption_column] or ""),
                **{c: rec[c] for c in ("shard", "index", "url") if c in rec},
            }
    return out


def _read_members(url: str, wanted, image_keys: tuple[str, ...]) -> tuple[dict, list[str], set[str]]:
    """Stream one source shard -> the members of the samples whose key ``wanted(key)`` accepts (``{key: {ext:
    bytes}}``), the shard's keys in order of first appearance, and the keys that have an image member. Only the
    wanted samples' bytes are held, whatever the shard's size."""
    from rdistill.io.karpathy import EvalDataError
    from rdistill.io.shards import _KEY_EXT, ShardReadError, ShardStats, iter_members

    groups: dict[str, dict] = {}
    order: dict[str, None] = {}  # an ordered set
    has_image: set[str] = set()
    try:
        for name, data in iter_members(url, ShardStats()):
            mk = _KEY_EXT.match(name)
            if mk is None:
                continue
            k, ext = mk.group(1), mk.group(2).lower()
            order.setdefault(k, None)
            if ext in image_keys:
                has_image.add(k)
            if wanted(k):
                groups.setdefault(k, {})[ext] = data
    except (ShardReadError, EvalDataError) as e:
        raise RunError(str(e)) from None
    return groups, list(order), has_image


def _fetch_images(meta: list[dict], image_keys: tuple[str, ...]) -> list[tuple[bytes, str]]:
    """The image member of each selected sample from its source shard, found by key (else by its ``index``, the
    position among the shard's samples with an image). Only the selected samples' members are held in memory; a
    shard where some are found by position only is read a second time for those."""
    by_shard: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        by_shard.setdefault(str(m["shard"]), []).append(i)
    out: list = [None] * len(meta)
    for url, idx in by_shard.items():
        groups, order, has_image = _read_members(url, {meta[i]["key"] for i in idx}.__contains__, image_keys)
        key_of = {i: meta[i]["key"] for i in idx}
        with_image = None
        for i in idx:
            pos = meta[i].get("index")
            if key_of[i] not in groups and pos is not None:  # a writer that renamed the keys
                with_image = [k for k in order if k in has_image] if with_image is None else with_image
                if 0 <= int(pos) < len(with_image):
                    key_of[i] = with_image[int(pos)]
        by_position = {k for k in key_of.values() if k not in groups}
        if by_position:
            groups.update(_read_members(url, by_position.__contains__, image_keys)[0])
        for i in idx:
            members = groups.get(key_of[i])
            ext = next((e for e in image_keys if members and e in members), None)
            if ext is None:
                raise RunError(f"{url}: sample {meta[i]['key']} (row of the store's metadata) not found with an image")
            out[i] = (members[ext], ext)
    return out


def _clear(out: Path) -> None:
    clear_output(
        out, ("shards",), (SUCCESS, "summary.json", RUN_FILE, "config.yaml", "manifest.parquet", "distilled.json")
    )


def run_coreset(
    embeddings: str,
    output: str | Path,
    cfg: Config,
    *,
    prototypes: str | None = None,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> dict:
    """Select ``cluster.num_pairs`` real pairs of the store at ``embeddings`` by ``coreset.method`` and write them
    in the distilled format into ``output``; returns the summary."""
    out = Path(output)
    with lock_output(out):
        return _run_coreset(embeddings, out, cfg, prototypes, overwrite, allow_incomplete)


def _run_coreset(embeddings, out: Path, cfg: Config, prototypes, overwrite, allow_incomplete) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rdistill.engine.driver import open_store
    from rdistill.io.distilled import write_distilled_json, write_distilled_set
    from rdistill.io.fingerprint import fingerprint_urls

    t0 = time.perf_counter()
    method, m = cfg.coreset.method, cfg.cluster.num_pairs
    store, incomplete = open_store(embeddings, cfg, allow_incomplete)
    conf = {
        "seed": cfg.seed,
        "coreset": _result_fields(cfg.coreset),
        "num_pairs": m,
        "embeddings": _result_fields(cfg.embeddings),
    }
    record = {"embeddings": str(embeddings), "input": store.fingerprint(), "config": conf}
    if method in PROTOTYPE_METHODS and prototypes:
        table = Path(prototypes) / "prototypes.parquet" if Path(prototypes).is_dir() else Path(prototypes)
        record["input"] = {"store": record["input"], "prototypes": fingerprint_urls([str(table)])}
    claim_output(
        out, RUN_FILE, record, ("input", "config"), overwrite, _clear, "a coreset of another store or settings"
    )
    if finished := finished_summary(out, RUN_FILE, {"seconds": 0.0}, resumed=True):
        return finished
    (out / SUCCESS).unlink(missing_ok=True)
    atomic_write_json(out / RUN_FILE, record)
    sel = select_rows(store, cfg, method, m, prototypes)
    t_select = time.perf_counter() - t0
    rows, score = sel["rows"], sel["score"]
    meta = _metadata(store, rows)
    has_source = all(mm.get("shard") not in (None, "") for mm in meta)
    source = {"embeddings": str(embeddings), "method": method, "pool": cfg.coreset.pool, "seed": cfg.seed}
    if has_source:
        image_keys = tuple(k.strip().lower() for k in cfg.embed.image_keys.split(",") if k.strip())
        images = _fetch_images(meta, image_keys)
        samples = [
            {
                "key": f"{i:08d}",
                "image": img,
                "ext": ext,
                "caption": mm["caption"],
                "meta": {
                    "row": int(r),
                    "score": float(sc),
                    "source_shard": str(mm["shard"]),
                    "source_key": mm["key"],
                    "source_index": -1 if mm.get("index") is None else int(mm["index"]),
                },
            }
            for i, (r, sc, mm, (img, ext)) in enumerate(zip(rows, score, meta, images))
        ]
        fmt = Counter(ext for _, ext in images).most_common(1)[0][0]
        write_distilled_set(
            out,
            samples,
            shard_size=cfg.coreset.shard_size,
            prefix="coreset",
            method=f"coreset:{method}",
            text_space="none",
            image_format=fmt,
            source=source,
        )
        message = f"{len(rows)} pairs copied from {len({mm['shard'] for mm in meta})} source shards"
    else:
        manifest = [
            {
                "id": i,
                "key": mm["key"],
                "caption": mm["caption"],
                "url": str(mm.get("url") or ""),
                "row": int(r),
                "score": float(sc),
            }
            for i, (r, sc, mm) in enumerate(zip(rows, score, meta))
        ]
        with atomic_path(out / "manifest.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(manifest), tmp)
        write_distilled_json(
            out, method=f"coreset:{method}", count=len(rows), text_space="none", image_format="none", source=source
        )
        message = (
            f"{store.url}: the metadata has no shard column (not written by rdistill's embedding stage, "
            "e.g. LAION's published embeddings): manifest.parquet lists the selected keys, captions and "
            "URLs; fetch the images (e.g. with img2dataset) to train on them"
        )
        log.warning(message)
    summary = {
        "stage": "coreset",
        "method": method,
        "num_pairs": m,
        "embeddings": str(embeddings),
        "embeddings_incomplete": incomplete,
        "output": str(out),
        "counts": sel["counts"],
        "images_copied": has_source,
        "message": message,
        "seconds": {"select": round(t_select, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(conf, sort_keys=False))
    atomic_write_text(out / SUCCESS, "")
    return summary


def print_summary(summary: dict) -> None:
    print(f"coreset {summary['method']}: {summary['message']} -> {summary['output']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdistill.coreset",
        description="Coreset baselines (PDS tables 2 and 5) in the distilled format.",
    )
    p.add_argument(
        "--method",
        choices=("random", "herding", "kcenter", "clip-score", "text-prototype", "image-prototype"),
        help="coreset.method",
    )
    p.add_argument("--embeddings", required=True, help="the embedding store (clip-retrieval / LAION layout)")
    p.add_argument("--num-pairs", type=int, help="M, the number of pairs (cluster.num_pairs)")
    p.add_argument("--prototypes", help="PDS prototypes (for text-prototype / image-prototype)")
    p.add_argument("--output", required=True, help="output directory of the coreset")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    def overrides(args) -> list[str]:
        return num_pairs_override(args) + ([f"coreset.method={args.method}"] if args.method else [])

    return run_cli(
        build_parser(),
        argv,
        lambda args, cfg: run_coreset(
            args.embeddings,
            args.output,
            cfg,
            prototypes=args.prototypes,
            overwrite=args.overwrite,
            allow_incomplete=args.allow_incomplete,
        ),
        print_summary,
        overrides,
    )


if __name__ == "__main__":
    sys.exit(main())
