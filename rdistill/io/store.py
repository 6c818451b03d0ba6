"""The embedding store in the clip-retrieval / LAION layout, read in bounded blocks.

Layout under a root (local path or any fsspec URL)::

    img_emb/img_emb_{i}.npy       (n_i, d) float16 or float32
    text_emb/text_emb_{i}.npy     (n_i, d) float16 or float32, row-aligned with img_emb_{i}
    metadata/metadata_{i}.parquet n_i rows, at least a key and a caption column

as clip-retrieval's writer and LAION's published embeddings have it: ``{i}`` zero-padded to any width, with gaps
where a partition came out empty, and metadata columns ``image_path``, ``caption`` and whatever the samples'
JSON held (``key``, ``url``, ...). Parts with no rows are skipped and listed in ``empty_parts``.

Opening checks everything that can be checked from headers (parts present in all three folders, row counts,
dimensions, dtypes, metadata columns) and raises :class:`StoreError` naming the file. Reading seeks into each
``.npy`` so that only one block per modality is in memory at a time, whatever N is.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import fsspec
import numpy as np
import pyarrow.parquet as pq

from rdistill.errors import InputError
from rdistill.io.fingerprint import file_version
from rdistill.io.rowpool import to_float32

log = logging.getLogger(__name__)

_FOLDERS = {"img": ("img_emb", "img_emb_"), "txt": ("text_emb", "text_emb_"), "meta": ("metadata", "metadata_")}
_SUFFIX = {"img": ".npy", "txt": ".npy", "meta": ".parquet"}
KEY_COLUMNS = ("key", "image_path")  # ours and img2dataset's, then clip-retrieval's own name
CAPTION_COLUMNS = ("caption", "text")


class StoreError(InputError, ValueError):
    """An embedding store that cannot be read as asked; the message names the file."""


@dataclass(frozen=True)
class NpyPart:
    path: str
    rows: int
    dim: int
    dtype: np.dtype
    offset: int  # byte offset of the data


@dataclass(frozen=True)
class Part:
    index: int
    start: int  # global row id of the first row
    rows: int
    img: NpyPart
    txt: NpyPart
    metadata: str


@dataclass
class Block:
    """Global rows [start, start + n), rows [offset, offset + n) of part ``part``. img/txt: (n, d) float32 (raw, as
    stored) or None if not requested."""

    part: int
    start: int
    offset: int
    img: np.ndarray | None
    txt: np.ndarray | None
    img_norm: np.ndarray | None = None  # raw row norms, once a consumer has normalised img in place
    txt_norm: np.ndarray | None = None

    @cached_property
    def rows(self) -> np.ndarray:
        n = (self.img if self.img is not None else self.txt).shape[0]
        return np.arange(self.start, self.start + n, dtype=np.int64)


class BlockBuffers:
    """Reused memory for streamed blocks: per name, a raw byte buffer (what the file holds) and a float32 one.
    Fresh memory for every block costs page faults (the kernel zeroes each page on first touch; on this project's
    VMs a 200 MB block's conversion took 2.3x as long into fresh memory as into reused), and blocks are consumed
    one at a time."""

    def __init__(self):
        self._raw: dict[str, np.ndarray] = {}
        self._rows: dict[str, np.ndarray] = {}

    def raw(self, name: str, nbytes: int) -> memoryview:
        b = self._raw.get(name)
        if b is None or b.size < nbytes:
            b = self._raw[name] = np.empty(nbytes, dtype=np.uint8)
        return memoryview(b)[:nbytes]

    def rows(self, name: str, n: int, dim: int) -> np.ndarray:
        b = self._rows.get(name)
        if b is None or b.size < n * dim:
            b = self._rows[name] = np.empty(n * dim, dtype=np.float32)
        return b[: n * dim].reshape(n, dim)


def _read_into(f, view: memoryview) -> int:
    """Fill ``view`` from ``f`` (``readinto`` may return short counts before the end); bytes read."""
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return got


def _read_npy_header(fs, path: str) -> NpyPart:
    try:
        with fs.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            offset = f.tell()
    except FileNotFoundError:
        raise StoreError(f"{path}: file not found") from None
    except (ValueError, OSError) as e:
        raise StoreError(f"{path}: not a readable .npy file ({e})") from None
    if len(shape) != 2:
        raise StoreError(f"{path}: expected a 2-d array (rows, dim), got shape {shape}")
    if fortran:
        raise StoreError(f"{path}: Fortran-ordered arrays are not supported; save with np.save of a C-ordered array")
    if dtype not in (np.float16, np.float32):
        raise StoreError(f"{path}: dtype {dtype} not supported (float16 or float32)")
    return NpyPart(path, int(shape[0]), int(shape[1]), np.dtype(dtype), offset)


class EmbeddingStore:
    """A validated embedding store. ``parts`` lists the non-empty parts in index order; ``num_rows`` and ``dim``
    are global; ``empty_parts`` names the parts that hold no rows (skipped).

    Part files are matched by their number whatever its zero padding (``img_emb_7.npy``, ``img_emb_0007.npy``), and
    numbers may have gaps (clip-retrieval writes nothing for an empty partition). ``key_column`` and
    ``caption_column`` name the metadata columns; empty: the first of :data:`KEY_COLUMNS` / :data:`CAPTION_COLUMNS`
    that the metadata has. ``only``: read just these part numbers.
    """

    def __init__(self, url: str, key_column: str = "", caption_column: str = "", only: set[int] | None = None):
        self.url = str(url)
        self.only = only  # read only these part numbers (the finished parts of an unfinished embedding run)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        if not self.fs.exists(self.root):
            raise StoreError(f"{self.url}: embedding store not found")
        files = {name: self._list(name) for name in _FOLDERS}
        every = set().union(*files.values())
        if not every:
            raise StoreError(
                f"{self.url}: no parts found (expected img_emb/img_emb_N.npy, text_emb/text_emb_N.npy and "
                "metadata/metadata_N.parquet)"
            )
        for name, (sub, prefix) in _FOLDERS.items():
            missing = sorted(every - set(files[name]))
            if missing:
                i = missing[0]
                other = next(files[o][i] for o in _FOLDERS if i in files[o])
                digits = re.search(r"_(\d+)\.\w+$", other["name"]).group(1)
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise StoreError(
                    f"{self.root}/{sub}/{prefix}{digits}{_SUFFIX[name]}: missing (part {i} is in "
                    f"{other['name']}){more}"
                )
        self.files = files
        self.parts: list[Part] = []
        self.empty_parts: list[str] = []
        self.key_column, self.caption_column = key_column, caption_column
        start = 0
        for i in sorted(every):
            img = _read_npy_header(self.fs, files["img"][i]["name"])
            txt = _read_npy_header(self.fs, files["txt"][i]["name"])
            meta = files["meta"][i]["name"]
            if img.rows != txt.rows:
                raise StoreError(f"{txt.path}: {txt.rows} rows but {img.path} has {img.rows}")
            meta_rows, columns = self._metadata_header(meta)
            if meta_rows != img.rows:
                raise StoreError(f"{meta}: {meta_rows} rows but {img.path} has {img.rows}")
            if img.rows == 0:
                self.empty_parts.append(img.path)
                continue
            self._check_columns(meta, columns)
            self.parts.append(Part(i, start, img.rows, img, txt, meta))
            start += img.rows
        if self.empty_parts:
            log.info("%s: %d empty parts skipped", self.url, len(self.empty_parts))
        if not self.parts:
            raise StoreError(f"{self.url}: the store holds no rows (all {len(self.empty_parts)} parts are empty)")
        self.num_rows = start
        first = self.parts[0]
        self.dim = first.img.dim
        for p in self.parts:
            for arr in (p.img, p.txt):
                if arr.dim != self.dim:
                    raise StoreError(f"{arr.path}: dimension {arr.dim}, but {first.img.path} has {self.dim}")
        self.dtype = str(first.img.dtype)

    def _list(self, name: str) -> dict[int, dict]:
        """Part number -> fsspec info of the files of one folder, whatever the zero padding of the numbers."""
        sub, prefix = _FOLDERS[name]
        regex = re.compile("^" + re.escape(prefix) + r"(\d+)" + re.escape(_SUFFIX[name]) + "$")
        try:
            listing = self.fs.ls(f"{self.root}/{sub}", detail=True)
        except FileNotFoundError:
            return {}
        found: dict[int, dict] = {}
        for info in listing:
            m = regex.match(info["name"].rstrip("/").rsplit("/", 1)[-1])
            if m is None or info.get("type") == "directory":
                continue
            i = int(m.group(1))
            if self.only is not None and i not in self.only:
                continue
            if i in found:
                raise StoreError(f"{info['name']}: part {i} appears twice (also {found[i]['name']})")
            found[i] = info
        return found

    def _metadata_header(self, path: str) -> tuple[int, list[str]]:
        try:
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                return pf.metadata.num_rows, list(pf.schema_arrow.names)
        except Exception as e:  # pyarrow raises several types for a corrupt footer
            raise StoreError(f"{path}: not a readable parquet file ({e})") from None

    def _check_columns(self, path: str, names: list[str]) -> None:
        """Fix the key and caption columns on the first non-empty part (auto-detected when not configured) and
        check every part has them."""
        for attr, candidates, key in (("key_column", KEY_COLUMNS, "embeddings.key_column"),
                                      ("caption_column", CAPTION_COLUMNS, "embeddings.caption_column")):  # fmt: skip
            col = getattr(self, attr)
            if not col:
                col = next((c for c in candidates if c in names), "")
                if not col:
                    raise StoreError(
                        f"{path}: none of the columns {', '.join(candidates)} (columns: {', '.join(names)}); set {key}"
                    )
                setattr(self, attr, col)
            elif col not in names:
                raise StoreError(f"{path}: no column {col!r} (columns: {', '.join(sorted(names))})")

    def fingerprint(self) -> dict[str, dict]:
        """``relative path -> {"size", "version"}`` of every part file (empty parts included): what a rerun
        compares to notice a store rewritten in place. ``version`` is ``mtime_ns`` for local files, else the
        backend's modification time or ETag."""
        out = {}
        for name in _FOLDERS:
            for i in sorted(self.files[name]):
                info = self.files[name][i]
                rel = info["name"][len(self.root) + 1 :]
                out[rel] = {"size": int(info.get("size") or 0), "version": file_version(self.fs, info)}
        return out

    def _read_rows(self, arr: NpyPart, r0: int, r1: int, buf: BlockBuffers | None = None,
                   name: str = "") -> np.ndarray:  # fmt: skip
        """Rows [r0, r1) of ``arr`` as float32: a new array, or with ``buf`` a view of its reused buffer ``name``
        (read with ``readinto`` where the file object has it, converted on this process's cores)."""
        row_bytes = arr.dim * arr.dtype.itemsize
        n = r1 - r0
        raw = buf.raw(name, n * row_bytes) if buf is not None else None
        with self.fs.open(arr.path, "rb") as f:
            f.seek(arr.offset + r0 * row_bytes)
            if raw is not None and hasattr(f, "readinto"):
                got = _read_into(f, raw)
                data = raw[:got]
            else:
                data = f.read(n * row_bytes)
                got = len(data)
        if got != n * row_bytes:
            raise StoreError(f"{arr.path}: truncated (header says {arr.rows} rows, data ends before row {r1})")
        src = np.frombuffer(data, dtype=arr.dtype).reshape(n, arr.dim)
        out = buf.rows(name, n, arr.dim) if buf is not None else np.empty((n, arr.dim), dtype=np.float32)
        return to_float32(src, out)

    def part_blocks(self, p: Part, block_rows: int, *, img: bool = True, txt: bool = True,
                    buffers: BlockBuffers | None = None) -> Iterator[Block]:  # fmt: skip
        """The blocks of one part, in row order. With ``buffers`` each block's arrays are views of buffers reused
        for the next block (no fresh memory per block: a consumer that keeps a block must copy it)."""
        for r0 in range(0, p.rows, block_rows):
            r1 = min(r0 + block_rows, p.rows)
            yield Block(
                p.index,
                p.start + r0,
                r0,
                self._read_rows(p.img, r0, r1, buffers, "img") if img else None,
                self._read_rows(p.txt, r0, r1, buffers, "txt") if txt else None,
            )

    def _blocks(self, block_rows: int, img: bool, txt: bool) -> Iterator[Block]:
        for p in self.parts:
            yield from self.part_blocks(p, block_rows, img=img, txt=txt)

    def iter_blocks(self, block_rows: int = 65536, *, img: bool = True, txt: bool = True, prefetch: int = 2):
        """Blocks in global row order. A reader thread keeps up to ``prefetch`` blocks ready, so reading overlaps
        the caller's compute; memory is ``prefetch + 1`` blocks."""
        if prefetch <= 0:
            yield from self._blocks(block_rows, img, txt)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def work():
            try:
                for b in self._blocks(block_rows, img, txt):
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="store-prefetch")
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def lookup(self, rows: np.ndarray) -> tuple[list[str], list[str]]:
        """Keys and captions of the given global row ids (any order). Reads two columns of the parts concerned."""
        rows = np.asarray(rows, dtype=np.int64)
        keys: list = [None] * rows.size
        caps: list = [None] * rows.size
        starts = np.array([p.start for p in self.parts])
        part_of = np.searchsorted(starts, rows, side="right") - 1
        for pi in np.unique(part_of):
            p = self.parts[pi]
            sel = np.flatnonzero(part_of == pi)
            with self.fs.open(p.metadata, "rb") as f:
                table = pq.read_table(f, columns=[self.key_column, self.caption_column])
            local = table.take(rows[sel] - p.start).to_pydict()
            for s, k, c in zip(sel, local[self.key_column], local[self.caption_column]):
                keys[s] = "" if k is None else str(k)
                caps[s] = "" if c is None else str(c)
        return keys, caps
