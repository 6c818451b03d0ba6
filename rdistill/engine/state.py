"""What each pass of the prototype engine hands to the next: plain dataclasses of arrays, O(M·d) plus a few bytes
per row of the k-means sample (its vectors stay in the tasks' spills), never O(N) (per-row data is spilled to disk,
by the tasks of :mod:`rdistill.engine.tasks`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rdistill.algo.cells import CellPlan
from rdistill.algo.kmeans import KMeansStats
from rdistill.algo.matching import Contingency, Matching
from rdistill.algo.prune import PruneCut


@dataclass
class Scanned:
    """Pass 1. The over-drawn k-means sample, in part order: ``sample_sims`` (s,) float32 pair cosines (NaN:
    invalid row), ``sample_rows`` (s,) int64 global row ids, ``sample_parts`` (s,) int32 the part whose spill
    holds each row (its vectors stay there: ``sample_img_{part}.npy``, ``sample_txt_{part}.npy``)."""

    invalid_per_part: dict[str, int]
    n_invalid: int
    n_valid: int
    sample_target: int
    sample_sims: np.ndarray
    sample_rows: np.ndarray
    sample_parts: np.ndarray


@dataclass
class Pruned:
    """The exact prune cut and the k-means sample restricted to kept pairs: ``sample`` (s,) int64 indices into
    the scan's over-drawn sample, increasing."""

    cut: PruneCut
    n_kept: int
    sample: np.ndarray


@dataclass
class Clusters:
    """Per-modality k-means: (M, d) float32 centroids and the fit's statistics."""

    img_centroids: np.ndarray
    txt_centroids: np.ndarray
    img_stats: KMeansStats
    txt_stats: KMeansStats
    sample_size: int


@dataclass
class Assigned:
    """Pass 2: the sparse M x M table of shared pairs and the (M,) int64 cluster sizes of kept pairs."""

    contingency: Contingency
    img_sizes: np.ndarray
    txt_sizes: np.ndarray


@dataclass
class Matched:
    matching: Matching
    plan: CellPlan
    contingency_cells: int  # non-zero cells of the contingency table it was solved on
    contingency_bytes: int = 0  # what the driver held of it (sparse: int64 codes and int32 counts per cell)


@dataclass
class Prototypes:
    """Pass 3, one row per planned cell: (P, d) float32 prototypes, (P,) mean raw norms of the shared pairs (NaN
    for pairless cells), (P,) int64 shared-pair counts and (P,) float32 alignment (cosine of the two)."""

    img: np.ndarray
    txt: np.ndarray
    img_norms: np.ndarray
    txt_norms: np.ndarray
    shared: np.ndarray
    alignment: np.ndarray


@dataclass
class Captions:
    """Pass 4: each text prototype's nearest real caption: (P,) int64 global row (-1: none), (P,) float32
    cosine, and the row's key and caption text."""

    rows: np.ndarray
    similarity: np.ndarray
    keys: list[str]
    texts: list[str]
