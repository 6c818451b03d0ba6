"""From run curves to the table: epoch selection on val (or test), ties, mean and std over runs, the mean curve."""

import numpy as np
import pytest

from rdistill.algo.recall import KEYS
from rdistill.eval.table import select_epoch, summarize_runs


def _recalls(r_mean: float, offset: float) -> dict:
    """Every recall key a distinct number derived from ``offset``, with ``r_mean`` as given."""
    out = {k: offset + i for i, k in enumerate(KEYS) if k != "r_mean"}
    out["r_mean"] = float(r_mean)
    return out


def _run(seed: int, val: list[float], test: list[float], losses: list[float]) -> dict:
    curve = [
        {"epoch": 10 * i, "loss": loss, "val": _recalls(v, 100 * seed + i), "test": _recalls(t, 1000 * seed + 10 * i)}
        for i, (v, t, loss) in enumerate(zip(val, test, losses))
    ]
    return {"seed": seed, "curve": curve}


# run 1: best on val at epoch 10, best on test at epoch 20; run 2: val ties at epochs 0 and 10 (the first wins), the
# test numbers tie at epochs 10 and 20 (the first wins)
RUN1 = _run(1, val=[10.0, 30.0, 20.0], test=[15.0, 12.0, 40.0], losses=[3.0, 2.0, 1.0])
RUN2 = _run(2, val=[20.0, 20.0, 10.0], test=[1.0, 50.0, 50.0], losses=[5.0, 4.0, 3.0])


def test_select_epoch_picks_the_best_of_the_split_and_the_first_of_ties():
    assert select_epoch(RUN1["curve"], "val") == 1 and select_epoch(RUN1["curve"], "test") == 2
    assert select_epoch(RUN2["curve"], "val") == 0 and select_epoch(RUN2["curve"], "test") == 1
    with pytest.raises(ValueError):
        select_epoch([], "val")


def test_val_selection_reports_the_test_numbers_of_the_val_best_epoch():
    s = summarize_runs([RUN1, RUN2], "val")
    picked = [RUN1["curve"][1]["test"], RUN2["curve"][0]["test"]]  # epoch 10 of run 1, epoch 0 of run 2
    assert s["runs"] == 2 and s["epochs"] == [10, 0] and s["seeds"] == [1, 2]
    for k in KEYS:
        values = [p[k] for p in picked]
        assert s["test"][k] == pytest.approx(np.mean(values))
        assert s["test_std"][k] == pytest.approx(np.std(values))  # population std, as the authors' np.std
    assert s["test"]["r_mean"] == pytest.approx((12.0 + 1.0) / 2) and s["test_std"]["r_mean"] == pytest.approx(5.5)
    assert s["val"]["r_mean"] == pytest.approx((30.0 + 20.0) / 2)


def test_test_selection_picks_the_test_best_epoch():
    s = summarize_runs([RUN1, RUN2], "test")
    assert s["epochs"] == [20, 10]
    assert s["test"]["r_mean"] == pytest.approx((40.0 + 50.0) / 2) and s["test_std"]["r_mean"] == pytest.approx(5.0)
    assert s["test"]["IR@1"] == pytest.approx(
        (RUN1["curve"][2]["test"]["IR@1"] + RUN2["curve"][1]["test"]["IR@1"]) / 2
    )
    assert s["val"]["r_mean"] == pytest.approx((20.0 + 20.0) / 2)  # the val numbers of the test-selected epochs


def test_the_curve_is_the_mean_over_runs_per_evaluated_epoch():
    s = summarize_runs([RUN1, RUN2], "val")
    assert [p["epoch"] for p in s["curve"]] == [0, 10, 20]
    assert [p["loss"] for p in s["curve"]] == pytest.approx([4.0, 3.0, 2.0])
    assert [p["val"]["r_mean"] for p in s["curve"]] == pytest.approx([15.0, 25.0, 15.0])
    assert [p["test"]["r_mean"] for p in s["curve"]] == pytest.approx([8.0, 31.0, 45.0])
    one = summarize_runs([RUN1], "val")
    assert one["test_std"] == {k: 0.0 for k in KEYS} and one["test"] == RUN1["curve"][1]["test"]
