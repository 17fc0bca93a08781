"""Linear probes on head terms, against scikit-learn's RidgeClassifier."""
from __future__ import annotations

import numpy as np
import pytest

from clipdecomp.methods.probes import RidgeProbe, head_probes, probe_roles


def test_ridge_probe_equals_sklearn_ridge_classifier():
    sk = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) * rng.uniform(0.1, 5, 12)
    y = (x[:, :3] @ rng.normal(size=(3, 4))).argmax(1)
    for alpha in (0.1, 3.0):
        ours = RidgeProbe(alpha=alpha, standardize=False).fit(x[:200], y[:200])
        ref = sk.RidgeClassifier(alpha=alpha).fit(x[:200], y[:200])
        np.testing.assert_allclose(ours.coef_, ref.coef_.T, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(ours.decision_function(x[200:]), ref.decision_function(x[200:]),
                                   rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(ours.predict(x[200:]), ref.predict(x[200:]))
    # standardised: the same as sklearn on features scaled by their training std
    ours = RidgeProbe(alpha=1.0).fit(x[:200], y[:200])
    mu, sd = x[:200].mean(0), x[:200].std(0)
    ref = sk.RidgeClassifier(alpha=1.0).fit((x[:200] - mu) / sd, y[:200])
    np.testing.assert_array_equal(ours.predict(x[200:]), ref.predict((x[200:] - mu) / sd))


def test_head_probes_find_the_head_that_holds_each_attribute():
    rng = np.random.default_rng(1)
    n = 400
    shape = rng.integers(0, 4, n)
    pos = rng.integers(0, 9, n)
    pos[:50] = -1  # undefined for some images: left out
    terms = rng.normal(size=(n, 2, 2, 6))
    terms[:, 1, 0, :4] += 2.5 * np.eye(4)[shape]          # head (1, 0) holds shape
    p = np.where(pos >= 0, pos, 0)
    terms[:, 0, 1, :2] += 2.0 * np.stack([p // 3, p % 3], 1)  # head (0, 1) holds position
    rows = head_probes(terms, {"shape": shape, "position": pos},
                       n_classes={"shape": 4, "position": 9})
    roles = probe_roles(rows)
    assert roles[(1, 0)]["attribute"] == "shape" and roles[(1, 0)]["accuracy"] > 0.9
    assert roles[(0, 1)]["attribute"] == "position"
    by = {(r["layer"], r["head"], r["attribute"]): r for r in rows}
    assert by[(0, 0, "shape")]["lift"] < 0.2
    assert by[(0, 1, "position")]["n_test"] == 175
    assert by[(0, 1, "position")]["cell_distance"] < by[(0, 0, "position")]["cell_distance"]
    # chance from n_classes
    assert by[(0, 0, "position")]["chance"] == pytest.approx(1 / 9)


def test_head_probes_reject_bad_input():
    with pytest.raises(ValueError, match=r"\[N, L, H, D\]"):
        head_probes(np.zeros((3, 4)), {"a": np.zeros(3, int)})
    with pytest.raises(ValueError, match="shape"):
        head_probes(np.zeros((3, 1, 1, 2)), {"a": np.zeros(4, int)})
    with pytest.raises(ValueError, match="two classes|too few"):
        head_probes(np.zeros((10, 1, 1, 2)), {"a": np.zeros(10, int)})
