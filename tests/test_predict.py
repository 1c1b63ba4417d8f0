"""Prediction from bundles: preprocessing from the spec, calibration, fusion and the refer flag."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from lungviz.errors import LungvizError
from lungviz.inputs import context_from_whole
from lungviz.models import ModelSpec, create_model, save_bundle
from lungviz.predict import TaskPrediction, load_models, predict, uncertain_band, uncertainty_flags


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
    folder = tmp_path_factory.mktemp("w")
    for view in ("slice", "nodule"):
        _save(folder, view, "binary", ["benign", "malignant"], temperature=2.0, prior=[0.3, -0.3])
        _save(folder, view, "score", ["1", "2", "3", "4", "5"])
    for task, classes in (("binary", ["benign", "malignant"]), ("score", ["1", "2", "3", "4", "5"])):
        spec = {"kind": "fusion", "view": "fused", "task": task, "classes": classes,
                "components": [f"slice-{task}", f"nodule-{task}"],
                "fusion": {"views": ["slice", "nodule"], "weights": [0.5, 0.5], "bias": [0.0] * len(classes)}}
        (folder / f"fused-{task}.json").write_text(json.dumps(spec))
    return folder


def test_predict_all_views_calibrated_and_fused(weights):
    models = load_models(weights)
    assert set(models.bundles) == {"slice-binary", "slice-score", "nodule-binary", "nodule-score"}
    ctx = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.7)
    assert set(pred.views) == {"slice", "nodule", "fused"}
    for tasks in pred.views.values():
        assert abs(sum(tasks["binary"].probs) - 1) < 1e-5 and len(tasks["score"].probs) == 5
    # calibration: (raw + prior) / T
    b = models.bundle("nodule", "binary")
    import torch

    from lungviz.preprocess import to_model_input

    x = torch.from_numpy(to_model_input(pred.images["nodule"], b.mean, b.std)[None])
    raw = b.model(x).detach().numpy()[0]
    assert np.allclose(pred.views["nodule"]["binary"].logits, (raw + np.array([0.3, -0.3])) / 2.0, atol=1e-4)
    fused = 0.5 * np.array(pred.views["slice"]["binary"].logits) + 0.5 * np.array(pred.views["nodule"]["binary"].logits)
    assert np.allclose(pred.views["fused"]["binary"].logits, fused, atol=1e-5)
    assert pred.images["nodule"].shape == (32, 32)
    d = pred.to_dict()
    assert d["flag"] in ("refer / uncertain", "no uncertainty flag") and 0 <= d["malignant_probability"] <= 1


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
        return TaskPrediction(["benign", "malignant"], [1 - p, p])

    assert uncertainty_flags({"fused": {"binary": tp(0.95)}}) == []
    assert "uncertain band" in uncertainty_flags({"fused": {"binary": tp(0.5)}})[0]
    flags = uncertainty_flags({"slice": {"binary": tp(0.1)}, "nodule": {"binary": tp(0.9)},
                               "fused": {"binary": tp(0.9)}})
    assert any("disagree" in f for f in flags)
    assert uncertainty_flags({"fused": {"binary": tp(0.95)}}, presence=0.8) == []
    off = uncertainty_flags({"fused": {"binary": tp(0.95)}}, presence=0.12)
    assert off == ["the nodule finder does not see a nodule at the centre of the crop (probability 12%): check that "
                   "the crop is centred on the nodule"]


def test_context_from_hu_matches_slices_set_convention():
    hu = np.full((512, 512), -1000.0, np.float32)
    hu[250:262, 250:262] = 40.0
    ctx = context_from_whole(hu, (256.0, 256.0))
    assert ctx.shape == (128, 128) and ctx.min() == 0.0 and ctx.max() == 1.0
    assert ctx[64, 64] == 1.0 and ctx[0, 0] == 0.0


def test_fused_view_averages_its_ensemble_members(weights, tmp_path):
    """A fusion may name members for a view: each sees its own view image at its own size and calibration, the
    mean of their calibrated logits is what the fusion weighs; a member that is not installed drops that fusion."""
    import shutil

    from lungviz.predict import calibrated_logits, view_image

    folder = tmp_path / "w"
    shutil.copytree(weights, folder)
    torch.manual_seed(1)
    model = create_model("cnn4", 2)
    spec = ModelSpec.from_model(model, classes=["benign", "malignant"], view="nodule", task="binary", input_size=48,
                                preprocessing={"view": "nodule", "field_mm": 24.0}, temperature=1.5,
                                split_fingerprint="x")
    save_bundle(model, spec, folder, "nodule-binary-m")
    fused = json.loads((folder / "fused-binary.json").read_text())
    (folder / "fused-binary.json").write_text(json.dumps(fused | {"members": {"nodule-binary": ["nodule-binary-m"]}}))
    models = load_models(folder)
    assert set(models.bundles) == {"slice-binary", "slice-score", "nodule-binary", "nodule-score"}  # no view of its own
    assert set(models.members) == {"nodule-binary-m"} and "nodule-binary-m" in models.networks
    ctx = np.random.default_rng(2).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.7)
    m = models.members["nodule-binary-m"]
    image = view_image(m.spec, ctx, None, 0.7)
    assert image.shape == (48, 48)
    nodule = (np.array(pred.views["nodule"]["binary"].logits) + calibrated_logits(m, image)) / 2
    expected = 0.5 * np.array(pred.views["slice"]["binary"].logits) + 0.5 * nodule
    assert np.allclose(pred.views["fused"]["binary"].logits, expected, atol=1e-5)
    assert not np.allclose(pred.views["fused"]["binary"].logits, 0.5 * np.array(pred.views["slice"]["binary"].logits)
                           + 0.5 * np.array(pred.views["nodule"]["binary"].logits), atol=1e-4)
    crop = np.random.default_rng(3).random((40, 40)).astype(np.float32)  # an uploaded nodule crop: members see it too
    zoomed = predict(models, ctx, crop, spacing_mm=0.7)
    nodule = (np.array(zoomed.views["nodule"]["binary"].logits) + calibrated_logits(m, view_image(m.spec, ctx, crop,
                                                                                                   0.7))) / 2
    assert np.allclose(zoomed.views["fused"]["binary"].logits,
                       0.5 * np.array(zoomed.views["slice"]["binary"].logits) + 0.5 * nodule, atol=1e-5)
    # The fusion recorded the weights it was fitted on: other weights of a member drop it, with the reason.
    spec_now = json.loads((folder / "fused-binary.json").read_text())
    hashes = {n: b.spec["weights_sha256"] for n, b in models.networks.items()}
    (folder / "fused-binary.json").write_text(json.dumps(spec_now | {"networks_sha256": hashes}))
    assert set(load_models(folder).fusions) == {"binary", "score"}
    (folder / "fused-binary.json").write_text(json.dumps(spec_now | {"networks_sha256": hashes | {
        "nodule-binary-m": "0" * 64}}))
    stale = load_models(folder)
    assert set(stale.fusions) == {"score"} and "other weights of 'nodule-binary-m'" in stale.notes[0]
    # ... and so does another calibration of a network (re-measured after the fusion was fitted)
    from lungviz.calibration import Calibration

    fitted_on = {n: Calibration.from_spec(b.spec).to_spec() for n, b in models.networks.items()}
    (folder / "fused-binary.json").write_text(json.dumps(spec_now | {"networks_calibration": fitted_on}))
    assert set(load_models(folder).fusions) == {"binary", "score"}
    recalibrated = fitted_on | {"nodule-binary": Calibration(9.0, (0.3, -0.3)).to_spec()}
    (folder / "fused-binary.json").write_text(json.dumps(spec_now | {"networks_calibration": recalibrated}))
    stale = load_models(folder)
    assert set(stale.fusions) == {"score"} and "another calibration of 'nodule-binary'" in stale.notes[0]
    # A member of another view does not fit.
    (folder / "fused-binary.json").write_text(json.dumps(fused | {"members": {"slice-binary": ["nodule-binary-m"]}}))
    assert "does not fit the fused binary model" in load_models(folder).notes[0]
    (folder / "fused-binary.json").write_text(json.dumps(fused | {"members": {"nodule-binary": ["nodule-binary-m"]}}))
    (folder / "nodule-binary-m.safetensors").unlink()
    without = load_models(folder)
    assert set(without.fusions) == {"score"} and not without.members
    assert "fused binary model is not available" in without.notes[0] and "nodule-binary-m" in without.notes[0]
    assert "binary" in predict(without, ctx, spacing_mm=0.7).views["nodule"]


def test_size_fusion_measures_the_nodule_with_the_finder(weights, tmp_path):
    import shutil

    from lungviz.finder import centre_diameter_mm
    from lungviz.fusion import SIZE_FEATURE, size_feature
    from tests.conftest import build_finder_weights

    folder = tmp_path / "w"
    shutil.copytree(weights, folder)
    spec = json.loads((folder / "fused-binary.json").read_text())
    spec["fusion"] |= {"features": [SIZE_FEATURE], "feature_weights": [[-0.5, 0.5]]}
    (folder / "fused-binary.json").write_text(json.dumps(spec))
    without = load_models(folder)  # the fused model needs the finder, which is not installed: the rest still works
    assert set(without.fusions) == {"score"} and "fused binary model is not available" in without.notes[0]
    ctx0 = np.random.default_rng(2).random((128, 128)).astype(np.float32)
    assert predict(without, ctx0, spacing_mm=0.7).diameter_mm is None
    build_finder_weights(folder)
    models = load_models(folder)
    assert models.finder is not None
    head = models.finder.locate.model.head[-1]
    with torch.no_grad():
        head.bias[2] = 6.0  # the untrained localiser would measure nothing: make it measure a nodule
    ctx = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.5)
    d = centre_diameter_mm(models.finder, ctx, 0.5)
    assert d > 1.0 and pred.diameter_mm == pytest.approx(d)
    s, n = (np.array(pred.views[v]["binary"].logits) for v in ("slice", "nodule"))
    expected = 0.5 * s + 0.5 * n + float(size_feature(d)) * np.array([-0.5, 0.5])
    assert np.allclose(pred.views["fused"]["binary"].logits, expected, atol=1e-5)
    assert pred.to_dict()["estimated_diameter_mm"] == pytest.approx(round(d, 1))
    assert pred.presence is not None and 0.0 <= pred.presence <= 1.0  # the finder also checks the crop's centre
    assert not pred.spacing_assumed and pred.to_dict()["diameter_assumes_spacing_mm"] is None
    assert predict(models, ctx, spacing_mm=None).to_dict()["diameter_assumes_spacing_mm"] == pytest.approx(0.7)
    assert pred.to_dict()["nodule_presence_at_centre"] == pytest.approx(round(pred.presence, 3))
    assert any("does not see a nodule" in f for f in pred.flags) == (pred.presence < 0.5)
    assert predict(models, None, ctx[32:96, 32:96]).presence is None  # a nodule crop alone: no context to check
    for unknown in (None, float("nan"), 0.0):  # no usable spacing (e.g. a DICOM without PixelSpacing): the default
        p = predict(models, ctx, spacing_mm=unknown)
        assert p.diameter_mm == pytest.approx(centre_diameter_mm(models.finder, ctx, 0.7))
        assert np.isfinite(p.views["fused"]["binary"].probs).all()
    with pytest.raises(LungvizError, match="cannot be measured"):
        centre_diameter_mm(models.finder, ctx, float("nan"))
    plain = predict(load_models(weights), ctx, spacing_mm=0.7).to_dict()  # no size fusion, no measurement
    assert plain["estimated_diameter_mm"] is None and plain["diameter_assumes_spacing_mm"] is None


def test_size_fusion_measures_the_nodule_with_the_outliner_when_its_spec_says_so(weights, tmp_path):
    import shutil

    from lungviz.fusion import SIZE_FEATURE, size_feature
    from lungviz.outline import outline_nodule
    from lungviz.report import estimate_notes
    from tests.conftest import build_finder_weights, build_outliner_weights

    folder = tmp_path / "w"
    shutil.copytree(weights, folder)
    build_finder_weights(folder)
    spec = json.loads((folder / "fused-binary.json").read_text())
    spec["fusion"] |= {"features": [SIZE_FEATURE], "feature_weights": [[-0.5, 0.5]], "size_source": "outliner"}
    (folder / "fused-binary.json").write_text(json.dumps(spec))
    without = load_models(folder)  # the finder is there, but this fusion measures with the outliner
    assert set(without.fusions) == {"score"} and any("nodule outliner" in n for n in without.notes)
    build_outliner_weights(folder, bias=8.0)  # outlines the whole view: a large, known measurement
    models = load_models(folder)
    assert models.outliner is not None and set(models.fusions) == {"binary", "score"}
    # provenance names every network that ran, and the fused models by their spec file's digest
    assert set(models.networks) == {*models.bundles, "finder-presence", "finder-locate", "outliner"}
    assert set(models.provenance) == {*models.networks, "fused-binary", "fused-score"}
    assert models.provenance["fused-binary"]["spec_sha256"] == hashlib.sha256(
        (folder / "fused-binary.json").read_bytes()).hexdigest()
    ctx = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.5)
    d = outline_nodule(models.outliner, ctx, 0.5).diameter_mm
    assert d == pytest.approx(2 * np.sqrt(48.0**2 / np.pi), rel=0.02)  # the whole 48 mm view, as a circle
    assert pred.size_source == "outliner" and pred.diameter_mm == pytest.approx(d)
    assert pred.outline is not None and pred.outline.mask.shape == (128, 128)
    assert pred.outline.mask.sum() == 96 * 96 and pred.outline.mask[16:112, 16:112].all()  # 48 mm = central 96 px
    s, n = (np.array(pred.views[v]["binary"].logits) for v in ("slice", "nodule"))
    expected = 0.5 * s + 0.5 * n + float(size_feature(d)) * np.array([-0.5, 0.5])
    assert np.allclose(pred.views["fused"]["binary"].logits, expected, atol=1e-5)
    assert pred.to_dict()["diameter_measured_by"] == "outliner"
    assert predict(models, None, ctx[32:96, 32:96]).outline is None  # a nodule crop alone: nothing to outline
    assert pred.outline_features == {} and "outline_features" not in pred.to_dict()  # the size alone was used
    # A fusion that also weighs the outline's mean grey level, standardised as its spec says.
    spec["fusion"] |= {"features": [SIZE_FEATURE, "mean_inside"], "feature_weights": [[-0.5, 0.5], [0.0, 1.0]],
                       "feature_centre": [0.0, 0.4], "feature_scale": [1.0, 0.2]}
    (folder / "fused-binary.json").write_text(json.dumps(spec))
    shaped = predict(load_models(folder), ctx, spacing_mm=0.5)
    mean_inside = outline_nodule(models.outliner, ctx, 0.5).features["mean_inside"]
    assert 0.3 < mean_inside < 0.7  # the mean of a uniform random crop, all of it outlined
    assert np.allclose(shaped.views["fused"]["binary"].logits,
                       expected + (mean_inside - 0.4) / 0.2 * np.array([0.0, 1.0]), atol=1e-5)
    shown = shaped.to_dict()
    assert shown["outline_features"] == {"mean_inside": round(mean_inside, 3)}
    assert shown["outline_features_used_by"] == shaped.outline_features_used_by == ["binary"]
    assert any(n.startswith("The fused benign/malignant model also weighs the outline's grey levels")
               and "mean grey level inside" in n for n in estimate_notes(shown))


def test_a_view_whose_malignant_probability_is_off_on_test_says_so(weights):
    from lungviz.predict import calibration_notes
    from lungviz.report import estimate_notes

    models = load_models(weights)
    off = [{"lo": 0.3, "hi": 0.4, "n": 10, "mean_p": 0.35, "observed": 0.1},
           {"lo": 0.0, "hi": 0.1, "n": 10, "mean_p": 0.05, "observed": 0.0}]
    good = [{"lo": 0.3, "hi": 0.4, "n": 10, "mean_p": 0.35, "observed": 0.35}]
    models.bundles["slice-binary"].spec["metrics"] = {"test": {"n": 20, "reliability_malignant": off}}
    models.bundles["nodule-binary"].spec["metrics"] = {"test": {"n": 10, "reliability_malignant": good}}
    notes = calibration_notes(models, ["fused", "nodule", "slice"])
    assert notes == ["The slice view's malignant probability runs high on the held-out test nodules (mean 20% "
                     "against 5% malignant; calibration error 0.15): read it as a ranking among cases rather than "
                     "as a rate."]
    pred = predict(models, np.random.default_rng(0).random((128, 128)).astype(np.float32), spacing_mm=0.7)
    assert pred.to_dict()["calibration_notes"] == notes and notes[0] in estimate_notes(pred.to_dict())
    # errors that cancel: the mean matches the rate, yet the probability is off both ways
    both = [{"lo": 0.0, "hi": 0.1, "n": 10, "mean_p": 0.05, "observed": 0.25},
            {"lo": 0.3, "hi": 0.4, "n": 10, "mean_p": 0.35, "observed": 0.15}]
    models.bundles["slice-binary"].spec["metrics"] = {"test": {"n": 20, "reliability_malignant": both}}
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
    from lungviz.models import update_spec
    from lungviz.preprocess import to_model_input
    from lungviz.report import call_note, estimate_notes

    prior = [0.46, -0.88]
    for view in ("slice", "nodule"):
        _save(tmp_path, view, "binary", ["benign", "malignant"], temperature=3.0, prior=prior)
        update_spec(tmp_path, f"{view}-binary", calibration="prior-after-temperature")
    models = load_models(tmp_path)
    ctx = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    pred = predict(models, ctx, spacing_mm=0.7)
    b = models.bundle("nodule", "binary")
    raw = b.model(torch.from_numpy(to_model_input(pred.images["nodule"], b.mean, b.std)[None])).detach().numpy()[0]
    tp = pred.views["nodule"]["binary"]
    assert np.allclose(tp.logits, raw / 3.0 + np.array(prior), atol=1e-4)
    assert tp.top == ["benign", "malignant"][int(np.argmax(raw + np.array(prior)))]
    threshold = 1 / (1 + np.exp(-(2 / 3) * (prior[1] - prior[0])))
    assert tp.threshold == pytest.approx(threshold)
    assert (tp.top == "malignant") == (tp.probs[1] > threshold)
    d = pred.to_dict()
    assert d["views"]["nodule"]["binary"]["calls_malignant_from"] == pytest.approx(threshold, abs=1e-4)
    note = call_note(d)
    assert note is not None and f"nodule view from {threshold:.0%}" in note and note in estimate_notes(d)
    # two views on the same side of their operating points do not disagree, whatever 50% says
    bias = list(-(2 / 3) * np.array(prior))
    low = TaskPrediction(["benign", "malignant"], [0.62, 0.38], decision_bias=bias)
    high = TaskPrediction(["benign", "malignant"], [0.45, 0.55], decision_bias=bias)
    assert low.top == high.top == "malignant"
    assert not any("disagree" in f for f in uncertainty_flags({"slice": {"binary": low}, "nodule": {"binary": high}}))
    assert TaskPrediction(["benign", "malignant"], [0.62, 0.38]).top == "benign"
    # a lone view is uncertain around its own call point, not around 50%
    lo_band, hi_band = uncertain_band(threshold)
    assert lo_band < threshold < hi_band < 0.75 and uncertain_band() == (0.25, 0.75)
    near = TaskPrediction(["benign", "malignant"], [1 - threshold - 0.02, threshold + 0.02], decision_bias=bias)
    far = TaskPrediction(["benign", "malignant"], [1 - hi_band - 0.05, hi_band + 0.05], decision_bias=bias)
    assert any(f"around its call point, {threshold:.0%}" in f for f in uncertainty_flags({"nodule": {"binary": near}}))
    assert uncertainty_flags({"nodule": {"binary": far}}) == []
    split = uncertainty_flags({"slice": {"binary": TaskPrediction(["benign", "malignant"], [0.7, 0.3],
                                                                  decision_bias=[0.0, 1.0])},
                               "nodule": {"binary": TaskPrediction(["benign", "malignant"], [0.7, 0.3])}})
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
    from lungviz.models import update_spec
    from lungviz.predict import test_call_figures
    from lungviz.report import call_note

    single = {"n": 332, "sensitivity": 0.493, "specificity": 0.958,
              "ci95": {"sensitivity": [0.394, 0.597], "specificity": [0.93, 0.98]}}
    averaged = {**single, "sensitivity": 0.451}
    spec = {"task": "binary", "metrics": {"test": averaged, "test_single_slice": single}}
    assert test_call_figures(spec) == {**single, "single_slice": True}
    assert test_call_figures({"task": "binary", "metrics": {"test": averaged}})["sensitivity"] == 0.451
    assert test_call_figures({"task": "score", "metrics": {"test": averaged}}) is None
    assert test_call_figures({"task": "binary", "metrics": {"test": {"n": 3}}}) is None  # not measured
    _save(tmp_path, "nodule", "binary", ["benign", "malignant"])
    update_spec(tmp_path, "nodule-binary", metrics=spec["metrics"])
    d = predict(load_models(tmp_path), np.random.default_rng(1).random((128, 128)).astype(np.float32),
                spacing_mm=0.7).to_dict()
    assert d["views"]["nodule"]["binary"]["test_calls"]["sensitivity"] == 0.493
    note = call_note(d)
    assert ("On one middle slice of each of the 332 held-out test nodules these calls found this share of the nodules "
            "the panel rated malignant: nodule view 49% [39-60%]; and cleared this share of the benign ones: nodule "
            "view 96% [93-98%]. A benign call does not rule malignancy out.") in note
