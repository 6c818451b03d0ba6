import numpy as np
import pytest

from rdistill.stages.report import svg_histogram
from rdistill.stages.synthesize.worker import DecoderError, check_dim, condition, fill_norms, image_seed


def test_condition_rescales_directions_to_the_recorded_or_fixed_norm():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(5, 8)).astype(np.float32) * 0.3  # means of unit vectors: norms below 1
    norms = np.array([10.0, 12.0, 9.0, 11.0, 15.0], np.float32)
    out = condition(protos, norms)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), norms, rtol=1e-5)
    cos = (out * protos).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(protos, axis=1)
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)  # direction kept
    fixed = condition(protos, norms, fixed_norm=20.0)
    np.testing.assert_allclose(np.linalg.norm(fixed, axis=1), 20.0, rtol=1e-5)


def test_image_seeds_are_per_prototype_and_per_run():
    seeds = [image_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert image_seed(0, 5) == image_seed(0, 5)
    assert image_seed(1, 0) != image_seed(0, 1)  # not seed + id: neighbouring runs share no image


def test_dimension_check_names_both_dimensions():
    check_dim(64, "m", 64)
    with pytest.raises(DecoderError, match="prototypes are 512-d but decoder m takes 768-d"):
        check_dim(512, "m", 768)


def test_svg_histogram_counts_every_value_once():
    a, b = np.arange(10) / 10, np.array([0.05, 0.95])
    svg = svg_histogram({"shared": a, "pairless": b}, 5, "t", "x")
    assert svg.startswith("<svg") and "shared (10)" in svg and "pairless (2)" in svg
    assert "no data" in svg_histogram({"x": np.array([])}, 5, "empty", "x")


def test_pairless_prototypes_without_a_recorded_norm_get_the_median():
    norms, filled = fill_norms(np.array([10.0, np.nan, 14.0, 12.0, 0.0], np.float32))
    assert filled == 2 and np.isfinite(norms).all()
    np.testing.assert_allclose(norms, [10.0, 12.0, 14.0, 12.0, 12.0])
    with pytest.raises(DecoderError, match="set synthesize.image_norm"):
        fill_norms(np.array([np.nan, np.nan]))
