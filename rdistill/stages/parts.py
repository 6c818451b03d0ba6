"""The part assembler both model stages share: rows come back from an actor pool in any grouping, are gathered
per unit of output (a store part, a distilled shard), and a unit is written once every one of its rows is there.

Writing a unit is: its files published atomically (data fsynced, renamed, directory fsynced), then its done-marker.
A run killed in between leaves no marker, so a rerun redoes that unit; the driver only ever holds the rows of the
units still open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from rdistill.io.outputs import DoneMarkers, fault_point
from rdistill.metrics import RateMeter

log = logging.getLogger(__name__)


class PartAssembler:
    """Gathers rows per unit and writes complete units.

    ``write(unit, cols) -> record`` publishes the unit's files from ``cols`` (column name -> array, rows in
    ``pos`` order) and returns the record its done-marker keeps. A unit is complete when ``expected[unit]`` rows
    have arrived, ``expected`` being given up front (``expected``) or when the producer ends the unit (:meth:`end`).
    """

    def __init__(self, stage: str, markers: DoneMarkers, write: Callable[[int, dict], dict], what: Callable,
                 expected: dict[int, int] | None = None):  # fmt: skip
        self.stage, self.markers, self.write, self.what = stage, markers, write, what
        self.expected = dict(expected or {})
        self.open: dict[int, list[dict]] = {}
        self.done: list[dict] = []
        self.failed: list[str] = []
        self.rate = RateMeter()
        self.rows = 0

    def add(self, unit: int, cols: dict) -> None:
        """Rows of ``unit``: ``cols`` maps column names to arrays of equal length, ``pos`` the rows' places."""
        n = len(cols["pos"])
        self.open.setdefault(unit, []).append(cols)
        self.rate.tick(n)
        self._complete(unit)

    def end(self, unit: int, rows: int, error: str = "") -> None:
        """The producer of ``unit`` finished it with ``rows`` rows, or failed with ``error`` (then the unit's rows
        are dropped and the failure is kept for the run's error)."""
        if error:
            self.open.pop(unit, None)
            self.failed.append(error)
            log.error("%s %s: %s", self.stage, self.what(unit), error)
            return
        self.expected[unit] = rows
        self.open.setdefault(unit, [])
        self._complete(unit)

    def _complete(self, unit: int) -> None:
        expected = self.expected.get(unit)
        blocks = self.open.get(unit, [])
        if expected is None or sum(len(b["pos"]) for b in blocks) < expected:
            return
        del self.open[unit]
        cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {"pos": np.zeros(0, int)}
        order = np.argsort(cols["pos"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        if not np.array_equal(cols["pos"], np.arange(expected)):
            raise RuntimeError(f"{self.what(unit)}: {len(cols['pos'])} rows for {expected}, with gaps or duplicates")
        record = self.write(unit, cols)
        fault_point(f"{self.stage}.published", len(self.done) + 1)
        self.markers.mark(unit, record)
        self.done.append(record)
        self.rows += expected
        fault_point(self.stage, len(self.done))
