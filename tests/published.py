"""Data written through the real writers of the tools that publish image-text data: clip-retrieval's embedding
writer (the layout of LAION's published embeddings) and img2dataset's WebDataset writer (the shards most datasets
are downloaded as). Tests read what these tools really write, not our idea of it.

The writer modules are loaded by file path: importing ``clip_retrieval`` runs its ``__init__``, which imports a web
server and dependencies the venv does not have (the packages are installed ``--no-deps`` by ``make setup``). Their
own imports (fsspec, numpy, pandas, pyarrow, webdataset) are ours too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np

_LOADED: dict[tuple[str, str], ModuleType] = {}


def load_writer_module(package: str, relpath: str) -> ModuleType:
    """The module at ``relpath`` inside the installed ``package``, executed on its own: the package's
    ``__init__`` is not run (``find_spec`` of a top-level package only locates it)."""
    if (package, relpath) in _LOADED:
        return _LOADED[(package, relpath)]
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, (
        f"{package} is not installed in {sys.prefix}: `make setup` installs it (--no-deps); the tests of "
        "published layouts need its writer"
    )
    path = Path(spec.submodule_search_locations[0]) / relpath
    assert path.is_file(), f"{path}: not found; is the installed {package} the version pinned in the Makefile?"
    name = f"_published_{package}_{relpath.replace('/', '_').removesuffix('.py')}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    _LOADED[(package, relpath)] = module
    return module


def write_clip_retrieval_store(
    root: str | Path,
    img: np.ndarray,
    txt: np.ndarray,
    captions: list[str],
    metadata: list[dict] | None,
    partitions: list[slice | None],
    partition_count: int,
    image_paths: list[str] | None = None,
) -> list[int | None]:
    """Write rows through clip-retrieval's ``OutputSink`` (``clip_inference/writer.py``), one sink per partition
    as its inference workers do: partition ``i`` holds rows ``partitions[i]``; ``None`` is a partition with no
    samples, for which clip-retrieval writes no file (a gap in the numbers). Names are padded to
    ``int(log10(partition_count)) + 1`` digits. ``metadata`` (one dict per row) goes in as the JSON strings
    clip-retrieval gets from a WebDataset sample's ``.json``, so its fields become columns after ``image_path``
    and ``caption``; ``metadata=None`` writes no metadata columns (clip-retrieval run on files, not WebDataset).
    Returns the row count of each partition (``None`` for an empty one)."""
    writer = load_writer_module("clip_retrieval", "clip_inference/writer.py")
    assert len(partitions) <= partition_count
    image_paths = image_paths if image_paths is not None else [f"{i:09d}.jpg" for i in range(len(captions))]
    counts: list[int | None] = []
    for pid, rows in enumerate(partitions):
        sink = writer.OutputSink(str(root), True, True, metadata is not None, pid, partition_count)
        if rows is not None:
            sink.add(
                {
                    "image_embs": img[rows],
                    "image_filename": image_paths[rows],
                    "text_embs": txt[rows],
                    "text": captions[rows],
                    "metadata": [json.dumps(m) for m in metadata[rows]] if metadata is not None else [],
                }
            )
        sink.flush()
        counts.append(None if rows is None else len(captions[rows]))
    return counts


# The shard schema img2dataset's downloader builds (downloader.py, ``download_shard``) for an input with a url and
# a caption column and no extra columns: the input columns (caption, url, in the reader's column_list order), then
# its own fields.
def img2dataset_schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("caption", pa.string()),
            pa.field("url", pa.string()),
            pa.field("key", pa.string()),
            pa.field("status", pa.string()),
            pa.field("error_message", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("original_width", pa.int32()),
            pa.field("original_height", pa.int32()),
        ]
    )


def img2dataset_key(shard_id: int, index: int, number_sample_per_shard: int = 10_000, oom_shard_count: int = 5) -> str:
    """The sample key img2dataset gives row ``index`` of shard ``shard_id`` (downloader.py, ``compute_key``)."""
    oom_sample_per_shard = math.ceil(math.log10(number_sample_per_shard))
    return f"{10**oom_sample_per_shard * shard_id + index:0{oom_sample_per_shard + oom_shard_count}d}"


def write_img2dataset_shards(
    root: str | Path,
    shards: list[list[tuple[str, bytes | None, str | None]]],
    oom_shard_count: int = 5,
    encode_format: str = "jpg",
) -> list[dict]:
    """Write shards through img2dataset's ``WebDatasetSampleWriter`` (``writer.py``) as its downloader calls it:
    shard ``s`` is ``{s:05d}.tar`` and ``{s:05d}.parquet``, plus the ``{s:05d}_stats.json`` the downloader writes
    beside them. Each sample is ``(key, image bytes, caption)``; image ``None`` is a failed download (a row of the
    parquet, nothing in the tar). Images go in as given, as img2dataset passes them on with
    ``--disable_all_reencoding True`` (no decode, so undecodable bytes reach the tar). Returns the stats dicts."""
    writer = load_writer_module("img2dataset", "writer.py")
    Path(root).mkdir(parents=True, exist_ok=True)
    all_stats = []
    for shard_id, samples in enumerate(shards):
        start = time.time()
        sample_writer = writer.WebDatasetSampleWriter(
            shard_id, str(root), True, oom_shard_count, img2dataset_schema(), encode_format
        )
        status = Counter()
        successes = failed = 0
        for key, image, caption in samples:
            error = None if image is not None else "<urlopen error [Errno -2] Name or service not known>"
            meta = {
                "caption": caption,
                "url": f"https://example.invalid/{key}.{encode_format}",
                "key": key,
                "status": "success" if image is not None else "failed_to_download",
                "error_message": error,
                "width": None,
                "height": None,
                "original_width": None,
                "original_height": None,
            }
            if image is None:
                failed += 1
                status[error] += 1
            else:
                successes += 1
                status["success"] += 1
            sample_writer.write(image, key, caption, meta)
        sample_writer.close()
        end = time.time()
        # the fields and layout of img2dataset's logger.write_stats
        stats = {
            "count": len(samples),
            "successes": successes,
            "failed_to_download": failed,
            "failed_to_resize": 0,
            "duration": end - start,
            "start_time": start,
            "end_time": end,
            "status_dict": dict(status),
        }
        name = f"{shard_id:0{oom_shard_count}d}"
        (Path(root) / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
        all_stats.append(stats)
    return all_stats


def partitions(sizes: list[int | None]) -> tuple[list[slice | None], int]:
    """Row slices of consecutive partitions of the given sizes (None: an empty partition), and the total rows."""
    parts, start = [], 0
    for n in sizes:
        parts.append(None if n is None else slice(start, start + n))
        start += n or 0
    return parts, start
