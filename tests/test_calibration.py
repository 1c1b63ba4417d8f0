"""Calibration: probabilities with the prior correction after the temperature, and calls that keep the trained rule."""

from __future__ import annotations

import numpy as np
import pytest

from lungviz import metrics
from lungviz.calibration import PRIOR_AFTER_T, PRIOR_BEFORE_T, Calibration
from lungviz.errors import LungvizError

PRIOR = (0.46, -0.88)  # log(train prior / balanced prior) of a 20%-malignant training set
SCORE_PRIOR = (-0.46, 0.04, 0.83, -0.38, -1.04)


def _logits(n: int, k: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, (n, k))


def test_probabilities_follow_the_recorded_order() -> None:
    z = _logits(50, 2)
    new = Calibration.from_spec({"temperature": 2.5, "prior_adjust": list(PRIOR), "calibration": PRIOR_AFTER_T})
    old = Calibration.from_spec({"temperature": 2.5, "prior_adjust": list(PRIOR)})  # written before the key existed
    assert old.order == PRIOR_BEFORE_T
    np.testing.assert_allclose(new.probabilities(z), metrics.softmax(z / 2.5 + np.array(PRIOR)), atol=1e-12)
    np.testing.assert_allclose(old.probabilities(z), metrics.softmax((z + np.array(PRIOR)) / 2.5), atol=1e-12)
    # the older order divides the prior too: the malignant probability is higher on average
    assert old.probabilities(z)[:, 1].mean() > new.probabilities(z)[:, 1].mean() + 0.02
    np.testing.assert_allclose(Calibration().probabilities(z), metrics.softmax(z), atol=1e-12)


@pytest.mark.parametrize("prior", [PRIOR, SCORE_PRIOR])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.1])
def test_calls_are_the_prior_corrected_argmax_in_either_order(prior: tuple, temperature: float) -> None:
    z = _logits(400, len(prior), seed=len(prior))
    trained_rule = (z + np.array(prior)).argmax(1)
    for order in (PRIOR_AFTER_T, PRIOR_BEFORE_T):
        cal = Calibration(temperature, prior, order)
        np.testing.assert_array_equal(cal.decide(cal.probabilities(z)), trained_rule)
    # the plain argmax of the new probabilities is a different rule whenever T != 1
    new = Calibration(temperature, prior)
    assert (new.probabilities(z).argmax(1) != trained_rule).any() == (temperature != 1.0)


def test_binary_threshold_is_where_the_call_flips() -> None:
    cal = Calibration(3.0, PRIOR)
    t = cal.threshold()
    # logit(t) = (1 - 1/T) * (b_mal - b_ben) < 0: a malignant call below 50%
    assert t == pytest.approx(1 / (1 + np.exp(-(1 - 1 / 3.0) * (PRIOR[1] - PRIOR[0]))))
    assert 0.25 < t < 0.5
    P = cal.probabilities(_logits(2000, 2, seed=3))
    calls = cal.decide(P)
    np.testing.assert_array_equal(calls == 1, P[:, 1] > t)
    assert cal.threshold(0) == pytest.approx(1 - t)
    assert Calibration(3.0, PRIOR, PRIOR_BEFORE_T).threshold() == 0.5
    assert Calibration(1.0, PRIOR).threshold() == pytest.approx(0.5)
    assert Calibration(3.0, None).threshold() == 0.5


def test_fit_recovers_the_temperature_of_the_data() -> None:
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 4.0, (6000, 2))
    P = metrics.softmax(z / 2.0 + np.array(PRIOR))
    y = (rng.random(len(P)) < P[:, 1]).astype(int)
    fitted = Calibration.fit(z, y, PRIOR)
    assert fitted.order == PRIOR_AFTER_T and fitted.prior == PRIOR
    assert fitted.temperature == pytest.approx(2.0, rel=0.1)
    # it beats the older order at the same data (that order's own best temperature)
    old_t = metrics.fit_temperature(z + np.array(PRIOR), y)
    assert metrics.nll(fitted.logits(z), y) < metrics.nll(z + np.array(PRIOR), y, old_t)
    again = Calibration.from_spec(fitted.to_spec())
    assert again == fitted


def test_bad_calibrations_are_clear_errors() -> None:
    with pytest.raises(LungvizError, match="unknown calibration"):
        Calibration.from_spec({"temperature": 1.0, "calibration": "isotonic"})
    with pytest.raises(LungvizError, match="positive number"):
        Calibration(0.0)
    with pytest.raises(LungvizError, match="damaged"):
        Calibration.from_spec({"temperature": "warm"})
    with pytest.raises(LungvizError, match="3 prior values but the model has 2 classes"):
        Calibration(1.0, (0.0, 0.0, 0.0)).probabilities(_logits(3, 2))


def test_scores_count_the_calls_not_the_most_probable_class() -> None:
    cal = Calibration(3.0, PRIOR)
    z = _logits(300, 2, seed=11)
    P = cal.probabilities(z)
    y = (z[:, 1] - z[:, 0] > 1.0).astype(int)
    calls = cal.decide(P)
    assert (calls != P.argmax(1)).any()
    rep = metrics.evaluate_probabilities(y, P, positive_class=1, n_boot=20, decision_bias=cal.decision_bias)
    assert rep["confusion"][1][1] == int(((calls == 1) & (y == 1)).sum())
    assert rep["sensitivity"] == pytest.approx(calls[y == 1].mean())
    plain = metrics.evaluate_probabilities(y, P, positive_class=1, n_boot=20)
    assert plain["confusion"][1][1] == int(((P.argmax(1) == 1) & (y == 1)).sum())
    assert rep["auroc"] == plain["auroc"]  # ranking figures do not depend on the call


def test_reader_comparison_scores_the_called_score() -> None:
    cal = Calibration(3.0, SCORE_PRIOR)
    z = _logits(60, 5, seed=5)
    P = cal.probabilities(z)
    readers = [(3, 4, 3), (2, 2), (5, 4, 4, 5)] * 20
    called = cal.decide(P)
    rep = metrics.reader_comparison(readers, P, "score", n_boot=10, decision_bias=cal.decision_bias)
    pairs = metrics.reader_pairs(readers)
    truth = np.array([p[2] for p in pairs])
    model = called[[p[0] for p in pairs]] + 1
    assert rep["model_exact"] == pytest.approx(np.mean(truth == model))


def test_decision_threshold_needs_two_classes() -> None:
    assert metrics.decision_threshold(None) == 0.5
    with pytest.raises(ValueError, match="two classes"):
        metrics.decision_threshold(np.zeros(3))
