"""Writing outputs safely: atomic files, done-markers, run records that notice changed input, and an output lock.

* Every file is written to a temporary name beside its target, its data fsynced, renamed over the target, and
  the directory fsynced; a done-marker is written the same way only after the files it vouches for, so after a
  crash a marker never vouches for a truncated file. Files get the process umask's mode (0644 under the usual
  umask 022), as ``open`` would give them: colleagues, web servers and pods running as other users can read them.
* A stage records its input's fingerprint and its result-defining config in a run record (``embed.json``,
  ``prototypes.json``, ``synthesize.json``). A rerun with the same record resumes; one whose input or config
  changed is refused with a message naming what changed, unless ``--overwrite`` (then it is recomputed).
* :func:`lock_output` takes an exclusive ``flock`` on the output directory for the whole run: a second driver on
  the same output stops with a message instead of deleting the first one's work. The kernel releases the lock
  when a process dies, so a killed run can be resumed at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from rdistill.errors import RunError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
DONE = "_done"
LOCK = ".rdistill.lock"
FAULT_ENV = "RDISTILL_FAULT_KILL_AFTER"


def umask() -> int:
    """The process umask, read without changing it (``/proc``), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move a fully written temporary file into place: fsync its data, give it the umask's mode, rename it over
    ``path``, fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside ``path``; published over ``path`` (:func:`publish`) when the block exits
    without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then :func:`publish` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextmanager
def lock_output(out: str | Path):
    """Hold an exclusive lock on the output directory ``out`` (created if needed) while the block runs; a second
    holder gets a :class:`RunError` naming the first one's pid and host."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(
            f"{out} is in use by another rdistill run ({holder}): wait for it to finish, or choose another --output"
        ) from None
    except OSError as e:  # a filesystem without flock support
        os.close(fd)
        raise RunError(f"{out}: cannot lock the output directory ({e.strerror}); choose an --output on a local or "
                       "NFS filesystem") from None  # fmt: skip
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def clear_output(out: Path, dirs: Iterable[str], files: Iterable[str]) -> None:
    """Remove a stage's outputs (the named folders and files of ``out``), never the lock."""
    for name in dirs:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in files:
        (out / name).unlink(missing_ok=True)


class DoneMarkers:
    """One done-marker per unit of work (a part, a shard) in ``OUT/_done/{prefix}_{i}.json``. A unit counts as
    done only when its marker exists and so do the files it vouches for."""

    def __init__(self, out: Path, prefix: str):
        self.dir, self.prefix = out / DONE, prefix

    def path(self, i: int) -> Path:
        return self.dir / f"{self.prefix}_{i}.json"

    def load(self, units: Iterable[int], files: Callable[[int], Iterable[Path]]) -> dict[int, dict]:
        done = {}
        for i in units:
            path = self.path(i)
            if path.exists() and all(f.exists() for f in files(i)):
                done[i] = json.loads(path.read_text())
        return done

    def mark(self, i: int, record: dict) -> None:
        atomic_write_json(self.path(i), record)


_FILE_KEYS = {"size", "version"}


def _flatten(obj, prefix: str = "") -> dict:
    """Nested dicts -> ``{"a.b": leaf}``; a file's ``{"size", "version"}`` is one leaf."""
    if isinstance(obj, dict) and obj and not set(obj) <= _FILE_KEYS:
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _change(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict) and set(old) | set(new) <= _FILE_KEYS:
        size, mtime = f"{old.get('size')} -> {new.get('size')}", f"{old.get('version')} -> {new.get('version')}"
        return f"rewritten (size {size}, version {mtime})"
    return f"{old!r} -> {new!r}"


def describe_changes(previous: dict, record: dict, keys: Iterable[str], limit: int = 3) -> str:
    """What differs between two run records on ``keys``, e.g. ``config prune.ratio: 0.2 -> 0.3`` or ``input
    img_emb/img_emb_3.npy: rewritten (...)`` (a file's version is its mtime_ns, or its ETag on object stores);
    empty when nothing does."""
    per_key = []
    for key in keys:
        old, new = _flatten(previous.get(key)), _flatten(record.get(key))
        changes = []
        for name in sorted(set(old) | set(new), key=str):
            if old.get(name) != new.get(name):
                what = "added" if name not in old else "removed" if name not in new else _change(old[name], new[name])
                changes.append(f"{key} {name}: {what}" if name else f"{key}: {what}")
        per_key.append(changes)
    firsts = [c[0] for c in per_key if c]  # every changed key is named, then more detail up to ``limit``
    rest = [x for c in per_key for x in c[1:]]
    shown = firsts + rest[: max(limit - len(firsts), 0)]
    more = sum(map(len, per_key)) - len(shown)
    return "; ".join(shown) + (f" (and {more} more)" if more else "")


