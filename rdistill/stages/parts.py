"""Units of output (a store part, a distilled shard) and how the model stages complete them.

Writing a unit is: its files published atomically (data fsynced, renamed, directory fsynced), then its done-marker.
A run killed in between leaves no marker, so a rerun redoes that unit. Two ways to get there:

* :class:`PartAssembler` (synthesis): rows come back from an actor pool to the driver in any grouping, are
  gathered per unit, and the driver writes a unit once every one of its rows is there; the driver only ever holds
  the rows of the units still open.
* :class:`FragmentLedger` (embedding): the actors write their rows to staged fragment files themselves and send
  the driver only ``(unit, first row, rows)``; once a unit's fragments tile it, a worker task turns them into the
  unit's files and the driver writes the marker (:func:`mark_unit`). The rows never travel to the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from rdistill.io.outputs import DoneMarkers, fault_point
from rdistill.metrics import RateMeter

log = logging.getLogger(__name__)


def mark_unit(stage: str, markers: DoneMarkers, unit: int, record: dict, done: list[dict]) -> None:
    """Record that ``unit``'s files are published: its done-marker, then ``record`` appended to ``done``. The
    fault points of ``RDISTILL_FAULT_KILL_AFTER`` sit on either side of the marker."""
    fault_point(f"{stage}.published", len(done) + 1)
    markers.mark(unit, record)
    done.append(record)
    fault_point(stage, len(done))


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
        mark_unit(self.stage, self.markers, unit, record, self.done)
        self.rows += expected


class FragmentLedger:
    """What the driver knows of units whose rows workers staged as fragments: per unit, the fragments as
    ``{first row: rows}`` and, once the producer ended the unit, its row count.

    A unit is complete when its fragments tile ``0 .. rows`` exactly. The same fragment reported twice (a retried
    batch rewrites the same file) counts once; fragments that overlap or leave gaps are a bug, reported by name.
    """

    def __init__(self, what: Callable[[int], str]):
        self.what = what
        self.fragments: dict[int, dict[int, int]] = {}
        self.expected: dict[int, int] = {}
        self.closed: set[int] = set()
        self.rate = RateMeter()

    @property
    def open(self) -> set[int]:
        """Units with fragments or an end but not yet complete (nor failed)."""
        return (set(self.fragments) | set(self.expected)) - self.closed

    def add(self, unit: int, first: int, rows: int) -> bool:
        """A fragment of ``rows`` rows from row ``first`` of ``unit`` is staged; returns whether ``unit`` is now
        complete."""
        if unit in self.closed:
            return False
        self.fragments.setdefault(unit, {})[first] = rows
        self.rate.tick(rows)
        return self._complete(unit)

    def end(self, unit: int, rows: int) -> bool:
        """The producer ended ``unit`` with ``rows`` rows; returns whether ``unit`` is now complete."""
        self.expected[unit] = rows
        return self._complete(unit)

    def fail(self, unit: int) -> None:
        """Forget ``unit`` (its producer failed): later fragments of it are ignored."""
        self.closed.add(unit)
        self.fragments.pop(unit, None)

    def _complete(self, unit: int) -> bool:
        expected = self.expected.get(unit)
        frags = self.fragments.get(unit, {})
        if expected is None or unit in self.closed or sum(frags.values()) < expected:
            return False
        starts = sorted(frags)
        ends = [s + frags[s] for s in starts]
        if starts[:1] not in ([0], []) or starts[1:] != ends[:-1] or (ends[-1] if ends else 0) != expected:
            raise RuntimeError(f"{self.what(unit)}: fragments {[(s, frags[s]) for s in starts]} do not tile "
                               f"its {expected} rows: gaps or duplicates")  # fmt: skip
        return True

    def pop(self, unit: int) -> list[int]:
        """The first rows of a complete unit's fragments, in order; the unit is closed."""
        self.closed.add(unit)
        return sorted(self.fragments.pop(unit, {}))
