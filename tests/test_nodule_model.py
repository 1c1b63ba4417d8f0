"""The nodule model: its heads, gate, loss, targets and the aggregation over a nodule's slices, on tiny arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_nodule_weights
from torch import nn

from lungviz.data.cases import Case
from lungviz.explain import cam
from lungviz.inference.nodule import (
    FIELD_MM,
    FIRST_FIELD_MM,
    SliceReading,
    aggregate,
    expected_rating,
    field_for,
    predicted_rating,
    split_logits,
)
from lungviz.metrics import rating_comparison
from lungviz.models import NODULE_HEADS, ModelSpec, NoduleNet, create_model, load_bundle, save_bundle
from training.nodule import NoduleLoss, head_targets, pairwise_reader_dice, panel_and_votes

ARCH = "tf_efficientnet_lite0+nodule"
TOTAL = sum(NODULE_HEADS.values())


@pytest.fixture(scope="module")
def net() -> NoduleNet:
    torch.manual_seed(0)
    return create_model(ARCH, 2).eval()


def test_heads_and_outline_shapes(net):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outline, logits = net.outputs(x)
        assert outline.shape == (3, 1, 32, 32) and logits.shape == (3, TOTAL)
        assert torch.allclose(net(x), logits[:, :2]) and net.embed(x).shape == (3, net.embed_dim)
    parts = split_logits(logits)
    assert list(parts) == list(NODULE_HEADS) and [p.shape[1] for p in parts.values()] == list(NODULE_HEADS.values())
    with pytest.raises(Exception, match="first head has 2 classes"):
        create_model(ARCH, 5)


def test_bundle_round_trip(net, tmp_path):
    spec = ModelSpec.from_model(net, classes=["benign", "malignant"], view="nodule", task="nodule", input_size=32)
    save_bundle(net, spec, tmp_path, "nodule")
    back = load_bundle(tmp_path, "nodule", "cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.model.outputs(x)[1], net.outputs(x)[1], atol=0.05)  # float16 storage


class _FixedOutline(nn.Module):
    """Stands in for the decoder's last layers: a square outline whatever the input."""

    def __init__(self, inside: tuple[slice, slice]) -> None:
        super().__init__()
        self.inside = inside

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = torch.full((y.shape[0], 1, *y.shape[-2:]), -20.0) + 0.0 * y[:, :1]
        out[:, :, self.inside[0], self.inside[1]] = 20.0
        return out


def test_gradcam_on_the_gated_layer_stays_on_the_outline(net):
    """The heads pool only the predicted outline widened by one stride-4 cell, so their Grad-CAM is zero beyond."""
    torch.manual_seed(1)
    model = create_model(ARCH, 2).eval()
    model.seg.out = _FixedOutline((slice(2, 4), slice(10, 12)))  # stride-4 grid of a 64 px view: rows 8-16, cols 40-48
    image = np.random.default_rng(0).uniform(size=(64, 64)).astype(np.float32)
    near = np.zeros((64, 64), bool)
    near[0:28, 28:62] = True  # the outline, widened by the gate's cell and the maps' upsampling
    maps = [cam(model, image, (0.5,) * 3, (0.5,) * 3, target_class=t, layer="gated") for t in (0, 1)]
    assert max(h.max() for h in maps) > 0  # one class at least has evidence on the outline
    for heat in maps:  # and none anywhere else (a class without evidence gets an empty map)
        assert heat[~near].max() == 0.0


def test_loss_prefers_the_truth_and_ignores_unlabelled_heads():
    loss = NoduleLoss(8, 1.0)
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    soft = torch.zeros(2, TOTAL)
    start = 0
    for levels in NODULE_HEADS.values():
        soft[:, start] = 1.0  # every head's truth: the first level
        start += levels
    weights = torch.ones(2, len(NODULE_HEADS))
    target = torch.cat([mask.flatten(1), soft, weights], dim=1)
    right_logits = soft * 8.0
    good_outline = (mask * 16.0 - 8.0)[:, None]
    good = loss((good_outline, right_logits), target)
    assert good < loss((-good_outline, right_logits), target)
    assert good < loss((good_outline, -right_logits), target)
    unlabelled = target.clone()
    unlabelled[:, -1] = 0.0  # texture not labelled: its logits no longer count
    wrong_texture = right_logits.clone()
    wrong_texture[:, -5:] = torch.tensor([-8.0, 8.0, 8.0, 8.0, 8.0])
    assert loss((good_outline, wrong_texture), unlabelled) == pytest.approx(float(loss((good_outline, right_logits),
                                                                                    unlabelled)), abs=1e-6)


