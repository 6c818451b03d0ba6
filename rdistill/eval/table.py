"""From runs to the recall table: epoch selection, mean and std over runs, the mean curve. Pure functions.

Selection on ``val`` reads only the val numbers of a run's curve (the test numbers of the chosen pass are then
reported); ``test`` reproduces the reference code, which keeps the best pass on the test split itself.
"""

from __future__ import annotations

import numpy as np

from rdistill.algo.recall import KEYS


def select_epoch(curve: list[dict], select: str) -> int:
    """Index into ``curve`` of the pass with the highest ``curve[i][select]["r_mean"]`` (the first of equals)."""
    if not curve:
        raise ValueError("a run without evaluated passes")
    scores = [point[select]["r_mean"] for point in curve]
    return int(np.argmax(scores))


def _mean(dicts: list[dict]) -> dict:
    return {k: float(np.mean([d[k] for d in dicts])) for k in KEYS}


def _std(dicts: list[dict]) -> dict:
    # population std (numpy's default), as the authors' np.std over their 5 runs
    return {k: float(np.std([d[k] for d in dicts])) for k in KEYS}


def summarize_runs(results: list[dict], select: str) -> dict:
    """Runs of one (set, student, protocol) -> ``runs``, ``test`` / ``test_std`` (mean and std of the runs' test
    recalls at their selected passes), ``val`` (the same for val, when present), ``epochs`` (the selected pass of
    each run) and ``curve`` (per evaluated pass, the runs' mean ``val`` and ``test`` recalls and loss)."""
    picks = [select_epoch(r["curve"], select) for r in results]
    chosen = [r["curve"][i] for r, i in zip(results, picks)]
    out = {
        "runs": len(results),
        "test": _mean([c["test"] for c in chosen]),
        "test_std": _std([c["test"] for c in chosen]),
        "epochs": [int(c["epoch"]) for c in chosen],
        "seeds": [int(r["seed"]) for r in results],
    }
    if all("val" in c for c in chosen):
        out["val"] = _mean([c["val"] for c in chosen])
    curve = []
    for k, point in enumerate(results[0]["curve"]):
        row = {"epoch": int(point["epoch"]), "loss": float(np.mean([r["curve"][k]["loss"] for r in results]))}
        for split in ("val", "test"):
            if split in point:
                row[split] = _mean([r["curve"][k][split] for r in results])
        curve.append(row)
    out["curve"] = curve
    return out
