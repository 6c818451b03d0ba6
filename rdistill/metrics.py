"""What a run measures about itself: per-step time and peak memory, throughput, progress bars on stderr."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)


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


DELAY_ENV = "RDISTILL_TASK_DELAY"
PHASE_ENV = "RDISTILL_PHASE_MARKS"


def phase_mark(name: str) -> None:
    """Testing hook: with ``RDISTILL_PHASE_MARKS=DIR`` in the driver's environment, an empty file named after each
    phase of a long step (``kmeans.img.lloyd_3-10``) appears in DIR as the phase starts, so a test can act at a
    known point (remove a node mid-k-means)."""
    folder = os.environ.get(PHASE_ENV)
    if folder:
        from pathlib import Path

        Path(folder, name.replace("/", "-").replace(" ", "_")).touch()


def delay(step: str) -> None:
    """Testing hook: with ``RDISTILL_TASK_DELAY=step:seconds[,step:seconds...]`` in a worker's environment, each task
    or actor call of that step sleeps first, so that a test can remove a node while they run."""
    for spec in os.environ.get(DELAY_ENV, "").split(","):
        name, _, seconds = spec.rpartition(":")
        if name == step:
            time.sleep(float(seconds))