RECORD_FORMAT = 2  # run records before it (rdistill <= 0.1.0 at 176d2b7) held no fingerprint of their input


def has_finished_work(out: Path, protect: tuple[str, ...] = ()) -> bool:
    """Whether ``out`` holds finished work worth protecting: its ``_SUCCESS``, any done-marker, or a file matching
    one of the ``protect`` patterns (relative to ``out``: e.g. the prototype engine's finished k-means)."""
    return (
        (out / SUCCESS).exists()
        or any((out / DONE).glob("*.json"))
        or any(any(out.glob(pattern)) for pattern in protect)
    )


def claim_output(out: Path, run_file: str, record: dict, keys: tuple[str, ...], overwrite: bool,
                 clear: Callable[[Path], None], holds: str, protect: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Make ``out`` the output of the run described by ``record`` (which gets ``format``). The rule every stage
    follows:

    * a previous run whose record agrees on ``keys`` (input fingerprint, result-defining config, ...) is resumed,
      and skipped when finished, with or without ``overwrite``;
    * one that differs is refused with a message naming what changed (``out`` holds ``holds``), unless
      ``overwrite``, which first calls ``clear(out)`` so the result is recomputed from the new input;
    * a previous run that finished nothing (it failed before its first part, or before any of the ``protect``
      files: :func:`has_finished_work`) protects nothing: it is cleared;
    * finished work without a record of this format (an older rdistill, another tool) is refused unless
      ``overwrite``: what it was made from cannot be compared.
    """
    record["format"] = RECORD_FORMAT
    path = out / run_file
    work = has_finished_work(out, protect)
    previous = None
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
    if previous is not None and previous.get("format") == RECORD_FORMAT:
        changed = describe_changes(previous, record, keys)
        if not changed:
            return
        if work and not overwrite:
            raise RunError(f"{out} holds {holds}; changed since: {changed}; pass --overwrite to recompute, or "
                           "choose another --output")  # fmt: skip
        log.warning("%s: %s, since %s", out, "recomputing" if work else "starting over (nothing finished)", changed)
        clear(out)
    elif work:
        if not overwrite:
            raise RunError(
                f"{out} holds finished output without a run record of this rdistill version ({run_file}; written "
                "by an older rdistill or another tool), so what it was made from cannot be compared: pass "
                "--overwrite to recompute it, or choose another --output"
            )
        clear(out)
    elif overwrite or previous is not None:
        clear(out)


def require_finished(upstream: str, finished: bool, what: str, allow_incomplete: bool) -> bool:
    """Refuse an upstream output of ours that has not finished (``what`` says what is missing), unless
    ``allow_incomplete``; returns whether it is taken incomplete."""
    if finished:
        return False
    if not allow_incomplete:
        raise RunError(f"{upstream}: {what}: finish that run first, or pass --allow-incomplete to take it as it is")
    log.warning("%s: %s; taken as it is (--allow-incomplete)", upstream, what)
    return True


def finished_summary(out: Path, run_file: str, this_run: dict, **fields) -> dict | None:
    """The saved summary of a complete stage output (``_SUCCESS``, run record), with ``this_run`` reporting no
    work; ``None`` when the output is not complete."""
    if not ((out / SUCCESS).exists() and (out / run_file).exists() and (out / "summary.json").exists()):
        return None
    log.info("%s is complete: nothing to do", out)
    return {**json.loads((out / "summary.json").read_text()), **fields, "this_run": this_run}


def fault_point(stage: str, units_done: int) -> None:
    """Testing hook: with ``RDISTILL_FAULT_KILL_AFTER=stage:N`` in the environment, the process SIGKILLs itself
    once ``stage`` has finished ``N`` units (parts, shards), to test resume after a hard kill at a known point.
    ``stage.published:N`` kills after the N-th unit's files are in place but before its done-marker."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{stage}:{units_done}":
        log.warning("%s=%s: killing this process", FAULT_ENV, spec)
        os.kill(os.getpid(), 9)
