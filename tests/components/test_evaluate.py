import numpy as np
import pytest

from dalle_pipeline.components.evaluate.run import frechet_distance


def test_identical_sets_are_at_distance_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(200_000, 3))
    b = rng.normal(1.0, 2.0, size=(200_000, 3))
    # |mu1 - mu2|^2 + sum(s1^2 + s2^2 - 2 s1 s2) = 3 + 3 * (1 + 4 - 4) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.02)


def test_small_sample_gives_a_real_number_and_a_warning():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="rank-deficient"):
        value = frechet_distance(rng.normal(size=(5, 64)), rng.normal(size=(4, 64)))
    assert np.isfinite(value) and value > 0


def test_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 generated"):
        frechet_distance(np.zeros((10, 4)), np.zeros((1, 4)))