def _case(**kw) -> Case:
    return Case(patient_id="P", nodule_id="nodule-0", source="test", **kw)


def test_targets_mix_the_panel_and_the_readers_votes():
    c = _case(malignancy=4, reader_scores=(5, 4, 4, 3), characteristics={"spiculation": 2.5},
              reader_characteristics=({"spiculation": 1}, {"spiculation": 2}, {"spiculation": 3}, {"spiculation": 4}))
    assert panel_and_votes(c, "malignant", 2) == (2, [2, 2, 2, 1])
    assert panel_and_votes(c, "spiculation", 5) == (3, [1, 2, 3, 4])  # the median 2.5 rounds half up
    t, w = head_targets([c, _case()], 0.5)
    heads = dict(zip(NODULE_HEADS, np.split(t[0], np.cumsum(list(NODULE_HEADS.values()))[:-1]), strict=True))
    assert np.allclose(heads["malignancy"], [0, 0, 0.125, 0.75, 0.125])
    assert np.allclose(heads["malignant"], [0.125, 0.875])
    assert np.allclose(heads["spiculation"], [0.125, 0.125, 0.625, 0.125, 0])
    assert w[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 0] and not w[1].any() and not t[1].any()


def test_field_rule_comes_from_the_bundles_spec():
    from types import SimpleNamespace

    from lungviz.inference.nodule import field_rule
    from lungviz.models import ModelSpec

    def spec(pre: dict) -> ModelSpec:
        return ModelSpec.from_dict({"arch": "x", "classes": ["benign", "malignant"], "view": "nodule",
                                    "task": "nodule", "input_size": 64, "mean": [0.5], "std": [0.5],
                                    "preprocessing": pre})

    rule = field_rule(SimpleNamespace(spec=spec({"field_factor": 3.0, "field_mm_range": [10.0, 50.0],
                                                 "first_field_mm": 30.0})))  # type: ignore[arg-type]
    assert rule.field_for(10.0) == 30.0 and rule.field_for(1.0) == 10.0 and rule.field_for(40.0) == 50.0
    assert rule.field_for(float("nan")) == 30.0
    assert field_rule(SimpleNamespace(spec=spec({}))).to_spec() == {  # type: ignore[arg-type]
        "field_factor": 2.5, "field_mm_range": [16.0, 64.0], "first_field_mm": 40.0}


def test_field_follows_the_measured_nodule_within_limits():
    assert field_for(10.0) == pytest.approx(25.0)
    assert field_for(2.0) == FIELD_MM[0] and field_for(60.0) == FIELD_MM[1]
    assert field_for(0.0) == field_for(float("nan")) == FIRST_FIELD_MM


def _reading(long_mm: float, short_mm: float, area: float, logits: list[float], outlined: bool = True
             ) -> SliceReading:
    outline = np.zeros((4, 4), bool)
    outline[1:3, 1:3] = outlined
    return SliceReading(view=np.zeros((4, 4), np.float32), field_mm=20.0, mm_per_px=0.5, outline=outline,
                        long_axis_mm=long_mm, short_axis_mm=short_mm, area_mm2=area,
                        logits=np.asarray(logits, np.float32))


class _Spec:
    def __init__(self) -> None:
        from lungviz.models import ModelSpec

        self.spec = ModelSpec.from_dict({"arch": "x", "classes": ["benign", "malignant"], "view": "nodule",
                                         "task": "nodule", "input_size": 4, "mean": [0.5], "std": [0.5],
                                         "head_temperatures": {"malignant": 2.0}})


