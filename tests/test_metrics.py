"""Metrics on tiny arrays, compared to hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from lungviz import metrics as M


def test_softmax_and_temperature():
    logits = np.array([[0.0, np.log(3.0)]])
    assert M.softmax(logits)[0].tolist() == pytest.approx([0.25, 0.75])
    assert M.softmax(logits, 1e9)[0].tolist() == pytest.approx([0.5, 0.5])


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    n = 4000
    true_logit = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = np.stack([np.zeros(n), 3.0 * true_logit], 1)  # three times too confident
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert M.ece(y, M.softmax(logits, t)) < M.ece(y, M.softmax(logits)) - 0.05


def test_fit_temperature_bias_recovers_a_temperature_and_a_class_bias():
    rng = np.random.default_rng(1)
    n, c0 = 6000, np.array([0.0, -1.0, 0.8])
    z = rng.normal(0, 2, (n, 3))
    y = np.array([rng.choice(3, p=p) for p in M.softmax(z / 2.0 + c0)])  # two times too confident, plus a bias
    prior = np.array([0.3, 0.0, -0.2])  # an offset given, not fitted: the bias fitted is what it leaves over
    t, c = M.fit_temperature_bias(z, y, prior)
    assert t == pytest.approx(2.0, rel=0.1) and c[0] == 0.0
    assert c - c[0] == pytest.approx((c0 - prior) - (c0 - prior)[0], abs=0.15)
    # no bias in the data: the fitted bias stays near zero and the temperature is fit_temperature's
    y0 = np.array([rng.choice(3, p=p) for p in M.softmax(z / 2.0)])
    t0, c0_fit = M.fit_temperature_bias(z, y0)
    assert np.abs(c0_fit).max() < 0.12 and t0 == pytest.approx(M.fit_temperature(z, y0), rel=0.05)
    # a class missing from a small set keeps a finite bias
    _, c_small = M.fit_temperature_bias(z[:30], np.where(y0[:30] == 2, 0, y0[:30]))
    assert np.isfinite(c_small).all()


def test_ece_hand_computed():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.6 (correct)
    P = np.array([[0.1, 0.9], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([1, 0, 0, 0])
    # bin (0.8, 0.9]: conf 0.9, acc 0.5 -> |0.4| * 2/4; bin (0.5, 0.6]: conf 0.6, acc 1 -> |0.4| * 2/4
    assert M.ece(y, P) == pytest.approx(0.4)
    table = M.reliability(y, P)
    assert sum(b["n"] for b in table) == 4


def test_the_malignant_probabilitys_ece_sees_what_the_top_class_ece_hides():
    """Benign calls at 40% that are all benign and malignant calls at 60% that are malignant 20% of the time: both
    land in the 60% confidence bin at 60% accuracy (top-class ECE 0), while the malignant probability is off by 0.4
    in both of its bins."""
    p = np.array([0.4] * 10 + [0.6] * 10)
    y = np.array([0] * 10 + [1, 1] + [0] * 8)
    P = np.stack([1 - p, p], axis=1)
    assert M.ece(y, P) == pytest.approx(0.0, abs=1e-9)
    report = M.with_malignant_ece({"n": 20, "reliability_malignant": M.binary_reliability(y == 1, p)})
    assert report["ece_malignant"] == pytest.approx(0.4) and report["mean_malignant_p"] == pytest.approx(0.5)
    assert M.observed_rate(report["reliability_malignant"]) == pytest.approx(0.1)
    assert M.with_malignant_ece({"n": 3}) == {"n": 3}  # a multi-class report has no malignant curve
    assert np.isnan(M.binned_ece([]))


def test_ece_if_calibrated_is_the_noise_floor_of_a_calibrated_model():
    rng = np.random.default_rng(3)
    P = rng.dirichlet([1.0, 1.0, 1.0, 1.0, 1.0], size=300)
    y = (rng.random(300)[:, None] > P.cumsum(1)).sum(1)  # labels drawn from P: calibrated by construction
    band = M.ece_if_calibrated(P, y)
    assert 0.02 < band["median"] < band["p95"] < 0.12  # 300 cases: a calibrated model is not at ECE 0
    assert band["p_value"] > 0.05 and M.ece(y, P) < band["p95"]
    sharp = P**4 / (P**4).sum(1, keepdims=True)  # the same ranking, far too confident
    worse = M.ece_if_calibrated(sharp, y)
    assert M.ece(y, sharp) > worse["p95"] and worse["p_value"] < 0.01
    more = M.ece_if_calibrated(np.tile(P, (10, 1)))  # ten times the cases: a lower floor, no p-value without y
    assert more["p95"] < band["median"] and "p_value" not in more


def test_quadratic_kappa_hand_computed():
    assert M.quadratic_kappa(np.array([0, 1, 2]), np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    # y=[0,0,1,1], pred=[0,1,1,1]: observed weighted disagreement 1/4 * (1/4) ... computed by hand:
    # O = [[1,1,0],[0,2,0],[0,0,0]] /4; E from marginals r=[.5,.5,0], c=[.25,.75,0]; w_ij=(i-j)^2/4
    # sum(wO)=0.25*0.25=0.0625; sum(wE)=0.25*(0.5*0.75+0.5*0.25)=0.125 -> kappa = 1 - 0.5 = 0.5
    assert M.quadratic_kappa(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3) == pytest.approx(0.5)


def test_headline_binary_hand_computed():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    P = np.stack([1 - p1, p1], 1)
    h = M.headline(y, P, positive_class=1, ordinal=False)
    assert h["auroc"] == pytest.approx(0.75)  # 3 of 4 pos/neg pairs ordered
    assert h["accuracy"] == pytest.approx(0.5)
    assert h["f1_malignant"] == pytest.approx(0.5)  # tp=1 fp=1 fn=1
    assert h["sensitivity"] == pytest.approx(0.5) and h["specificity"] == pytest.approx(0.5)


def test_auprc_weighted_perfect_and_multiclass_auroc():
    y = np.array([0, 1, 2, 2])
    P = np.eye(3)[y] * 0.9 + 0.1 / 3
    assert M.auprc_weighted(y, P) == pytest.approx(1.0)
    assert M.auroc(y, P) == pytest.approx(1.0)


def test_bootstrap_resamples_patients_and_brackets_point():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    P = np.stack([1 - p1, p1], 1)
    res = M.evaluate_probabilities(y, P, positive_class=1, groups=[str(i // 4) for i in range(200)], n_boot=200)
    lo, hi = res["ci95"]["auroc"]
    assert lo < res["auroc"] < hi and hi - lo < 0.2
    assert np.array(res["confusion"]).sum() == 200


def test_reader_pairs_leave_one_out():
    pairs = M.reader_pairs([(5, 5, 5, 4), (2,), (1, 3)])
    assert pairs[:4] == [(0, 5, 5), (0, 5, 5), (0, 5, 5), (0, 4, 5)]
    assert (1, 2, 2) not in pairs  # single-reader nodules carry no pair
    assert pairs[4:] == [(2, 1, 3), (2, 3, 1)]


def test_reader_comparison_model_on_same_pairs():
    scores = [(1, 1, 2), (4, 5, 5), (2, 1, 1), (5, 4, 4)]
    P = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.1, 0.9]])
    out = M.reader_comparison(scores, P, "binary", n_boot=50)
    assert out["n_pairs"] == 12 and out["model_auroc"] == pytest.approx(1.0)
    assert out["reader_auroc"] == pytest.approx(1.0)
    P5 = np.eye(5)[[0, 4, 0, 3]]
    out5 = M.reader_comparison(scores, P5, "score", n_boot=50)
    assert 0 < out5["reader_exact"] < 1 and out5["model_qwk"] > 0.8


@pytest.mark.parametrize(("p", "bin_index"), [(0.0, 0), (0.1, 0), (0.1001, 1), (0.55, 5), (0.9, 8), (1.0, 9)])
def test_reliability_bin_uses_the_tables_own_edges(p, bin_index):
    y = np.array([0, 1] * 50)
    p_pos = np.linspace(0, 1, 100)
    bins = M.binary_reliability(y, p_pos)
    got = M.reliability_bin(bins, p)
    assert got == bins[bin_index]
    idx = np.clip(np.digitize([p], np.linspace(0, 1, 11)[1:-1], right=True), 0, 9)[0]
    assert idx == bin_index  # the same rule binary_reliability assigns cases with
    assert M.reliability_bin([], p) is None and M.reliability_bin(bins, float("nan")) is None


def test_format_ci():
    rep = {"auroc": 0.8123, "f1": 0.5, "qwk": float("nan"), "ci95": {"auroc": [0.75, 0.86]}}
    assert M.format_ci(rep, "auroc") == "0.812 [0.750, 0.860]"
    assert M.format_ci(rep, "f1", 2) == "0.50"
    assert M.format_ci(rep, "qwk") == "–" and M.format_ci(rep, "missing") == "–"


def test_score_auroc_ranks_one_number_per_case_with_a_patient_interval():
    y = np.array([0, 0, 0, 1, 1, 0, 1, 1])
    diameter = np.array([4.0, 5.0, 6.0, 12.0, 9.0, 7.0, 15.0, 8.0])  # every malignant nodule is the larger
    res = M.score_auroc(y, diameter, groups=[str(i // 2) for i in range(8)], n_boot=200)
    assert res["n"] == 8 and res["auroc"] == pytest.approx(1.0)
    assert M.score_auroc(y, -diameter, n_boot=50)["auroc"] == pytest.approx(0.0)
    mixed = M.score_auroc(y, np.array([4.0, 9.0, 6.0, 5.0, 12.0, 7.0, 15.0, 8.0]), n_boot=200)
    assert mixed["auroc"] == pytest.approx(12 / 16)  # 4 of the 16 benign-malignant pairs are ranked the wrong way
    lo, hi = mixed["ci95"]["auroc"]
    assert lo <= mixed["auroc"] <= hi < 1.0 + 1e-9
    with pytest.raises(ValueError):
        M.score_auroc(y, diameter[:5])


def test_ratio_by_band_summarises_a_measurement_against_a_reference_per_size_band():
    reference = np.array([5.0, 8.0, 12.0, 15.0, 25.0, 30.0, np.nan, 0.0])
    measured = np.array([4.0, 4.0, 6.0, 9.0, 10.0, 12.0, 3.0, 2.0])  # the last two pairs are not usable
    bands = M.ratio_by_band(measured, reference)
    assert [(b["lo"], b["hi"], b["n"]) for b in bands] == [(0.0, 10.0, 2), (10.0, 20.0, 2), (20.0, None, 2),
                                                           (0.0, None, 6)]
    assert bands[0]["median"] == pytest.approx(0.65) and bands[2]["median"] == pytest.approx(0.4)
    assert bands[1]["q25"] <= bands[1]["median"] <= bands[1]["q75"]
    assert M.ratio_by_band(np.array([1.0]), np.array([50.0]))[0]["n"] == 0  # an empty band is reported, as NaN


def test_wilson_interval_brackets_the_proportion_and_narrows_with_n():
    lo, hi = M.wilson_interval(11, 13)
    assert lo < 11 / 13 < hi and hi <= 1.0 and lo == pytest.approx(0.578, abs=0.005)
    assert M.wilson_interval(0, 10)[0] == 0.0 and M.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    wide, narrow = M.wilson_interval(5, 10), M.wilson_interval(50, 100)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]
    assert M.wilson_interval(0, 0) == (0.0, 1.0)


def test_reader_comparison_intervals_resample_patients():
    rng = np.random.default_rng(3)
    scores = [tuple(int(v) for v in rng.integers(1, 6, 3)) for _ in range(40)]
    P = np.eye(5)[rng.integers(0, 5, 40)]
    by_case = M.reader_comparison(scores, P, "score", n_boot=200)
    one_patient = M.reader_comparison(scores, P, "score", n_boot=200, patients=["P1"] * 40)
    lo, hi = one_patient["ci95"]["model_exact"]
    assert lo == hi == pytest.approx(one_patient["model_exact"])  # resampling the one patient redraws every pair
    assert by_case["ci95"]["model_exact"][1] > by_case["ci95"]["model_exact"][0]


def test_a_threshold_for_a_sensitivity_is_the_highest_that_reaches_it():
    positive = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    score = np.array([0.9, 0.8, 0.4, 0.2, 0.7, 0.5, 0.3, 0.1, 0.05, 0.3])
    assert M.threshold_for_sensitivity(positive, score, 0.75) == (0.4, True)  # 3 of 4 positives at or above it
    assert M.threshold_for_sensitivity(positive, score, 0.76) == (0.2, True)  # a fraction more needs the fourth
    assert M.threshold_for_sensitivity(positive, score, 1.0) == (0.2, True)
    tied = np.array([0.9, 0.4, 0.4, 0.2, 0.7, 0.5, 0.3, 0.1, 0.05, 0.3])
    assert M.threshold_for_sensitivity(positive, tied, 0.5) == (0.4, True)  # ties at the threshold are all called
    got = M.at_threshold(positive, score, 0.4)
    assert got == pytest.approx({"sensitivity": 0.75, "specificity": 4 / 6, "ppv": 3 / 5, "npv": 4 / 5,
                                 "called_positive": 0.5})
    assert np.isnan(M.at_threshold(positive, score, 2.0)["ppv"])  # nothing called positive: no PPV to count
    with pytest.raises(ValueError):
        M.threshold_for_sensitivity(np.zeros(3, bool), score[:3], 0.9)
    with pytest.raises(ValueError, match="finite"):  # a NaN would sort first and give a wrong threshold
        M.threshold_for_sensitivity(positive, np.where(np.arange(10) == 1, np.nan, score), 0.75)


def test_the_lower_bound_rule_asks_for_more_than_the_target_and_says_when_it_cannot_be_reached():
    rng = np.random.default_rng(4)
    positive = np.r_[np.ones(66, bool), np.zeros(270, bool)]
    score = rng.random(336) + positive
    point, ok = M.threshold_for_sensitivity(positive, score, 0.9)
    strict, ok_strict = M.threshold_for_sensitivity(positive, score, 0.9, "lower-bound")
    k = int(np.sum(score[positive] >= strict))
    assert ok and ok_strict and strict < point and M.wilson_interval(k, 66)[0] >= 0.9 > M.wilson_interval(k - 1,
                                                                                                          66)[0]
    lowest, reachable = M.threshold_for_sensitivity(positive, score, 0.95, "lower-bound")  # 66/66 bounds at 0.945
    assert not reachable and lowest == score[positive].min()


def test_an_operating_point_is_chosen_on_validation_and_only_read_on_test():
    rng = np.random.default_rng(2)
    vp, tp = rng.random(400) < 0.2, rng.random(300) < 0.2
    vs, ts = vp + rng.normal(0, 0.7, 400), tp + rng.normal(0, 0.7, 300)
    op = M.operating_point(vp, vs, tp, ts, 0.9, [f"P{i // 2}" for i in range(300)], 200)
    assert op["threshold"] == M.threshold_for_sensitivity(vp, vs, 0.9)[0] and op["val"]["sensitivity"] >= 0.9
    assert op["test"] == M.at_threshold(tp, ts, op["threshold"]) and op["rule"] == "point" and op["reachable"]
    shifted = M.operating_point(vp, vs, tp, ts + 5.0, 0.9, None, 50)  # test scores never move the threshold
    assert shifted["threshold"] == op["threshold"] and shifted["test"]["sensitivity"] == 1.0
    lo, hi = op["test_ci95"]["specificity"]
    assert lo < op["test"]["specificity"] < hi
