"""Small runtime helpers shared by the stages: atomic writes, per-step time and peak memory, progress bars."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from rdistill.errors import RunError

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
def atomic_path(path: str | Path):
    """Yields a temporary path beside ``path``; renamed over ``path`` when the block exits without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (since the last step reset where supported), MiB."""
    kb = _read_status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


class StepRecorder:
    """Records wall time and peak RSS of named steps: ``with rec.step("cluster"): ...``."""

    def __init__(self):
        self.steps: dict[str, dict] = {}

    @contextmanager
    def step(self, name: str):
        resettable = _reset_peak_rss()
        t0 = time.perf_counter()
        log.info("step %s: started", name)
        yield
        seconds = time.perf_counter() - t0
        self.steps[name] = {
            "seconds": round(seconds, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_is_per_step": resettable,
        }
        log.info("step %s: %.2f s, peak RSS %.0f MiB", name, seconds, self.steps[name]["peak_rss_mb"])


def progress(total: int, desc: str, enabled: bool, unit: str = "rows"):
    """A tqdm bar on stderr (or a no-op bar when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, file=sys.stderr, leave=False)


class RateMeter:
    """Throughput of a stream of batches at the driver, overall and *steady* (from the first batch's arrival on,
    so without the start-up of workers and models)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first: tuple[float, int] | None = None
        self.last, self.count = self.t0, 0

    def tick(self, n: int) -> None:
        self.last = time.perf_counter()
        self.count += n
        if self.first is None:
            self.first = (self.last, self.count)

    def steady(self) -> float | None:
        if self.first is None or self.last <= self.first[0]:
            return None
        return round((self.count - self.first[1]) / (self.last - self.first[0]), 3)


def claim_output(out: Path, run_file: str, record: dict, keys: tuple[str, ...], overwrite: bool, clear,
                 holds: str) -> None:  # fmt: skip
    """Make ``out`` a stage's output for the run described by ``record``: a previous run whose record agrees on
    ``keys`` is resumed; one that differs is refused (the message says ``out`` holds ``holds``) unless
    ``overwrite``, which first calls ``clear(out)``."""
    path = out / run_file
    if path.exists():
        previous = json.loads(path.read_text())
        if {k: previous.get(k) for k in keys} == {k: record[k] for k in keys}:
            return
        if not overwrite:
            raise RunError(f"{out} holds {holds}: pass --overwrite or choose another --output")
        clear(out)
    elif overwrite:
        clear(out)


def finished_summary(out: Path, run_file: str, this_run: dict, **fields) -> dict | None:
    """The saved summary of a complete stage output (``_SUCCESS``, run record), with ``this_run`` reporting no
    work; ``None`` when the output is not complete."""
    if not ((out / "_SUCCESS").exists() and (out / run_file).exists() and (out / "summary.json").exists()):
        return None
    log.info("%s is complete: nothing to do", out)
    return {**json.loads((out / "summary.json").read_text()), **fields, "this_run": this_run}


FAULT_ENV = "RDISTILL_FAULT_KILL_AFTER"


def fault_point(stage: str, units_done: int) -> None:
    """Testing hook: with ``RDISTILL_FAULT_KILL_AFTER=stage:N`` in the environment, the process SIGKILLs itself
    once ``stage`` has finished ``N`` units (parts, shards), to test resume after a hard kill at a known point."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{stage}:{units_done}":
        log.warning("%s=%s: killing this process", FAULT_ENV, spec)
        os.kill(os.getpid(), 9)