def test_aggregate_over_slices():
    a = np.zeros(TOTAL)
    b = np.zeros(TOTAL)
    a[1], b[1] = 2.0, 0.0  # malignant logit 2 and 0: mean 1, at temperature 2 -> 0.5
    one = _reading(8.0, 6.0, 40.0, a)
    two = _reading(10.0, 7.0, 60.0, b)
    r = aggregate(_Spec(), [one, two], 2.5)  # type: ignore[arg-type]
    assert r.n_slices == 2 and r.long_axis_mm == 10.0 and r.short_axis_mm == 7.0 and r.mean_axes_mm == 8.5
    assert r.volume_mm3 == pytest.approx(250.0)
    assert r.malignant_probability == pytest.approx(1.0 / (1.0 + np.exp(-0.5)))
    assert r.ratings["malignancy"] == pytest.approx(3.0)  # zero logits: uniform over 1-5
    assert aggregate(_Spec(), [one], 2.5).volume_mm3 is None  # type: ignore[arg-type]
    assert aggregate(_Spec(), [one, two], None).volume_mm3 is None  # type: ignore[arg-type]
    assert expected_rating(np.array([0.0, 0.0, 1.0, 0.0])) == pytest.approx(3.0)
    edge = _reading(30.0, 20.0, 10.0, np.full(TOTAL, 5.0), outlined=False)  # not outlined: no size from it
    three = aggregate(_Spec(), [edge, one, two], 2.5, central=0.3, shown=0)  # type: ignore[arg-type]
    assert three.long_axis_mm == 10.0 and three.shown == 0 and three.slices[three.shown] is edge
    assert three.malignant_probability == pytest.approx(1.0 / (1.0 + np.exp(-1.0)))  # the middle slice's logits
    nothing = aggregate(_Spec(), [edge], 2.5)  # type: ignore[arg-type]
    assert not nothing.outlined and np.isnan(nothing.mean_axes_mm) and nothing.volume_mm3 is None


def test_nominal_scales_give_their_most_probable_category():
    p = np.array([0.3, 0.0, 0.0, 0.0, 0.3, 0.4])  # calcification: popcorn or central or absent
    assert predicted_rating("calcification", p) == 6.0
    assert predicted_rating("spiculation", np.array([0.5, 0, 0, 0, 0.5])) == pytest.approx(3.0)  # graded: the mean


def test_readers_pairwise_dice_from_counts():
    same = np.zeros((4, 4))
    same[1:3, 1:3] = 3  # three readers draw the same square
    assert pairwise_reader_dice(same, 3) == pytest.approx(1.0)
    apart = np.zeros((4, 4))
    apart[0, :2] = 1
    apart[3, :2] = 1  # two readers, disjoint outlines
    assert pairwise_reader_dice(apart, 2) == 0.0
    assert np.isnan(pairwise_reader_dice(same, 1))


def test_rating_comparison_puts_model_and_reader_on_the_same_pairs():
    votes = [[1, 1, 1], [4, 5, 5], [3, 3, 3], [2, 2]]
    perfect = np.array([1.0, 5.0, 3.0, 2.0])
    rep = rating_comparison(votes, perfect, 5, n_boot=20)
    assert rep["n_pairs"] == 11 and rep["n_nodules"] == 4
    assert rep["model_qwk"] == pytest.approx(1.0) and rep["model_mae"] == 0.0
    assert rep["reader_mae"] > 0.0
    assert rating_comparison(votes, np.full(4, 3.0), 5, n_boot=20)["model_qwk"] == pytest.approx(0.0)  # constant


