"""Prediction from bundles: the nodule model's reading, the slice view, calibration and the refer flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungviz.data.upload import context_from_whole
from lungviz.errors import LungvizError
from lungviz.inference.predict import TaskPrediction, load_models, predict, uncertain_band, uncertainty_flags
from lungviz.models import ModelSpec, create_model, save_bundle


def _save(folder, view, task, classes, temperature=1.0, prior=None):
    import torch

    torch.manual_seed(0)
    model = create_model("cnn4", len(classes))
    spec = ModelSpec.from_model(model, classes=classes, view=view, task=task, input_size=32,
                                preprocessing={"view": view, "field_mm": 32.0 if view == "nodule" else None},
                                temperature=temperature, split_fingerprint="x",
                                extra={"prior_adjust": prior})
    save_bundle(model, spec, folder, f"{view}-{task}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.conftest import build_nodule_weights

    folder = tmp_path_factory.mktemp("w")
    _save(folder, "slice", "binary", ["benign", "malignant"], temperature=2.0, prior=[0.3, -0.3])
    _save(folder, "slice", "score", ["1", "2", "3", "4", "5"])
    build_nodule_weights(folder)
    return folder


def test_predict_reads_the_nodule_model_and_the_slice_view(weights):
    models = load_models(weights)
    assert set(models.bundles) == {"slice-binary", "slice-score"} and models.nodule is not None
    ctx = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.7)
    assert set(pred.views) == {"slice", "nodule"}
    for tasks in pred.views.values():
        assert abs(sum(tasks["binary"].probs) - 1) < 1e-5 and len(tasks["score"].probs) == 5
    # the headline is the nodule model's estimate by its factors, called from the spec's call point
    a = pred.assessment
    assert pred.views["nodule"]["binary"].probs[1] == pytest.approx(a.probability)
    assert pred.views["nodule"]["binary"].threshold == pytest.approx(0.12)
    assert pred.views["nodule"]["binary"].top == a.call
    assert np.allclose(pred.views["nodule"]["score"].probs, a.reading.probabilities["malignancy"])
    assert pred.malignant_probability() == pytest.approx(a.probability)
    # the slice view: calibration (raw + prior) / T
    b = models.bundle("slice", "binary")
    from lungviz.data.preprocess import to_model_input

    x = torch.from_numpy(to_model_input(pred.images["slice"], b.mean, b.std)[None])
    raw = b.model(x).detach().numpy()[0]
    assert np.allclose(pred.views["slice"]["binary"].logits, (raw + np.array([0.3, -0.3])) / 2.0, atol=1e-4)
    assert pred.images["nodule"].shape == (32, 32)
    d = pred.to_dict()
    assert d["views"]["nodule"]["binary"]["model"] == "fused-binary"
    assert d["views"]["nodule"]["score"]["model"] == "nodule-score"
    assert d["flag"] in ("refer / uncertain", "no uncertainty flag") and 0 <= d["malignant_probability"] <= 1
    assert d["nodule_model"]["top_factors"]  # the factors travel with the JSON


def test_a_followed_series_replaces_the_reading_and_its_flags(weights):
    from lungviz.inference.nodule import assess
    from lungviz.inference.predict import with_assessment

    models = load_models(weights)
    ctx = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.7)
    other = assess(models.nodule, [ctx, ctx[::-1].copy(), ctx[:, ::-1].copy()], 0.7, 1.25)
    got = with_assessment(pred, other)
    assert got.assessment is other and got.assessment.reading.n_slices == 3
    assert got.views["nodule"]["binary"].probs[1] == pytest.approx(other.probability)
    assert got.views["slice"] is pred.views["slice"]
    assert predict(models, ctx, spacing_mm=0.7, assessment=other).assessment is other


def test_nodule_crop_only_and_no_input(weights):
    models = load_models(weights)
    crop = np.zeros((40, 30), np.float32)
    pred = predict(models, None, nodule_crop=crop)
    assert set(pred.views) == {"nodule"}
    with pytest.raises(LungvizError):
        predict(models, None, None)
    with pytest.raises(LungvizError):
        load_models(weights / "empty")


def test_uncertainty_flags():
    def tp(p):
        return TaskPrediction(classes=["benign", "malignant"], probs=[1 - p, p])

    assert uncertainty_flags({"nodule": {"binary": tp(0.95)}}) == []
    assert "uncertain band" in uncertainty_flags({"nodule": {"binary": tp(0.5)}})[0]
    flags = uncertainty_flags({"slice": {"binary": tp(0.1)}, "nodule": {"binary": tp(0.9)}})
    assert any("disagree" in f for f in flags)
    assert uncertainty_flags({"nodule": {"binary": tp(0.95)}}, presence=0.8) == []
    assert "outlined no nodule" in uncertainty_flags({"nodule": {"binary": tp(0.95)}}, outlined=False)[0]
    off = uncertainty_flags({"nodule": {"binary": tp(0.95)}}, presence=0.12)
    assert off == ["the nodule finder does not see a nodule at the centre of the crop (probability 12%): check that "
                   "the crop is centred on the nodule"]


def test_context_from_hu_matches_slices_set_convention():
    hu = np.full((512, 512), -1000.0, np.float32)
    hu[250:262, 250:262] = 40.0
    ctx = context_from_whole(hu, (256.0, 256.0))
    assert ctx.shape == (128, 128) and ctx.min() == 0.0 and ctx.max() == 1.0
    assert ctx[64, 64] == 1.0 and ctx[0, 0] == 0.0


def test_a_view_whose_malignant_probability_is_off_on_test_says_so(weights):
    from lungviz.inference.predict import calibration_notes
    from lungviz.present.report import estimate_notes

    models = load_models(weights)
    off = [{"lo": 0.3, "hi": 0.4, "n": 10, "mean_p": 0.35, "observed": 0.1},
           {"lo": 0.0, "hi": 0.1, "n": 10, "mean_p": 0.05, "observed": 0.0}]
    models.bundles["slice-binary"].spec.metrics = {"test": {"n": 20, "reliability_malignant": off}}
    notes = calibration_notes(models, ["slice"])
    assert notes == ["The slice view's malignant probability runs high on the held-out test nodules (mean 20% "
                     "against 5% malignant; calibration error 0.15): read it as a ranking among cases rather than "
                     "as a rate."]
    pred = predict(models, np.random.default_rng(0).random((128, 128)).astype(np.float32), spacing_mm=0.7)
    assert pred.to_dict()["calibration_notes"] == notes and notes[0] in estimate_notes(pred.to_dict())
    # errors that cancel: the mean matches the rate, yet the probability is off both ways
    both = [{"lo": 0.0, "hi": 0.1, "n": 10, "mean_p": 0.05, "observed": 0.25},
            {"lo": 0.3, "hi": 0.4, "n": 10, "mean_p": 0.35, "observed": 0.15}]
    models.bundles["slice-binary"].spec.metrics = {"test": {"n": 20, "reliability_malignant": both}}
    assert calibration_notes(models, ["slice"]) == [
        "The slice view's malignant probability runs high in some probability ranges and low in others on the "
        "held-out test nodules (mean 20% against 20% malignant; calibration error 0.20): read it as a ranking among "
        "cases rather than as a rate."]


def test_miscalibration_direction_needs_one_side_to_dominate():
    from lungviz.metrics import miscalibration_direction

    def bins(*gaps):
        return [{"n": 10, "mean_p": 0.5 + g, "observed": 0.5} for g in gaps]

    assert miscalibration_direction(bins(0.2, -0.05)) == "high"  # 2 against 0.5
    assert miscalibration_direction(bins(-0.2, 0.1)) == "low"  # exactly twice
    assert miscalibration_direction(bins(0.2, -0.15)) == "both"
    assert miscalibration_direction(bins(0.0, 0.0)) == "both"  # no error has no direction
    empty = {"n": 0, "mean_p": None, "observed": None}  # as metrics stores a bin no case fell in
    assert miscalibration_direction([*bins(0.2, -0.05), empty]) == "high" and miscalibration_direction([]) == "both"


def test_calls_keep_the_trained_rule_with_the_prior_after_the_temperature(tmp_path):
    """A bundle calibrated as training now writes it: probabilities softmax(z / T + b); the call argmax(z + b), shown
    as a malignant threshold below 50%, in the prediction, its flags and the report."""
    from lungviz.data.preprocess import to_model_input
    from lungviz.models import update_spec
    from lungviz.present.report import call_note, estimate_notes

    prior = [0.46, -0.88]
    _save(tmp_path, "slice", "binary", ["benign", "malignant"], temperature=3.0, prior=prior)
    update_spec(tmp_path, "slice-binary", calibration="prior-after-temperature")
    models = load_models(tmp_path)
    ctx = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.7)
    b = models.bundle("slice", "binary")
    raw = b.model(torch.from_numpy(to_model_input(pred.images["slice"], b.mean, b.std)[None])).detach().numpy()[0]
    tp = pred.views["slice"]["binary"]
    assert np.allclose(tp.logits, raw / 3.0 + np.array(prior), atol=1e-4)
    assert tp.top == ["benign", "malignant"][int(np.argmax(raw + np.array(prior)))]
    threshold = 1 / (1 + np.exp(-(2 / 3) * (prior[1] - prior[0])))
    assert tp.threshold == pytest.approx(threshold)
    assert (tp.top == "malignant") == (tp.probs[1] > threshold)
    d = pred.to_dict()
    assert d["views"]["slice"]["binary"]["calls_malignant_from"] == pytest.approx(threshold, abs=1e-4)
    note = call_note(d)
    assert note is not None and f"slice view from {threshold:.0%}" in note and note in estimate_notes(d)
    # two views on the same side of their operating points do not disagree, whatever 50% says
    bias = list(-(2 / 3) * np.array(prior))
    low = TaskPrediction(classes=["benign", "malignant"], probs=[0.62, 0.38], decision_bias=bias)
    high = TaskPrediction(classes=["benign", "malignant"], probs=[0.45, 0.55], decision_bias=bias)
    assert low.top == high.top == "malignant"
    assert not any("disagree" in f for f in uncertainty_flags({"slice": {"binary": low}, "nodule": {"binary": high}}))
    assert TaskPrediction(classes=["benign", "malignant"], probs=[0.62, 0.38]).top == "benign"
    # a lone view is uncertain around its own call point, not around 50%
    lo_band, hi_band = uncertain_band(threshold)
    assert lo_band < threshold < hi_band < 0.75 and uncertain_band() == (0.25, 0.75)
    two = ["benign", "malignant"]
    near = TaskPrediction(classes=two, probs=[1 - threshold - 0.02, threshold + 0.02], decision_bias=bias)
    far = TaskPrediction(classes=two, probs=[1 - hi_band - 0.05, hi_band + 0.05], decision_bias=bias)
    assert any(f"around its call point, {threshold:.0%}" in f for f in uncertainty_flags({"nodule": {"binary": near}}))
    assert uncertainty_flags({"nodule": {"binary": far}}) == []
    split = uncertainty_flags({"slice": {"binary": TaskPrediction(classes=["benign", "malignant"], probs=[0.7, 0.3],
                                                                  decision_bias=[0.0, 1.0])},
                               "nodule": {"binary": TaskPrediction(classes=["benign", "malignant"], probs=[0.7, 0.3])}})
    assert any("calls malignant from 27%" in f and "calls benign from 50%" in f for f in split)
    assert call_note({"views": {"fused": {"binary": {"calls_malignant_from": 0.5}}}}) is None
    score = {"classes": ["1", "2", "3", "4", "5"], "probabilities": [0.40, 0.08, 0.45, 0.05, 0.02]}
    assert call_note({"views": {"slice": {"score": score | {"prediction": "3"}}}}) is None
    assert call_note({"views": {"slice": {"score": score | {"prediction": "1"}}}}) == (
        "The slice view's score call (1) is not its most probable score (3): a network's call leans towards the "
        "rarer scores, the rule its kappa was measured with.")


def test_each_binary_call_carries_how_it_did_on_the_held_out_test_nodules(tmp_path):
    """The sensitivity and specificity of a view's call, measured on test (one middle slice per nodule when
    measured so), travel with the prediction and are said beside the calls: a benign call misses malignant ones."""
    from lungviz.inference.predict import test_call_figures
    from lungviz.models import update_spec
    from lungviz.present.report import call_note

    single = {"n": 332, "sensitivity": 0.493, "specificity": 0.958,
              "ci95": {"sensitivity": [0.394, 0.597], "specificity": [0.93, 0.98]}}
    averaged = {**single, "sensitivity": 0.451}
    spec = {"task": "binary", "metrics": {"test": averaged, "test_single_slice": single}}
    assert test_call_figures("binary", spec["metrics"]) == {**single, "single_slice": True}
    assert test_call_figures("binary", {"test": averaged})["sensitivity"] == 0.451
    assert test_call_figures("score", {"test": averaged}) is None
    assert test_call_figures("binary", {"test": {"n": 3}}) is None  # not measured
    _save(tmp_path, "slice", "binary", ["benign", "malignant"])
    update_spec(tmp_path, "slice-binary", metrics=spec["metrics"])
    d = predict(load_models(tmp_path), np.random.default_rng(1).random((128, 128)).astype(np.float32),
                spacing_mm=0.7).to_dict()
    assert d["views"]["slice"]["binary"]["test_calls"]["sensitivity"] == 0.493
    note = call_note(d)
    assert ("On one middle slice of each of the 332 held-out test nodules these calls found this share of the nodules "
            "the panel rated malignant: slice view 49% [39-60%]; and cleared this share of the benign ones: slice "
            "view 96% [93-98%]. A benign call does not rule malignancy out.") in note


def test_each_flag_has_a_few_words_for_the_one_line_flag():
    from lungviz.inference.predict import short_flag

    two = ["benign", "malignant"]
    flags = uncertainty_flags({"nodule": {"binary": TaskPrediction(classes=two, probs=[0.5, 0.5]),
                                          "score": TaskPrediction(classes=list("12345"),
                                                                  probs=[0.1, 0.2, 0.3, 0.25, 0.15])},
                               "slice": {"binary": TaskPrediction(classes=two, probs=[0.95, 0.05])}},
                              presence=0.1, outlined=False)
    assert [short_flag(f) for f in flags] == ["no nodule seen at the centre", "nothing outlined",
                                              "estimate near its call point", "the views disagree",
                                              "1-5 score spread out"]
    assert flags[-1] == "the 1-5 panel score is spread over several values (the most likely, 3, at 30%)"
    assert short_flag("something new") == "something new"


def test_a_cases_views_are_cut_once_and_shared(weights):
    from lungviz.data.preprocess import VIEWS
    from lungviz.inference.predict import cut_views

    models = load_models(weights)
    ctx = np.random.default_rng(2).random((128, 128)).astype(np.float32)
    cut = cut_views(models, ctx, None, 0.7)
    assert set(cut.slice) == {"slice-binary", "slice-score"}
    assert cut.slice["slice-binary"] is cut.slice["slice-score"]  # one view spec, one image, read by both
    assert cut.nodule_input[0] is ctx and cut.nodule_input[1] == 0.7 and not cut.spacing_assumed
    crop = np.zeros((40, 40), np.float32)
    alone = cut_views(models, None, crop, None)
    assert alone.slice == {} and alone.presence_patch is None
    assert alone.nodule_input[1] == pytest.approx(VIEWS["nodule"].field_mm / 40)  # the crop spans the nodule field
    assert predict(models, ctx, spacing_mm=0.7).images["slice"] is not None


def test_the_similar_case_query_reuses_the_estimates_reading(weights):
    from lungviz.inference.predict import retrieval_query

    models = load_models(weights)
    ctx = np.random.default_rng(3).random((128, 128)).astype(np.float32)
    fresh = retrieval_query(models, "nodule", ctx, None, 0.7)
    reused = retrieval_query(models, "nodule", ctx, None, 0.7, predict(models, ctx, spacing_mm=0.7).assessment.reading)
    assert np.allclose(fresh, reused, atol=1e-6) and abs(float(np.linalg.norm(reused)) - 1.0) < 1e-5