def test_factor_model_contributions_sum_to_its_estimate_and_fit_the_direction():
    from lungviz.errors import LungvizError
    from lungviz.inference.factors import FactorModel, factor_phrases, factor_values, fit_factor_model, risk_band

    rng = np.random.default_rng(0)
    n = 400
    size = rng.normal(2.2, 0.6, n)  # log mm
    spic = rng.uniform(1, 5, n)
    texture = rng.uniform(1, 5, n)  # unrelated to the outcome
    logit = 2.0 * (size - 2.2) + 0.8 * (spic - 3.0) - 1.5
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    rows = [{"size": a, "spiculation": b, "texture": c, "image": 0.0} for a, b, c in zip(size, spic, texture,
                                                                                            strict=True)]
    model, choice = fit_factor_model(rows, y, ("size", "spiculation", "texture"), [f"P{i // 2}" for i in range(n)])
    coef = dict(zip(model.names, model.coef, strict=True))
    assert coef["size"] > 1.0 and coef["spiculation"] > 0.4 and abs(coef["texture"]) < 0.3
    assert choice["C"] in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0) and choice["n"] == n
    one = factor_values(20.0, {"spiculation": np.array([0, 0, 0, 1.0, 0]), "texture": np.array([0, 0, 0, 0, 1.0]),
                               "calcification": np.array([0.1, 0, 0, 0, 0, 0.9])}, 0.7)
    assert one["spiculation"] == 4.0 and one["calcification"] == pytest.approx(0.1) and np.isnan(one["margin"])
    parts = model.contributions(one)
    by_hand = model.intercept + sum(c * (one[n] - m) for n, c, m in zip(model.names, model.coef, model.centre,
                                                                          strict=True))
    assert model.logit(one) == pytest.approx(by_hand) == pytest.approx(model.intercept + sum(parts.values()))
    assert model.probability(one) == pytest.approx(float(model.probabilities([one])[0]))
    assert model.contributions({"size": float("nan")})["size"] == 0.0  # unknown: counted at the centre
    assert FactorModel.from_dict(model.to_dict()).probability(one) == pytest.approx(model.probability(one))
    with pytest.raises(LungvizError):
        FactorModel.from_dict({**model.to_dict(), "names": ["size", "spiculation", "weather"]})
    phrases = factor_phrases(one, parts, top=2)
    assert phrases[0].startswith("size 20 mm: +") and len(phrases) == 2
    assert risk_band(0.03, 0.05) == "low (below the 5% call point)" and risk_band(0.3, 0.05).startswith("raised")
    assert risk_band(0.9, 0.05).startswith("high") and risk_band(0.06, 0.05).startswith("raised")


def test_prediction_carries_the_size_characteristics_and_factors(app_weights, real_lidc, tmp_path):
    import shutil

    from lungviz.inference.predict import load_models, predict
    from lungviz.present.report import estimate_notes

    weights = tmp_path / "w"
    shutil.copytree(app_weights, weights)
    build_nodule_weights(weights)
    ms = load_models(weights, device="cpu")
    case = next(c for c in real_lidc[0] if c.case_id == "LIDC-IDRI-0001/nodule-0")
    pred = predict(ms, case.load_slice(case.middle_index()), None, case.pixel_spacing_mm)
    a = pred.assessment
    assert a is not None and a.reading.n_slices == 1 and "nodule" in ms.networks
    assert a.probability == pytest.approx(1 / (1 + np.exp(-(sum(a.contributions.values()) - 1.4))))
    assert a.call == ("malignant" if a.probability >= 0.12 else "benign") and a.risk_band
    out = pred.to_dict()["nodule_model"]
    assert set(out["characteristics"]) == set(NODULE_HEADS) - {"malignant"}
    assert out["factors"]["size"]["log_odds"] == pytest.approx(a.contributions["size"], abs=1e-3)
    assert len(out["top_factors"]) == 5 and out["top_factors"][-1].startswith("the other factors together: ")
    assert out["test_calls"]["sensitivity"] == 0.9
    rest = sorted(a.contributions.values(), key=abs)[:3]
    assert out["top_factors"][-1] == f"the other factors together: {sum(rest):+.1f} log-odds"
    assert out["average_nodule_probability"] == pytest.approx(1 / (1 + np.exp(1.4)), abs=1e-4)
    notes = estimate_notes(pred.to_dict())
    assert notes[0].startswith("Nodule model, over 1 slice: long axis")
    assert "What moved it from an average nodule's" in notes[2]


def test_factor_fit_keeps_each_coefficient_on_its_known_side():
    from lungviz.inference.factors import fit_factor_model

    rng = np.random.default_rng(1)
    n = 300
    size = rng.normal(2.2, 0.5, n)
    spic = rng.uniform(1, 5, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(2.0 * (size - 2.2) - 1.0 * (spic - 3.0))))).astype(int)
    rows = [{"size": a, "spiculation": b} for a, b in zip(size, spic, strict=True)]
    model, choice = fit_factor_model(rows, y, ("size", "spiculation"))
    coef = dict(zip(model.names, model.coef, strict=True))
    # the data say 'spiculated, less suspicious': the fit may not, so spiculation contributes nothing
    assert coef["spiculation"] == pytest.approx(0.0, abs=1e-8) and coef["size"] > 1.0
    assert choice["signs"] == {"size": 1, "spiculation": 1}


SHIPPED = (Path(__file__).resolve().parents[1] / "weights" / "nodule.json").is_file()


@pytest.mark.skipif(not SHIPPED, reason="the shipped nodule model is not installed")
def test_shipped_nodule_model_measures_and_describes_a_library_case(real_lidc):
    """LIDC-IDRI-0045/nodule-9 (a test patient: 18 mm, solid, no calcification, panel score 5): the shipped model's
    size and characteristics over its central slices, as evaluation reads a nodule."""
    from lungviz.inference.nodule import assess
    from lungviz.models import load_bundle
    from training.data import central_slices

    case = next(c for c in real_lidc[0] if c.case_id == "LIDC-IDRI-0045/nodule-9")
    bundle = load_bundle(Path(__file__).resolve().parents[1] / "weights", "nodule", "cpu")
    slices = [case.load_slice(k) for k in central_slices(case.n_slices, 0, 0.5)]
    a = assess(bundle, slices, case.pixel_spacing_mm, case.slice_thickness_mm)
    assert a.reading.n_slices == len(slices) >= 2
    assert abs(a.reading.long_axis_mm - case.diameter_mm) < 5.0  # the readers' diameter, within 5 mm
    assert a.reading.short_axis_mm <= a.reading.long_axis_mm and a.reading.volume_mm3 > 0
    assert a.characteristics["calcification"].startswith("absent")
    assert a.reading.ratings["texture"] > 3.5  # solid, as the readers rated it
    assert a.probability > 0.1 and a.call == "malignant" and a.top_factors()[0]


@pytest.mark.skipif(not SHIPPED, reason="the shipped nodule model is not installed")
def test_shipped_model_follows_a_nodule_through_a_series(lidc_dicom_dir):
    """LIDC-IDRI-0006/nodule-3 (9 mm, outlined on slices 33-35 of 40): followed from its middle slice, the model
    reads the slices the nodule reaches and stops where it ends, with a volume near the readers'."""
    from lungviz.data.dicom import import_dicom_case
    from lungviz.data.io import read_series
    from lungviz.inference.nodule import assess_series, follow_series
    from lungviz.models import load_bundle

    series = read_series(lidc_dicom_dir / "LIDC-IDRI-0006")
    bundle = load_bundle(Path(__file__).resolve().parents[1] / "weights", "nodule", "cpu")

    case = next(c for c in import_dicom_case(lidc_dicom_dir / "LIDC-IDRI-0006")[0] if c.nodule_id == "nodule-3")
    start, centre = int(round(case.extra["centre_z_index"])), tuple(case.extra["centre_rc"])
    readings, indices = follow_series(bundle, series, start, centre)
    assert indices == sorted(indices) and start in indices and 2 <= len(indices) == len(readings) <= 6
    assert set(case.extra["slice_indices"]) <= set(range(indices[0] - 1, indices[-1] + 2))
    a = assess_series(bundle, series, start, centre)
    assert a.reading.n_slices == len(indices) and 0.5 < a.reading.volume_mm3 / case.volume_mm3 < 2.0


@pytest.mark.parametrize(("head", "probs", "words"), [
    ("malignancy", [0, 0, 0, 0.1, 0.9], "4.9 of 5, highly suspicious"),
    ("lobulation", [0.1, 0.2, 0.3, 0.2, 0.2], "3.2 of 5, between none and marked"),
    ("lobulation", [0.9, 0.1, 0, 0, 0], "1.1 of 5, none"),
    ("texture", [0, 0, 1, 0, 0], "3.0 of 5, part solid"),
    ("calcification", [0, 0, 0, 0, 0.02, 0.98], "absent, 98%"),
    ("internalStructure", [1, 0, 0, 0], "soft tissue, 100%"),
])
def test_ratings_read_in_the_readers_words(head, probs, words):
    from lungviz.inference.nodule import rating_words

    assert rating_words(head, np.array(probs, float)) == words
